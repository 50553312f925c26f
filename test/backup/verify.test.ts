// --verify (#12898, issue 19 item 4): the backup just written is proved before it is
// published (the structural checks of chain verify over its chain, then its content
// re-read and compared with the manifest); a backup that fails is removed, one line on
// stdout, BACKUP_VERIFY_FAILED, exit 1. The faults are injected at a real tool boundary:
// a `dd` stand-in first on PATH that, when asked to drop the cached pages of a file of the
// unfinished backup (just before its content is re-read, after the manifest was written),
// first damages a data byte; a `qemu-img` stand-in that, after a real `convert` of a raw
// disk, zeroes the refcount of one of the copy's data clusters (the structure is damaged,
// the data and so the manifest are not).
import { existsSync, readFileSync } from 'node:fs';
import { afterAll, describe, expect, it } from 'vitest';
import { writeShim } from '../helpers/cli.js';
import { removeTempDirs } from '../helpers/tmp.js';
import { snapshotTree } from '../helpers/tree.js';
import {
  rootDiskAsRaw,
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

const REAL_DD = '/usr/bin/dd';

/** `dd if=<file of a .partial folder> iflag=nocache` (verify's cache drop): first overwrite one byte of its first own data cluster. */
function corruptBeforeReread(s: Scenario): void {
  writeShim(
    s.sb,
    'dd',
    [
      'case "$1 $2" in',
      '"if="*.partial/*" iflag=nocache")',
      '  f="${1#if=}"',
      `  off=$(${REAL_QEMU_IMG} map -U --output=json "$f" | sed -n 's/.*"depth": 0,.*"data": true,.*"offset": \\([0-9]*\\).*/\\1/p' | head -n 1)`,
      `  [ -n "$off" ] && printf "\\377\\376" | ${REAL_DD} of="$f" bs=1 seek=$((off + 100)) conv=notrunc status=none;;`,
      'esac',
      `exec ${REAL_DD} "$@"`,
    ].join('\n'),
  );
}

/**
 * `qemu-img convert` into a `.partial` folder: the real copy, then the refcount of its first data
 * cluster zeroed (refcount_bits 16; the first refcount block covers it) — a structurally corrupt
 * image whose data, and so whose manifest, are intact.
 */
function zeroRefcountAfterConvert(s: Scenario): void {
  writeShim(
    s.sb,
    'qemu-img',
    [
      'for last; do :; done',
      `${REAL_QEMU_IMG} "$@" || exit $?`,
      'case "$1 $last" in',
      '"convert "*.partial/*)',
      '  f="$last"',
      `  off=$(${REAL_QEMU_IMG} map -U --output=json "$f" | sed -n 's/.*"depth": 0,.*"data": true,.*"offset": \\([0-9]*\\).*/\\1/p' | head -n 1)`,
      '  bits=$(od -An -tu4 --endian=big -j20 -N4 "$f" | tr -d " ")',
      '  rt=$(od -An -tu8 --endian=big -j48 -N8 "$f" | tr -d " ")',
      '  rb=$(od -An -tu8 --endian=big -j"$rt" -N8 "$f" | tr -d " ")',
      `  [ -n "$off" ] && printf "\\000\\000" | ${REAL_DD} of="$f" bs=1 seek=$((rb + 2 * (off >> bits))) conv=notrunc status=none;;`,
      'esac',
    ].join('\n'),
  );
}

const log = (s: Scenario): string => readFileSync(s.sb.logFile, 'utf8');

describe.concurrent('-o backup --verify', () => {
  it.each(['xxh64', 'sha256'])(
    'stopped VM, %s: proved (structure and content re-read), then published; stdout as without --verify',
    async (algorithm) => {
      const s = scenario(`vf-stopped-${algorithm}`, { dataDisk: true, state: 'shut off' });
      const r = await backup(
        s,
        { disks: `${s.rootDisk},${s.dataDisk}`, extra: [...fullFlags(), '--verify'] },
        { NASBACKUP_DIGEST: algorithm },
      );
      expect(r.code).toBe(0);
      expect(JSON.parse(readFileSync(`${s.final}/manifest.json`, 'utf8'))).toMatchObject({ digest: { algorithm } });
      expect(r.stdout.trim().split('\n').slice(1)).toHaveLength(2);
      expect(existsSync(`${s.final}/manifest.json`)).toBe(true);
      expect(log(s)).toMatch(new RegExp(`Verify of ${TS}: 2 new file\\(s\\), 2 layer\\(s\\) checked in \\d+ ms: OK`));
      expect(log(s)).toMatch(new RegExp(`Structural check of \\S+/${VM}/${TS}\\.partial/root\\.\\S+: clean \\[native\\]`));
      expect(log(s)).toMatch(new RegExp(`dd if=\\S+/${VM}/${TS}\\.partial/root\\.\\S+ iflag=nocache count=0`));
      expectClean(s);
    },
  );

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
    expect(log(s)).toMatch(new RegExp(`Structural check of \\S+/${VM}/${PARENT_TS}/root\\.\\S+: clean \\[native\\]`));
    expectClean(s);
  });

  it('running VM: a data byte damaged after the manifest was written → backup removed, one line, checkpoint removed', async () => {
    const s = scenario('vf-bad-running', { dataDisk: true });
    corruptBeforeReread(s);
    const before = snapshotTree(s.sb.nas);
    const r = await backup(s, { extra: [...fullFlags(), '--verify'] });
    expect(r.code).toBe(1);
    expect(r.stdout).toMatch(
      new RegExp(
        `^Backup verification failed, backup removed: ${TS}/root\\.[0-9a-f-]+\\.qcow2: extent 0: digest mismatch \\(part \\d+, guest bytes \\d+-\\d+ of \\d+ parts\\) \\(and 1 more problem\\(s\\), see the log\\)\\n$`,
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
    rootDiskAsRaw(s);
    zeroRefcountAfterConvert(s);
    const before = snapshotTree(s.sb.nas);
    const r = await backup(s, { disks: s.rootDisk, extra: [...fullFlags(), '--verify'] });
    expect(r.code).toBe(1);
    expect(r.stdout).toMatch(
      new RegExp(`^Backup verification failed, backup removed: ${TS}/root\\.[0-9a-f-]+\\.qcow2: structural check failed: [^\\n]*\\n$`),
    );
    expect(log(s)).toContain('ERROR [BACKUP_VERIFY_FAILED]');
    expect(snapshotTree(s.sb.nas)).toEqual(before);
    expectClean(s);
  });

  it('without --verify the same damage goes unnoticed by the backup (what --verify is for)', async () => {
    const s = scenario('vf-off', { state: 'shut off' });
    rootDiskAsRaw(s);
    zeroRefcountAfterConvert(s);
    const r = await backup(s, { disks: s.rootDisk, extra: fullFlags() });
    expect(r.code).toBe(0);
    expect(log(s)).not.toContain('Verify of');
    expectClean(s);
  });
});
