// --verify (#12898, issue 19 item 4): the backup just written is proved before it is
// published (the structural checks of chain verify over its chain, then its content
// re-read and compared with the manifest); a backup that fails is removed, one line on
// stdout, BACKUP_VERIFY_FAILED, exit 1. The faults are injected at a real tool boundary:
// a qemu-img stand-in first on PATH that, when asked to check a file of the unfinished
// backup, damages it (a data byte, after the manifest was written) or reports it corrupt,
// then runs the real qemu-img.
import { existsSync, readFileSync } from 'node:fs';
import { afterAll, describe, expect, it } from 'vitest';
import { writeShim } from '../helpers/cli.js';
import { removeTempDirs } from '../helpers/tmp.js';
import { snapshotTree } from '../helpers/tree.js';
import {
  backup,
  completedBlock,
  dataFile,
  duSb,
  expectClean,
  fullFlags,
  incrementalFlags,
  MiB,
  NEW_BITMAP,
  PARENT_BITMAP,
  PARENT_TS,
  rootFile,
  scenario,
  TS,
  VM,
  type Scenario,
} from './scenario.js';

afterAll(removeTempDirs);

const REAL_QEMU_IMG = '/usr/bin/qemu-img';

/** `qemu-img check` of a file in a `.partial` folder: first overwrite one byte of its first own data cluster. */
function corruptOnCheck(s: Scenario): void {
  writeShim(
    s.sb,
    'qemu-img',
    [
      'for last; do :; done',
      'case "$1 $last" in',
      '"check "*.partial/*)',
      `  off=$(${REAL_QEMU_IMG} map -U --output=json "$last" | sed -n 's/.*"depth": 0,.*"data": true,.*"offset": \\([0-9]*\\).*/\\1/p' | head -n 1)`,
      '  [ -n "$off" ] && printf "\\377\\376" | dd of="$last" bs=1 seek=$((off + 100)) conv=notrunc status=none;;',
      'esac',
      `exec ${REAL_QEMU_IMG} "$@"`,
    ].join('\n'),
  );
}

/** `qemu-img check` of a file in a `.partial` folder reports corruption (exit 2), as a damaged image would. */
function corruptReportOnCheck(s: Scenario): void {
  writeShim(
    s.sb,
    'qemu-img',
    [
      'for last; do :; done',
      'case "$1 $last" in',
      '"check "*.partial/*) echo "ERROR cluster 5 refcount=0 reference=1" >&2; exit 2;;',
      'esac',
      `exec ${REAL_QEMU_IMG} "$@"`,
    ].join('\n'),
  );
}

const log = (s: Scenario): string => readFileSync(s.sb.logFile, 'utf8');

describe.concurrent('-o backup --verify', () => {
  it('stopped VM: proved (structure and content re-read), then published; stdout as without --verify', async () => {
    const s = scenario('vf-stopped', { dataDisk: true, state: 'shut off' });
    const r = await backup(s, { disks: `${s.rootDisk},${s.dataDisk}`, extra: [...fullFlags(), '--verify'] });
    expect(r.code).toBe(0);
    expect(r.stdout.trim().split('\n').slice(1)).toHaveLength(2);
    expect(existsSync(`${s.final}/manifest.json`)).toBe(true);
    expect(log(s)).toMatch(new RegExp(`Verify of ${TS}: 2 new file\\(s\\), 2 layer\\(s\\) checked in \\d+ ms: OK`));
    expect(log(s)).toMatch(new RegExp(`qemu-img check -U --output=json \\S+/${VM}/${TS}\\.partial/root\\.`));
    expect(log(s)).toMatch(new RegExp(`dd if=\\S+/${VM}/${TS}\\.partial/root\\.\\S+ iflag=nocache count=0`));
    expectClean(s);
  });

  it('running VM, full: proved, then published; stdout byte for byte as without --verify', async () => {
    const s = scenario('vf-full', { dataDisk: true });
    const r = await backup(s, { extra: [...fullFlags(), '--verify'] });
    expect(r.code).toBe(0);
    expect(r.stdout).toBe(completedBlock(24 * MiB) + `${duSb(s.final)}\nBITMAP_CREATED=${NEW_BITMAP}\n`);
    expect(log(s)).toMatch(new RegExp(`Verify of ${TS}: 2 new file\\(s\\), 2 layer\\(s\\) checked in \\d+ ms: OK`));
    expectClean(s);
  });

  it('running VM, incremental: the new layers and the parents below them are checked', async () => {
    const s = scenario('vf-inc', {
      dataDisk: true,
      parentOnNas: true,
      domain: {
        checkpoints: [{ name: PARENT_BITMAP, creationTime: 1735689600 }],
        disks: [{ bitmaps: [PARENT_BITMAP] }, { bitmaps: [PARENT_BITMAP] }],
      },
    });
    const r = await backup(s, { extra: [...incrementalFlags([rootFile(PARENT_TS), dataFile(PARENT_TS)]), '--verify'] });
    expect(r.code).toBe(0);
    expect(log(s)).toMatch(new RegExp(`Verify of ${TS}: 2 new file\\(s\\), 4 layer\\(s\\) checked in \\d+ ms: OK`));
    expect(log(s)).toMatch(new RegExp(`qemu-img check -U --output=json \\S+/${VM}/${PARENT_TS}/root\\.`));
    expectClean(s);
  });

  it('running VM: a data byte damaged after the manifest was written → backup removed, one line, checkpoint removed', async () => {
    const s = scenario('vf-bad-running', { dataDisk: true });
    corruptOnCheck(s);
    const before = snapshotTree(s.sb.nas);
    const r = await backup(s, { extra: [...fullFlags(), '--verify'] });
    expect(r.code).toBe(1);
    expect(r.stdout).toMatch(
      new RegExp(
        `^Backup verification failed, backup removed: ${TS}/root\\.[0-9a-f-]+\\.qcow2: extent 0: digest mismatch \\(and 1 more problem\\(s\\), see the log\\)\\n$`,
      ),
    );
    expect(log(s)).toContain('ERROR [BACKUP_VERIFY_FAILED]');
    expect(log(s)).toMatch(/Verify: .*datadisk\.[0-9a-f-]+\.qcow2: extent 0: digest mismatch/);
    expect(existsSync(s.final)).toBe(false);
    expect(snapshotTree(s.sb.nas)).toEqual(before);
    expect(s.fake.checkpointNames(VM)).toEqual([]);
    expect(s.fake.domain(VM).state).toBe('running');
    expectClean(s);
  });

  it('stopped VM: the structural check fails → backup removed, one line, nothing left', async () => {
    const s = scenario('vf-bad-stopped', { state: 'shut off' });
    corruptReportOnCheck(s);
    const before = snapshotTree(s.sb.nas);
    const r = await backup(s, { disks: s.rootDisk, extra: [...fullFlags(), '--verify'] });
    expect(r.code).toBe(1);
    expect(r.stdout).toMatch(
      new RegExp(
        `^Backup verification failed, backup removed: ${TS}/root\\.[0-9a-f-]+\\.qcow2: qemu-img check failed \\(exit 2\\): ERROR cluster 5 refcount=0 reference=1\\n$`,
      ),
    );
    expect(log(s)).toContain('ERROR [BACKUP_VERIFY_FAILED]');
    expect(snapshotTree(s.sb.nas)).toEqual(before);
    expectClean(s);
  });

  it('without --verify the same damage goes unnoticed by the backup (what --verify is for)', async () => {
    const s = scenario('vf-off', { state: 'shut off' });
    corruptReportOnCheck(s);
    const r = await backup(s, { disks: s.rootDisk, extra: fullFlags() });
    expect(r.code).toBe(0);
    expect(log(s)).not.toContain('Verify of');
    expectClean(s);
  });
});
