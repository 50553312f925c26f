// `nasbackup chain verify` proves content: backups written by the CLI (stopped and
// running paths, real qcow2 files) are re-read and compared with their manifests.
// Corruption corpus: a flipped byte in a layer's data cluster, a manifest edited by hand
// (a digest, then its syntax), a missing manifest, a listed file gone, a file not listed;
// each is named by backup, disk and extent. `--backup` checks one point in time and its
// chain; a VM or backup that does not exist is an error.
import { execFileSync } from 'node:child_process';
import { closeSync, mkdirSync, openSync, readFileSync, readSync, renameSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { bindNas, run, type Sandbox } from '../helpers/cli.js';
import { makeImage } from '../helpers/qemu.js';
import { oracleHash } from '../helpers/layer-digest.js';
import { removeTempDirs } from '../helpers/tmp.js';
import {
  backup,
  DATA_VOL,
  dataFile,
  incrementalFlags,
  MiB,
  PARENT_BITMAP,
  PARENT_TS,
  ROOT_VOL,
  rootFile,
  scenario,
  TS,
  VM,
  type Scenario,
} from '../backup/scenario.js';

afterAll(removeTempDirs);

const verify = (sb: Sandbox, ...more: string[]) => run(sb, ['chain', 'verify', ...bindNas(sb), '--vm', VM, ...more]);
const ROOT = `root.${ROOT_VOL}.qcow2`;
const DATA = `datadisk.${DATA_VOL}.qcow2`;

/** Host offset of the first data cluster at or after guest offset `from` in the layer alone. */
function dataHostOffset(file: string, from = 0): number {
  const spec = `json:${JSON.stringify({ driver: 'qcow2', file: { driver: 'file', filename: file }, backing: null })}`;
  const rows = JSON.parse(execFileSync('qemu-img', ['map', '-U', '--output=json', spec], { encoding: 'utf8' })) as Array<{
    start: number;
    length: number;
    data: boolean;
    offset?: number;
  }>;
  const r = rows.find((x) => x.data && x.start + x.length > from && x.offset !== undefined)!;
  return r.offset! + Math.max(0, from - r.start);
}

function flipByte(file: string, at: number): void {
  const fd = openSync(file, 'r+');
  const b = Buffer.alloc(1);
  readSync(fd, b, 0, 1, at);
  writeSync(fd, Buffer.from([b[0]! ^ 0xff]), 0, 1, at);
  closeSync(fd);
}

/** An incremental (running path, with manifest) over a parent seeded without one. */
async function incrementalChain(tag: string, env: NodeJS.ProcessEnv = {}): Promise<Scenario> {
  const s = scenario(tag, {
    dataDisk: true,
    parentOnNas: true,
    domain: {
      checkpoints: [{ name: PARENT_BITMAP, creationTime: 1735689600 }],
      disks: [{ bitmaps: [PARENT_BITMAP] }, { bitmaps: [PARENT_BITMAP] }],
    },
  });
  const r = await backup(s, { extra: incrementalFlags([rootFile(PARENT_TS), dataFile(PARENT_TS)]) }, env);
  expect(r.code).toBe(0);
  return s;
}

describe.concurrent('chain verify: content against the manifests', () => {
  it('an intact chain passes; the parent without a manifest is checked structurally, and says so', async () => {
    const s = await incrementalChain('vc-intact');
    const r = await verify(s.sb);
    expect(r.code).toBe(0);
    expect(r.stdout).toContain(`OK   ${VM}/${TS}/${ROOT}\n`);
    expect(r.stdout).toContain(`warning: ${PARENT_TS}: no manifest: structural checks only\n`);
    expect(r.stdout).not.toContain(`${TS}: no manifest`);
    const j = JSON.parse((await verify(s.sb, '--json')).stdout) as { ok: boolean; warnings: Array<{ code: string; message: string }> };
    expect(j.ok).toBe(true);
    expect(j.warnings).toContainEqual({ code: 'NO_MANIFEST', message: `${PARENT_TS}: no manifest: structural checks only` });
  });

  it('a flipped byte in a data cluster of one layer: that backup, disk and extent, exit 1; qemu-img check alone sees nothing', async () => {
    const s = await incrementalChain('vc-flip');
    const file = join(s.final, ROOT);
    flipByte(file, dataHostOffset(file) + 100);
    expect(() => execFileSync('qemu-img', ['check', '-q', file])).not.toThrow();
    const r = await verify(s.sb);
    expect(r.code).toBe(1);
    const fails = r.stdout.split('\n').filter((l) => l.startsWith('FAIL'));
    // New manifests record 1 MiB parts: the line names the first part that differs, and how many of the extent's do.
    expect(fails).toHaveLength(1);
    expect(fails[0]).toMatch(
      new RegExp(`^FAIL ${VM}/${TS}/${ROOT}: extent 0: digest mismatch \\(part \\d+, guest bytes \\d+-\\d+ of \\d+ parts\\)$`),
    );
    expect(r.stdout).toContain(`OK   ${VM}/${TS}/${DATA}\n`);
    expect(r.stdout).toMatch(/The backup chains of i-2-10-VM have errors\n$/);
  });

  it('a manifest edited by hand: a digest changed alone is refused, a part changed with its extent digest is a mismatch of that part; a broken one is named; a missing one is a warning', async () => {
    const s = await incrementalChain('vc-edit');
    const mf = join(s.final, 'manifest.json');
    const original = readFileSync(mf, 'utf8');
    type Edited = { version: number; disks: Array<{ file: string; extents: Array<{ index: number; digest: string; parts: string }> }> };
    const m = JSON.parse(original) as Edited;
    expect(m.version).toBe(3);
    const d = m.disks.find((x) => x.file === DATA)!;
    const flipHex = (h: string): string => h.replace(/^./, (c) => (c === '0' ? '1' : '0'));
    d.extents[0]!.digest = flipHex(d.extents[0]!.digest);
    writeFileSync(mf, JSON.stringify(m));
    let r = await verify(s.sb);
    expect(r.code).toBe(1);
    // The extent's digest binds its parts: edited alone, the manifest is not to be trusted at all.
    expect(r.stdout).toContain(
      `FAIL ${VM}/${TS}/manifest.json: manifest.json is unusable: disks[${m.disks.indexOf(d)}].extents[0].digest is not the digest of its parts`,
    );
    // Part 0 changed, and the extent's digest made over the parts again (by another XXH64): that part is named.
    const e = (JSON.parse(original) as Edited).disks.find((x) => x.file === DATA)!.extents[0]!;
    const parts = Buffer.from(e.parts, 'base64');
    parts[0]! ^= 0x80;
    const forged = JSON.parse(original) as Edited;
    const fe = forged.disks.find((x) => x.file === DATA)!.extents[0]!;
    fe.parts = parts.toString('base64');
    const h = oracleHash('xxh64');
    h.update(parts);
    fe.digest = h.hex();
    writeFileSync(mf, JSON.stringify(forged));
    r = await verify(s.sb);
    expect(r.code).toBe(1);
    expect(r.stdout.split('\n').filter((l) => l.startsWith('FAIL'))).toEqual([
      `FAIL ${VM}/${TS}/${DATA}: extent 0: digest mismatch (part 0, guest bytes 0-${MiB} of ${parts.length / 8} parts)`,
    ]);

    writeFileSync(mf, original.replace(/"version": [123]/, '"version": "one"'));
    r = await verify(s.sb);
    expect(r.code).toBe(1);
    expect(r.stdout).toContain(`FAIL ${VM}/${TS}/manifest.json: manifest.json is unusable: version "one" is not supported`);

    rmSync(mf);
    r = await verify(s.sb);
    expect(r.code).toBe(0);
    expect(r.stdout).toContain(`warning: ${TS}: no manifest: structural checks only\n`);
  });

  it('a listed file gone, and a disk file the manifest does not list', async () => {
    const s = await incrementalChain('vc-files');
    renameSync(join(s.final, DATA), join(s.final, `datadisk.${'e'.repeat(8)}-0000-4000-8000-000000000009.qcow2`));
    const r = await verify(s.sb, '--backup', `${VM}/${TS}`);
    expect(r.code).toBe(1);
    expect(r.stdout).toContain(`FAIL ${VM}/${TS}/${DATA}: listed in the manifest but missing\n`);
    expect(r.stdout).toContain(`FAIL ${VM}/${TS}/datadisk.eeeeeeee-0000-4000-8000-000000000009.qcow2: not listed in the manifest\n`);
  });

  it('a large disk: the damaged extent is located among several (stopped path, 200 MiB, data in extents 0 and 2)', async () => {
    const s = scenario('vc-large', { state: 'shut off' });
    const disk = join(s.primary, '0d3c2b1a-0000-4000-8000-00000000abcd');
    mkdirSync(s.primary, { recursive: true });
    makeImage(disk, {
      size: 200 * MiB,
      writes: [
        { pattern: 0x21, offset: 0, length: MiB },
        { pattern: 0x22, offset: 130 * MiB, length: 2 * MiB },
      ],
    });
    expect((await backup(s, { disks: disk })).code).toBe(0);
    const file = join(s.final, 'root.0d3c2b1a-0000-4000-8000-00000000abcd.qcow2');
    const m = JSON.parse(readFileSync(join(s.final, 'manifest.json'), 'utf8')) as { disks: Array<{ extents: Array<{ index: number }> }> };
    expect(m.disks[0]!.extents.map((e) => e.index)).toEqual([0, 2]);
    expect((await verify(s.sb)).code).toBe(0);
    flipByte(file, dataHostOffset(file, 131 * MiB));
    const r = await verify(s.sb);
    expect(r.code).toBe(1);
    expect(r.stdout.split('\n').filter((l) => l.startsWith('FAIL'))).toEqual([
      `FAIL ${VM}/${TS}/root.0d3c2b1a-0000-4000-8000-00000000abcd.qcow2: extent 2: digest mismatch (part 3, guest bytes ${131 * MiB}-${132 * MiB} of 64 parts)`,
    ]);
  });

  it.each(['xxh64', 'sha256'])(
    'a legitimate rebase (-o rebase; chain delete uses the same safe rebase) keeps the %s manifest true: the rebased layer`s entry follows it, in its own algorithm',
    async (algorithm) => {
      const s = await incrementalChain(`vc-rebase-${algorithm}`, { NASBACKUP_DIGEST: algorithm });
      const mf = join(s.final, 'manifest.json');
      const before = JSON.parse(readFileSync(mf, 'utf8')) as {
        digest: { algorithm: string };
        disks: Array<{ file: string; backing: string; dataBytes: number }>;
      };
      expect(before.digest.algorithm).toBe(algorithm);
      // An empty full of the same size as the new backing: the rebase copies the parent's data into the layer.
      const NEW = '2025.01.02.00.00.00';
      makeImage(join(s.sb.nas, VM, NEW, ROOT), { size: 16 * MiB });
      const r = await run(s.sb, ['-o', 'rebase', ...bindNas(s.sb), '--rebase-target', rootFile(), '--rebase-new-backing', rootFile(NEW)]);
      expect(r).toMatchObject({ code: 0, stdout: '' });
      const after = JSON.parse(readFileSync(mf, 'utf8')) as typeof before;
      const b = before.disks.find((d) => d.file === ROOT)!;
      const a = after.disks.find((d) => d.file === ROOT)!;
      expect(a.backing).toBe(`../${NEW}/${ROOT}`);
      expect(a.dataBytes).toBeGreaterThan(b.dataBytes);
      expect(after.disks.find((d) => d.file === DATA)).toEqual(before.disks.find((d) => d.file === DATA));
      // Recomputed with the manifest's algorithm (the run's default is the other one for sha256).
      expect(after.digest.algorithm).toBe(algorithm);
      const v = await verify(s.sb, '--backup', TS);
      expect(v.code).toBe(0);
      expect(v.stdout).toContain(`OK   ${VM}/${TS}/${ROOT}`);
    },
  );

  it('--backup: one point in time and its chain only; a backup or VM that does not exist is an error', async () => {
    const s = await incrementalChain('vc-scope');
    // Another backup beside the chain, damaged: not part of the parent's point in time.
    const other = join(s.sb.nas, VM, '2025.01.09.00.00.00');
    makeImage(join(other, ROOT), { size: 16 * MiB });
    flipByte(join(other, ROOT), 0); // bad magic
    let r = await verify(s.sb, '--backup', `${VM}/${PARENT_TS}`);
    expect(r.code).toBe(0);
    expect(r.stdout).toContain(`OK   ${VM}/${PARENT_TS}/${ROOT}`);
    expect(r.stdout).not.toContain(TS);
    expect(r.stdout).not.toContain('2025.01.09');
    r = await verify(s.sb, '--backup', TS);
    expect(r.code).toBe(0);
    expect(r.stdout).toContain(`OK   ${VM}/${PARENT_TS}/${DATA}`);
    expect(r.stdout).toContain(`OK   ${VM}/${TS}/${DATA}`);
    expect(r.stdout).not.toContain('2025.01.09');
    expect((await verify(s.sb)).code).toBe(1);

    r = await verify(s.sb, '--backup', `${VM}/2030.01.01.00.00.00`);
    expect(r.code).not.toBe(0);
    expect(r.stdout).toContain(`No backup ${VM}/2030.01.01.00.00.00 on this NAS`);
    r = await run(s.sb, ['chain', 'verify', ...bindNas(s.sb), '--vm', 'i-9-99-VM']);
    expect(r.code).not.toBe(0);
    expect(r.stdout).toContain('No backups of i-9-99-VM on this NAS');
  });
});
