// Incrementals after libvirt forgot the parent checkpoint (a transient domain that
// restarted keeps the bitmaps in its qcow2 files, not the checkpoint): redefined
// when the bitmap is on every disk, otherwise a full backup said out loud — never a
// fresh bitmap under the parent's name (an "incremental" that silently misses every
// write since the parent).
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { logText } from '../helpers/cli.js';
import { contentSha256 } from '../helpers/qemu.js';
import { removeTempDirs } from '../helpers/tmp.js';
import {
  backup,
  callLines,
  compareImages,
  completedBlock,
  DATA_DIRTY,
  dataFile,
  duSb,
  expectClean,
  fullFlags,
  incrementalFlags,
  MiB,
  NEW_BITMAP,
  normalizedCalls,
  PARENT_BITMAP,
  PARENT_TS,
  qemuInfo,
  ROOT_DIRTY,
  rootFile,
  scenario,
  TS,
  VM,
  type Scenario,
  type ScenarioOptions,
} from './scenario.js';
import type { FakeDisk } from '../fakes/virsh-state.js';
import { execFileSync } from 'node:child_process';
import { imageBitmaps, leaveBitmapsInUse } from '../helpers/bitmaps.js';

afterAll(removeTempDirs);

const sum = (ws: Array<{ length: number }>): number => ws.reduce((a, w) => a + w.length, 0);

/** Two disks, the parent backup on the NAS, libvirt without the parent checkpoint, bitmaps as given. */
function restarted(tag: string, bitmaps: [FakeDisk['bitmaps'], FakeDisk['bitmaps']], o: Partial<ScenarioOptions> = {}): Scenario {
  return scenario(tag, {
    dataDisk: true,
    parentOnNas: true,
    ...o,
    domain: { checkpoints: [], disks: [{ bitmaps: bitmaps[0] }, { bitmaps: bitmaps[1] }] },
  });
}

const parents = [rootFile(PARENT_TS), dataFile(PARENT_TS)];

describe.concurrent('-o backup -M incremental, parent checkpoint unknown to libvirt', () => {
  it('bitmap on every disk: the checkpoint is redefined (name + creationTime) and the incremental is correct', async () => {
    const s = restarted('cp-redefine', [[PARENT_BITMAP], [PARENT_BITMAP]]);
    const r = await backup(s, { extra: incrementalFlags(parents) });
    expect(r.code).toBe(0);
    expect(r.stdout).toBe(completedBlock(sum(ROOT_DIRTY) + sum(DATA_DIRTY)) + `${duSb(s.final)}\nBITMAP_CREATED=${NEW_BITMAP}\n`);

    const calls = normalizedCalls(s);
    const redefine = `checkpoint-create ${VM} --xmlfile <MP>/${VM}/${TS}.partial/redefine-checkpoint.xml --redefine`;
    expect(calls.indexOf(`qemu-monitor-command ${VM} {"execute":"query-block"}`)).toBeLessThan(calls.indexOf(redefine));
    expect(calls.indexOf(redefine)).toBeLessThan(calls.findIndex((c) => c.startsWith('backup-begin')));
    // Only the redefine: never a checkpoint created afresh under the parent's name.
    expect(calls.filter((c) => c.startsWith('checkpoint-create'))).toEqual([redefine]);
    const xml = s.fake.callsOf('checkpoint-create')[0]!.inputs!['--xmlfile']!;
    expect(xml).toContain(`<name>${PARENT_BITMAP}</name>`);
    expect(xml).toContain('<creationTime>1735689600</creationTime>');
    expect(xml).toMatch(
      new RegExp(
        `<disk name="vda" checkpoint="bitmap" bitmap="${PARENT_BITMAP}"/>\\s*<disk name="vdb" checkpoint="bitmap" bitmap="${PARENT_BITMAP}"/>`,
      ),
    );
    expect(s.fake.callsOf('backup-begin')[0]!.inputs!['--backupxml']).toContain(`<incremental>${PARENT_BITMAP}</incremental>`);

    for (const [file, live] of [
      [rootFile(), s.rootDisk],
      [dataFile(), s.dataDisk!],
    ] as const) {
      const abs = join(s.sb.nas, file);
      expect(qemuInfo(abs)['backing-filename']).toBe(`../${PARENT_TS}/${file.split('/').pop()}`);
      expect(contentSha256(abs, s.sb.root)).toBe(contentSha256(live, s.sb.root));
    }
    expect(logText(s.sb)).toContain(`Registered existing checkpoint ${PARENT_BITMAP} of ${VM} (bitmap present on every disk)`);
    expect(s.fake.checkpointNames(VM)).toEqual([NEW_BITMAP]);
    expectClean(s);
  });

  it('bitmap missing on one disk (rebase-era): a full backup, INCREMENTAL_FALLBACK=full (…) first, BITMAP_CREATED last', async () => {
    const s = restarted('cp-fallback', [[PARENT_BITMAP], []]);
    const r = await backup(s, { extra: incrementalFlags(parents) });
    expect(r.code).toBe(0);
    expect(r.stdout).toBe(
      `INCREMENTAL_FALLBACK=full (parent bitmap ${PARENT_BITMAP} missing on disk vdb)\n` +
        completedBlock(24 * MiB) +
        `${duSb(s.final)}\nBITMAP_CREATED=${NEW_BITMAP}\n`,
    );
    const calls = callLines(s);
    expect(calls.filter((c) => c.startsWith('checkpoint-create'))).toEqual([]);
    const begin = s.fake.callsOf('backup-begin')[0]!;
    expect(begin.inputs!['--backupxml']).not.toContain('<incremental>');
    expect(begin.inputs!['--checkpointxml']).toContain(`<name>${NEW_BITMAP}</name>`);
    for (const [file, live] of [
      [rootFile(), s.rootDisk],
      [dataFile(), s.dataDisk!],
    ] as const) {
      const abs = join(s.sb.nas, file);
      expect(qemuInfo(abs)['backing-filename']).toBeUndefined();
      expect(compareImages(abs, live)).toBe('Images are identical.');
    }
    expect(s.fake.checkpointNames(VM)).toEqual([NEW_BITMAP]);
    expect(s.fake.bitmaps(VM, 'vdb')).toEqual([NEW_BITMAP]);
    expectClean(s);
  });

  it('bitmap inconsistent on one disk (merged agent, query-block with top-level dirty-bitmaps): INCREMENTAL_FALLBACK=true', async () => {
    const s = restarted('cp-inconsistent', [[{ name: PARENT_BITMAP, inconsistent: true }], [PARENT_BITMAP]], { queryBlock: 'top-level' });
    const r = await backup(s, { extra: incrementalFlags(parents) }, { NASBACKUP_AGENT_PROFILE: 'merged' });
    expect(r.code).toBe(0);
    expect(r.stdout).toBe(`INCREMENTAL_FALLBACK=true\n` + completedBlock(24 * MiB) + `${duSb(s.final)}\n`);
    expect(callLines(s).filter((c) => c.startsWith('checkpoint-create'))).toEqual([]);
    expect(logText(s.sb)).toContain(`not possible (parent bitmap ${PARENT_BITMAP} on disk vda is not usable (inconsistent))`);
    expectClean(s);
  });

  it('redefine refused by libvirt: a full backup with the reason, not a failure', async () => {
    const err = "error: checkpoint inconsistent: missing or broken bitmap 'backup-1735689600' for disk 'vda'\n";
    const s = restarted('cp-redefine-fails', [[PARENT_BITMAP], [PARENT_BITMAP]], { fail: { 'checkpoint-create': { stderr: err } } });
    const r = await backup(s, { extra: incrementalFlags(parents) });
    expect(r.code).toBe(0);
    expect(r.stdout.split('\n')[0]).toBe(
      `INCREMENTAL_FALLBACK=full (cannot register the existing checkpoint ${PARENT_BITMAP}: ${err.trim()})`,
    );
    expect(s.fake.callsOf('backup-begin')[0]!.inputs!['--backupxml']).not.toContain('<incremental>');
    expect(s.fake.checkpointNames(VM)).toEqual([NEW_BITMAP]);
    expectClean(s);
  });

  it('a G1 agent (--parent-path, root only): the data disk parent is taken from beside it', async () => {
    const s = scenario('cp-g1', {
      dataDisk: true,
      parentOnNas: true,
      domain: {
        checkpoints: [{ name: PARENT_BITMAP, creationTime: 1735689600 }],
        disks: [{ bitmaps: [PARENT_BITMAP] }, { bitmaps: [PARENT_BITMAP] }],
      },
    });
    const r = await backup(s, {
      extra: ['-M', 'incremental', '--bitmap-new', NEW_BITMAP, '--bitmap-parent', PARENT_BITMAP, '--parent-path', rootFile(PARENT_TS)],
    });
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/\nBITMAP_CREATED=backup-1736035200\n$/);
    expect(qemuInfo(join(s.sb.nas, dataFile()))['backing-filename']).toBe(`../${PARENT_TS}/${dataFile().split('/').pop()}`);
    expect(contentSha256(join(s.sb.nas, dataFile()), s.sb.root)).toBe(contentSha256(s.dataDisk!, s.sb.root));
    expectClean(s);
  });

  it('the new checkpoint left by an earlier attempt of this backup: removed first, then taken again', async () => {
    const s = scenario('cp-stale', {
      domain: { checkpoints: [{ name: NEW_BITMAP, creationTime: 1736035100 }], disks: [{ bitmaps: [NEW_BITMAP] }] },
    });
    const r = await backup(s, { extra: fullFlags() });
    expect(r.code).toBe(0);
    const calls = callLines(s);
    expect(calls.indexOf(`checkpoint-delete ${VM} ${NEW_BITMAP}`)).toBeLessThan(calls.findIndex((c) => c.startsWith('backup-begin')));
    expect(s.fake.checkpointNames(VM)).toEqual([NEW_BITMAP]);
    expect(s.fake.checkpoint(VM, NEW_BITMAP)!.creationTime).not.toBe(1736035100);
    expectClean(s);
  });
});

/**
 * The parent checkpoint registered in libvirt, its bitmap in the real qcow2 live disks
 * (the fake's query-block reads them with qemu-img info); `prepare` then breaks it.
 */
async function registered(
  tag: string,
  prepare: (s: Scenario) => Promise<void> | void,
  o: Partial<ScenarioOptions> = {},
): Promise<Scenario> {
  const s = scenario(tag, {
    dataDisk: true,
    parentOnNas: true,
    ...o,
    domain: {
      checkpoints: [{ name: PARENT_BITMAP, creationTime: 1735689600 }],
      disks: [{ bitmapsInImage: true }, { bitmapsInImage: true }],
    },
  });
  for (const disk of [s.rootDisk, s.dataDisk!]) execFileSync('qemu-img', ['bitmap', '--add', disk, PARENT_BITMAP]);
  await prepare(s);
  return s;
}

/** Every backup file reads as its live disk: no write since the parent is missing. */
function expectNothingMissing(s: Scenario): void {
  for (const [file, live] of [
    [rootFile(), s.rootDisk],
    [dataFile(), s.dataDisk!],
  ] as const) {
    expect(contentSha256(join(s.sb.nas, file), s.sb.root)).toBe(contentSha256(live, s.sb.root));
  }
}

describe.concurrent('-o backup -M incremental, a parent bitmap that does not record is never a base', () => {
  it('registered, bitmap recording on every disk (real images): the incremental from it, nothing missing', async () => {
    const s = await registered('bm-ok', () => {});
    const r = await backup(s, { extra: incrementalFlags(parents) });
    expect(r.code).toBe(0);
    expect(r.stdout).not.toContain('INCREMENTAL_FALLBACK');
    expect(callLines(s)).toContain(`qemu-monitor-command ${VM} {"execute":"query-block"}`);
    expect(s.fake.callsOf('backup-begin')[0]!.inputs!['--backupxml']).toContain(`<incremental>${PARENT_BITMAP}</incremental>`);
    expect(qemuInfo(join(s.sb.nas, rootFile()))['backing-filename']).toBe(`../${PARENT_TS}/${rootFile().split('/').pop()}`);
    expectNothingMissing(s);
    expect(s.fake.checkpointNames(VM)).toEqual([NEW_BITMAP]);
    expect(imageBitmaps(s.dataDisk!)).toEqual([{ name: NEW_BITMAP, flags: ['auto'] }]);
    expectClean(s);
  });

  const broken: Array<[string, (s: Scenario) => Promise<void> | void, string]> = [
    [
      'disabled on vdb (qemu-img bitmap --disable)',
      (s) => void execFileSync('qemu-img', ['bitmap', '--disable', s.dataDisk!, PARENT_BITMAP]),
      'on disk vdb is not usable (disabled)',
    ],
    ['in-use on vda (left by a crash)', (s) => leaveBitmapsInUse(s.rootDisk), 'on disk vda is not usable (inconsistent)'],
    ['missing on vdb', (s) => void execFileSync('qemu-img', ['bitmap', '--remove', s.dataDisk!, PARENT_BITMAP]), 'missing on disk vdb'],
  ];
  it.each(broken)(
    'registered, bitmap %s: a full backup with the marker, nothing missing; the checkpoint is replaced',
    async (_name, breakIt, why) => {
      const s = await registered('bm-broken', breakIt);
      const r = await backup(s, { extra: incrementalFlags(parents) });
      expect(r.code).toBe(0);
      expect(r.stdout).toBe(
        `INCREMENTAL_FALLBACK=full (parent bitmap ${PARENT_BITMAP} ${why})\n` +
          completedBlock(24 * MiB) +
          `${duSb(s.final)}\nBITMAP_CREATED=${NEW_BITMAP}\n`,
      );
      const begin = s.fake.callsOf('backup-begin')[0]!;
      expect(begin.inputs!['--backupxml']).not.toContain('<incremental>');
      expect(begin.inputs!['--checkpointxml']).toContain(`<name>${NEW_BITMAP}</name>`);
      for (const file of [rootFile(), dataFile()]) expect(qemuInfo(join(s.sb.nas, file))['backing-filename']).toBeUndefined();
      expectNothingMissing(s);
      // As for a missing parent: only the new checkpoint is left, its bitmap recording on every disk.
      const calls = callLines(s);
      expect(calls.indexOf(`checkpoint-delete ${VM} ${PARENT_BITMAP}`)).toBeGreaterThan(
        calls.findIndex((c) => c.startsWith('backup-begin')),
      );
      expect(s.fake.checkpointNames(VM)).toEqual([NEW_BITMAP]);
      for (const disk of [s.rootDisk, s.dataDisk!]) expect(imageBitmaps(disk)).toEqual([{ name: NEW_BITMAP, flags: ['auto'] }]);
      expect(logText(s.sb)).toContain(`Removed checkpoint ${PARENT_BITMAP} of ${VM}: its bitmap cannot be trusted`);
      expectClean(s);
    },
  );

  it('not registered (a restart), bitmap disabled on vda: no redefine, a full backup, nothing missing (merged agent)', async () => {
    const s = await registered('bm-restart-disabled', (s) => {
      execFileSync('qemu-img', ['bitmap', '--disable', s.rootDisk, PARENT_BITMAP]);
      s.fake.update((st) => void (st.domains.find((d) => d.name === VM)!.checkpoints = []));
    });
    const r = await backup(s, { extra: incrementalFlags(parents) }, { NASBACKUP_AGENT_PROFILE: 'merged' });
    expect(r.code).toBe(0);
    expect(r.stdout).toBe(`INCREMENTAL_FALLBACK=true\n` + completedBlock(24 * MiB) + `${duSb(s.final)}\n`);
    const calls = callLines(s);
    expect(calls.filter((c) => c.startsWith('checkpoint-create') || c.startsWith('checkpoint-delete'))).toEqual([]);
    expect(logText(s.sb)).toContain(`not possible (parent bitmap ${PARENT_BITMAP} on disk vda is not usable (disabled))`);
    expectNothingMissing(s);
    expect(s.fake.checkpointNames(VM)).toEqual([NEW_BITMAP]);
    expectClean(s);
  });

  it('registered, but query-block fails: a full backup (the bitmaps cannot be seen), the parent checkpoint is kept', async () => {
    const s = await registered('bm-qb-fails', () => {}, {
      fail: { 'qemu-monitor-command:query-block': { stderr: 'error: Timed out during operation: cannot acquire state change lock\n' } },
    });
    const r = await backup(s, { extra: incrementalFlags(parents) });
    expect(r.code).toBe(0);
    expect(r.stdout.split('\n')[0]).toMatch(
      /^INCREMENTAL_FALLBACK=full \(cannot inspect the disks' bitmaps: .*cannot acquire state change lock/,
    );
    expectNothingMissing(s);
    expect(s.fake.checkpointNames(VM)).toEqual([PARENT_BITMAP, NEW_BITMAP]);
    expectClean(s);
  });
});
