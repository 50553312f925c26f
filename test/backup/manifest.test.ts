// Every backup path writes manifest.json (running full, running incremental, stopped),
// published with the folder; its facts are the backup's and its digests equal an
// independent recomputation from qemu-img of each layer written. stdout is what the
// other backup tests pin (the running size line is du -sb of the folder, manifest included).
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { decodeManifest } from '../../lib/store/manifest.js';
import { recomputeDigests } from '../helpers/layer-digest.js';
import { removeTempDirs } from '../helpers/tmp.js';
import {
  backup,
  completedBlock,
  DATA_VOL,
  dataFile,
  duSb,
  expectClean,
  fullFlags,
  incrementalFlags,
  MiB,
  NEW_BITMAP,
  PARENT_BITMAP,
  PARENT_TS,
  ROOT_DIRTY,
  ROOT_SIZE,
  DATA_SIZE,
  ROOT_VOL,
  rootFile,
  scenario,
  VM,
  BACKUP_PATH,
  type Scenario,
} from './scenario.js';

afterAll(removeTempDirs);

function manifestOf(s: Scenario) {
  return decodeManifest(readFileSync(join(s.final, 'manifest.json'), 'utf8'));
}

/** Each listed disk's digests equal qemu-img's view of the file written. */
function expectDigestsMatch(s: Scenario): void {
  const m = manifestOf(s);
  for (const d of m.disks) {
    const theirs = recomputeDigests(join(s.final, d.file), s.sb.root, m.digest.extentBytes, m.digest.algorithm, m.digest.partBytes);
    expect({ file: d.file, extents: d.extents, data: d.dataBytes, zero: d.zeroBytes }).toEqual({
      file: d.file,
      extents: theirs.extents,
      data: theirs.dataBytes,
      zero: theirs.zeroBytes,
    });
  }
}

describe.concurrent('manifest.json of every backup path', () => {
  it('stopped VM: lists both disks with identity and digests; stdout still one size per disk file', async () => {
    const s = scenario('mf-stopped', { dataDisk: true, state: 'shut off' });
    const r = await backup(s, { disks: `${s.rootDisk},${s.dataDisk}`, extra: fullFlags() });
    expect(r.code).toBe(0);
    // The sizes the agent adds up are the disk files' only.
    expect(r.stdout.trim().split('\n').slice(1)).toHaveLength(2);
    const m = manifestOf(s);
    expect(m).toMatchObject({
      vm: VM,
      path: BACKUP_PATH,
      mode: 'full',
      kind: 'full',
      checkpoint: NEW_BITMAP,
      incrementalFrom: null,
      parent: null,
      digest: { algorithm: 'xxh64', extentBytes: 64 * MiB, partBytes: MiB },
    });
    expect(m.version).toBe(3);
    expect(m.disks.map((d) => [d.file, d.volumeId, d.virtualSize, d.backing])).toEqual([
      [`root.${ROOT_VOL}.qcow2`, ROOT_VOL, ROOT_SIZE, null],
      [`datadisk.${DATA_VOL}.qcow2`, DATA_VOL, DATA_SIZE, null],
    ]);
    expect(m.tool.version).toBe(
      (JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version: string }).version,
    );
    expect(Date.parse(m.createdAt)).toBeGreaterThan(Date.now() - 600_000);
    expectDigestsMatch(s);
    expect(readdirSync(join(s.sb.nas, VM))).toEqual([s.final.split('/').pop()]);
    expectClean(s);
  });

  it.each([
    ['xxh64', '2'],
    ['sha256', '0'],
    ['sha256', '1'],
    ['sha256', '2'],
  ])(
    'stopped VM, NASBACKUP_DIGEST=%s, NASBACKUP_HASH_WORKERS=%s (on this thread, or workers reading the copy buffers): the same digests',
    async (algorithm, workers) => {
      const s = scenario(`mf-stopped-${algorithm}-w${workers}`, { dataDisk: true, state: 'shut off' });
      const env = { NASBACKUP_HASH_WORKERS: workers, NASBACKUP_DIGEST: algorithm };
      const r = await backup(s, { disks: `${s.rootDisk},${s.dataDisk}`, extra: fullFlags() }, env);
      expect(r.code).toBe(0);
      const m = manifestOf(s);
      expect(m.disks).toHaveLength(2);
      // SHA-256 manifests stay version 1 (no parts), which releases before XXH64 read; XXH64 ones record parts (version 3).
      expect([m.digest.algorithm, m.version, m.digest.partBytes]).toEqual(
        algorithm === 'sha256' ? [algorithm, 1, undefined] : [algorithm, 3, MiB],
      );
      expectDigestsMatch(s);
      expectClean(s);
    },
  );

  it.each(['xxh64', 'sha256'])(
    'running VM, full, %s: manifest inside the size line (du -sb of the folder), digests of each file',
    async (algorithm) => {
      const s = scenario(`mf-full-${algorithm}`, { dataDisk: true });
      const r = await backup(s, { extra: fullFlags() }, { NASBACKUP_DIGEST: algorithm });
      expect(r.code).toBe(0);
      expect(r.stdout).toBe(completedBlock(24 * MiB) + `${duSb(s.final)}\nBITMAP_CREATED=${NEW_BITMAP}\n`);
      expect(manifestOf(s)).toMatchObject({ kind: 'full', mode: 'full', checkpoint: NEW_BITMAP, parent: null, digest: { algorithm } });
      expectDigestsMatch(s);
      expectClean(s);
    },
  );

  it('running VM, incremental: the thin layers only (own clusters), parent and checkpoints named', async () => {
    const s = scenario('mf-inc', {
      dataDisk: true,
      parentOnNas: true,
      domain: {
        checkpoints: [{ name: PARENT_BITMAP, creationTime: 1735689600 }],
        disks: [{ bitmaps: [PARENT_BITMAP] }, { bitmaps: [PARENT_BITMAP] }],
      },
    });
    const r = await backup(s, { extra: incrementalFlags([rootFile(PARENT_TS), dataFile(PARENT_TS)]) });
    expect(r.code).toBe(0);
    const m = manifestOf(s);
    expect(m).toMatchObject({
      mode: 'incremental',
      kind: 'incremental',
      checkpoint: NEW_BITMAP,
      incrementalFrom: PARENT_BITMAP,
      parent: `${VM}/${PARENT_TS}`,
    });
    const root = m.disks.find((d) => d.volumeId === ROOT_VOL)!;
    expect(root.backing).toBe(`../${PARENT_TS}/root.${ROOT_VOL}.qcow2`);
    expect(root.backingFormat).toBe('qcow2');
    expect(root.dataBytes).toBe(ROOT_DIRTY.reduce((a, w) => a + w.length, 0));
    expectDigestsMatch(s);
    expectClean(s);
  });
});
