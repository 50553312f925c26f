// -o backup of a stopped VM (-d lists its disks): a native copy of each qcow2 disk (qemu-img
// convert for raw sources and for qcow2 the native reader refuses), bitmaps seeded into the sources only once every copy succeeded, stdout one integer
// per line (no empty line, no `ls` columns), and a failed copy stops the run at once.
import { execFileSync } from 'node:child_process';
import { closeSync, openSync, readFileSync, statSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { digestLayer } from '../../lib/store/layer-digest.js';
import { BIN, logText, writeShim } from '../helpers/cli.js';
import { bitmapIsEmpty, imageBitmaps, leaveBitmapsInUse } from '../helpers/bitmaps.js';
import { snapshotTree } from '../helpers/tree.js';
import { removeTempDirs } from '../helpers/tmp.js';
import {
  backup,
  backupArgv,
  bitmapsIn,
  compareImages,
  DATA_VOL,
  duSb,
  expectClean,
  fullFlags,
  incrementalFlags,
  modeOf,
  NEW_BITMAP,
  othersOnNas,
  PARENT_BITMAP,
  PARENT_TS,
  rootFile,
  dataFile,
  ROOT_VOL,
  scenario,
  seedOtherBackups,
  TS,
  VM,
  type Scenario,
} from './scenario.js';

afterAll(removeTempDirs);

const MP = String.raw`\S+/csbackup\.[A-Za-z0-9]{5}`;
const esc = (s: string): string => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');

const stopped = (tag: string): Scenario => scenario(tag, { dataDisk: true, state: 'shut off' });
/** One size per file in the order `ls` lists the folder (C locale): datadisk before root, as the original printed them. */
const sizeLines = (s: Scenario): string =>
  [`datadisk.${DATA_VOL}.qcow2`, `root.${ROOT_VOL}.qcow2`].map((f) => `${statSync(join(s.final, f)).size}\n`).join('');

/** The qemu-img calls in the order the agent log recorded them. */
const qemuImgCalls = (s: Scenario): string[] =>
  [...logText(s.sb).matchAll(/exec: qemu-img (\w+)( --add)? /g)].map((m) => m[1]! + (m[2] ?? ''));

describe.concurrent('-o backup, stopped VM', () => {
  it('legacy: one copy per disk, identical content, stdout one size per line in ls order, no bitmaps, no domain calls', async () => {
    const s = stopped('stp-legacy');
    seedOtherBackups(s.sb);
    const before = othersOnNas(s.sb);
    const r = await backup(s, { disks: `${s.rootDisk},${s.dataDisk}` });
    expect(r).toMatchObject({ code: 0, stderr: '' });
    expect(r.stdout).toBe(sizeLines(s));
    expect(compareImages(join(s.sb.nas, rootFile()), s.rootDisk)).toBe('Images are identical.');
    expect(compareImages(join(s.sb.nas, dataFile()), s.dataDisk!)).toBe('Images are identical.');
    expect(modeOf(join(s.sb.nas, rootFile()))).toBe('0644');
    expect(bitmapsIn(s.rootDisk)).toEqual([]);
    expect(s.fake.names()).toEqual(['version', 'list']);
    // Copied natively, with a throughput line per disk; the copies are clean images.
    expect(qemuImgCalls(s)).toEqual([]);
    expect(logText(s.sb)).toMatch(
      new RegExp(
        `Copied ${esc(s.rootDisk)} to \\S+: \\d+ bytes virtual, \\d+ bytes of data read, \\d+ bytes written in [\\d.]+ s \\([\\d.]+ MiB/s\\)`,
      ),
    );
    expect(execFileSync('qemu-img', ['check', join(s.sb.nas, rootFile())], { encoding: 'utf8' })).toMatch(/No errors were found/);
    expect(othersOnNas(s.sb)).toEqual(before);
    expectClean(s);
  });

  it('on a terminal: a progress bar per disk on stderr; stdout keeps its bytes', () => {
    const s = stopped('stp-tty');
    // `script` gives the run a terminal for stdout and stderr; what it captures is both streams.
    const cmd = [BIN, ...backupArgv(s, { disks: `${s.rootDisk},${s.dataDisk}` })].map((a) => `'${a}'`).join(' ');
    const seen = execFileSync('script', ['-qec', cmd, '/dev/null'], { env: { ...process.env, ...s.sb.env }, encoding: 'utf8' });
    expect(seen).toMatch(new RegExp(`${VM} disk 1/2 \\[[^\\]]*\\] 100% \\| \\d+/\\d+ MiB`));
    expect(seen).toMatch(new RegExp(`${VM} disk 2/2 \\[`));
    // Without a terminal (the agent), the same run prints the sizes only: the other tests here.
    expect(seen.replace(/\r/g, '')).toContain(sizeLines(s));
    expectClean(s);
  });

  it('-M full (rebase-era): bitmaps seeded after all copies, BITMAP_CREATED before the sizes', async () => {
    const s = stopped('stp-full');
    const r = await backup(s, { disks: `${s.rootDisk},${s.dataDisk}`, extra: fullFlags() });
    expect(r.code).toBe(0);
    expect(r.stdout).toBe(`BITMAP_CREATED=${NEW_BITMAP}\n` + sizeLines(s));
    expect(qemuImgCalls(s)).toEqual(['bitmap --add', 'bitmap --add']);
    expect(bitmapsIn(s.rootDisk)).toEqual([NEW_BITMAP]);
    expect(bitmapsIn(s.dataDisk!)).toEqual([NEW_BITMAP]);
    // The copies carry no bitmap (convert does not copy them).
    expect(bitmapsIn(join(s.sb.nas, rootFile()))).toEqual([]);
    // The manifest's digests were computed while copying: equal to a re-read of the written file.
    const m = JSON.parse(readFileSync(join(s.final, 'manifest.json'), 'utf8')) as {
      digest: { extentBytes: number; partBytes: number };
      disks: Array<{ file: string; extents: unknown }>;
    };
    for (const d of m.disks) expect(d.extents).toEqual((await digestLayer(join(s.final, d.file), m.digest)).extents);
    expect(logText(s.sb)).not.toMatch(/exec: sync/);
    expectClean(s);
  });

  it('-M incremental (merged agent): INCREMENTAL_FALLBACK=true then only integers; the parents are not needed', async () => {
    const s = stopped('stp-inc-merged');
    const r = await backup(
      s,
      { disks: `${s.rootDisk},${s.dataDisk}`, extra: incrementalFlags([rootFile(PARENT_TS), dataFile(PARENT_TS)]) },
      {
        NASBACKUP_AGENT_PROFILE: 'merged',
      },
    );
    expect(r.code).toBe(0);
    expect(r.stdout).toBe('INCREMENTAL_FALLBACK=true\n' + sizeLines(s));
    expect(bitmapsIn(s.rootDisk)).toEqual([NEW_BITMAP]);
    expectClean(s);
  });

  it('-M incremental (rebase-era): INCREMENTAL_FALLBACK=full (…) first, then BITMAP_CREATED, then the sizes', async () => {
    const s = stopped('stp-inc');
    const r = await backup(s, {
      disks: `${s.rootDisk},${s.dataDisk}`,
      extra: incrementalFlags([rootFile(PARENT_TS), dataFile(PARENT_TS)]),
    });
    expect(r.code).toBe(0);
    expect(r.stdout).toBe(
      `INCREMENTAL_FALLBACK=full (VM stopped — incremental requires running VM)\nBITMAP_CREATED=${NEW_BITMAP}\n` + sizeLines(s),
    );
    expectClean(s);
  });

  // The original checked the incremental arguments only on the running path: a stopped
  // VM got its full copy, reported as a fallback, whatever parents were (not) sent.
  const partial: Array<[string, string[], NodeJS.ProcessEnv, (s: Scenario) => string]> = [
    [
      'no parent arguments at all (rebase-era)',
      ['-M', 'incremental', '--bitmap-new', NEW_BITMAP],
      {},
      (s) => `INCREMENTAL_FALLBACK=full (VM stopped — incremental requires running VM)\nBITMAP_CREATED=${NEW_BITMAP}\n` + sizeLines(s),
    ],
    [
      '--bitmap-parent but no --parent-paths (merged)',
      ['-M', 'incremental', '--bitmap-new', NEW_BITMAP, '--bitmap-parent', PARENT_BITMAP],
      { NASBACKUP_AGENT_PROFILE: 'merged' },
      (s) => 'INCREMENTAL_FALLBACK=true\n' + sizeLines(s),
    ],
    [
      'a parent path to a backup that does not exist, no --bitmap-parent (newest)',
      ['-M', 'incremental', '--bitmap-new', NEW_BITMAP, '--parent-paths', rootFile('2024.12.31.00.00.00')],
      { NASBACKUP_AGENT_PROFILE: 'newest' },
      (s) => `INCREMENTAL_FALLBACK=true\nBACKUP_SIZE_TOTAL=${duSb(s.final)}\n` + sizeLines(s),
    ],
  ];
  it.each(partial)(
    '-M incremental with partial parent arguments, %s: a full copy reported as a fallback',
    async (_n, extra, env, expected) => {
      const s = stopped('stp-inc-partial');
      const r = await backup(s, { disks: `${s.rootDisk},${s.dataDisk}`, extra }, env);
      expect(r).toMatchObject({ code: 0, stderr: '' });
      expect(r.stdout).toBe(expected(s));
      expect(compareImages(join(s.sb.nas, rootFile()), s.rootDisk)).toBe('Images are identical.');
      expect(compareImages(join(s.sb.nas, dataFile()), s.dataDisk!)).toBe('Images are identical.');
      expect(bitmapsIn(s.rootDisk)).toEqual([NEW_BITMAP]);
      expect(bitmapsIn(s.dataDisk!)).toEqual([NEW_BITMAP]);
      expectClean(s);
    },
  );

  it('-M incremental without --bitmap-new either: the full copy, the fallback marker, no bitmap and no BITMAP_CREATED', async () => {
    const s = stopped('stp-inc-bare');
    const r = await backup(s, { disks: `${s.rootDisk},${s.dataDisk}`, extra: ['-M', 'incremental'] });
    expect(r).toMatchObject({
      code: 0,
      stderr: '',
      stdout: 'INCREMENTAL_FALLBACK=full (VM stopped — incremental requires running VM)\n' + sizeLines(s),
    });
    expect(bitmapsIn(s.rootDisk)).toEqual([]);
    expectClean(s);
  });

  it('a raw data disk: copied to qcow2; no bitmap can be seeded in it, so no BITMAP_CREATED', async () => {
    const s = stopped('stp-raw');
    const raw = join(s.primary, DATA_VOL);
    execFileSync('qemu-img', ['convert', '-O', 'raw', s.dataDisk!, `${raw}.raw`]);
    execFileSync('mv', [`${raw}.raw`, raw]);
    const r = await backup(s, { disks: `${s.rootDisk},${raw}`, extra: fullFlags() });
    expect(r.code).toBe(0);
    expect(r.stdout).toBe(sizeLines(s));
    expect(compareImages(join(s.sb.nas, dataFile()), raw)).toBe('Images are identical.');
    expect(bitmapsIn(s.rootDisk)).toEqual([NEW_BITMAP]);
    expect(logText(s.sb)).toContain(`No bitmap on ${raw}: only qcow2 files can carry one`);
    expectClean(s);
  });

  /** A bitmap under the new name already in the source, with changes recorded in it. */
  const dirtyBitmap = (disk: string, ...then: string[]): void => {
    execFileSync('qemu-img', ['bitmap', '--add', disk, NEW_BITMAP]);
    execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 1M 64k', disk], { stdio: 'ignore' });
    for (const action of then) execFileSync('qemu-img', ['bitmap', action, disk, NEW_BITMAP]);
    expect(bitmapIsEmpty(disk, NEW_BITMAP)).toBe(false);
  };
  /** The qemu-img bitmap/info calls of the run, e.g. "bitmap --remove --add". */
  const bitmapCalls = (s: Scenario): string[] => [...logText(s.sb).matchAll(/exec: qemu-img (bitmap(?: --\w+)+|info) /g)].map((m) => m[1]!);

  it('the bitmap already exists, disabled on one disk and enabled on the other: both replaced by empty, recording ones; BITMAP_CREATED', async () => {
    const s = stopped('stp-bm-disabled');
    dirtyBitmap(s.rootDisk, '--disable');
    dirtyBitmap(s.dataDisk!);
    expect(imageBitmaps(s.rootDisk)).toEqual([{ name: NEW_BITMAP, flags: [] }]);
    const r = await backup(s, { disks: `${s.rootDisk},${s.dataDisk}`, extra: fullFlags() });
    expect(r.code).toBe(0);
    expect(r.stdout).toBe(`BITMAP_CREATED=${NEW_BITMAP}\n` + sizeLines(s));
    for (const disk of [s.rootDisk, s.dataDisk!]) {
      expect(imageBitmaps(disk)).toEqual([{ name: NEW_BITMAP, flags: ['auto'] }]);
      expect(bitmapIsEmpty(disk, NEW_BITMAP)).toBe(true);
    }
    expect(bitmapCalls(s)).toEqual(['bitmap --add', 'bitmap --remove --add', 'info', 'bitmap --add', 'bitmap --remove --add', 'info']);
    expect(logText(s.sb)).toContain(`Replaced the existing bitmap ${NEW_BITMAP} on ${s.rootDisk} with an empty, recording one`);
    expectClean(s);
  });

  it('the bitmap already exists in-use (a crash): it cannot be cleared, so it is replaced; BITMAP_CREATED', async () => {
    const s = stopped('stp-bm-inuse');
    dirtyBitmap(s.dataDisk!);
    await leaveBitmapsInUse(s.dataDisk!);
    expect(imageBitmaps(s.dataDisk!)).toEqual([{ name: NEW_BITMAP, flags: ['in-use', 'auto'] }]);
    const r = await backup(s, { disks: `${s.rootDisk},${s.dataDisk}`, extra: fullFlags() });
    expect(r.code).toBe(0);
    expect(r.stdout).toBe(`BITMAP_CREATED=${NEW_BITMAP}\n` + sizeLines(s));
    expect(imageBitmaps(s.dataDisk!)).toEqual([{ name: NEW_BITMAP, flags: ['auto'] }]);
    expect(bitmapIsEmpty(s.dataDisk!, NEW_BITMAP)).toBe(true);
    expect(imageBitmaps(s.rootDisk)).toEqual([{ name: NEW_BITMAP, flags: ['auto'] }]);
    expectClean(s);
  });

  it('an existing disabled bitmap that cannot be replaced: the backup succeeds without BITMAP_CREATED, and the log says why', async () => {
    const s = stopped('stp-bm-stuck');
    dirtyBitmap(s.dataDisk!, '--disable');
    const err = 'qemu-img: Operation remove on bitmap backup-1736035200 failed: injected';
    writeShim(s.sb, 'qemu-img', `case " $* " in *" --remove "*) echo '${err}' >&2; exit 1;; esac\nexec /usr/bin/qemu-img "$@"`);
    const r = await backup(s, { disks: `${s.rootDisk},${s.dataDisk}`, extra: fullFlags() });
    expect(r.code).toBe(0);
    expect(r.stdout).toBe(sizeLines(s));
    expect(compareImages(join(s.sb.nas, dataFile()), s.dataDisk!)).toBe('Images are identical.');
    // Still the old, disabled bitmap: never reported as the base of the next incremental.
    expect(imageBitmaps(s.dataDisk!)).toEqual([{ name: NEW_BITMAP, flags: [] }]);
    const log = logText(s.sb);
    expect(log).toContain(`Warning: bitmap ${NEW_BITMAP} already exists on ${s.dataDisk} and could not be replaced: ${err}`);
    expect(log).toContain(`Not reporting BITMAP_CREATED=${NEW_BITMAP}: it is not an empty, recording bitmap on every disk`);
    expectClean(s);
  });

  const broken: Array<[string, (s: Scenario) => void, RegExp]> = [
    [
      'a corrupt qcow2 header',
      (s) => {
        const fd = openSync(s.dataDisk!, 'r+');
        writeSync(fd, Buffer.from([0, 0, 0, 9]), 0, 4, 4); // qcow2 version 9
        closeSync(fd);
      },
      /Unsupported qcow2 version 9\n$/,
    ],
    [
      'a backing file that is gone',
      (s) => execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-u', '-b', 'template-gone.qcow2', '-F', 'qcow2', s.dataDisk!, '8M']),
      /Could not open backing file: .*template-gone\.qcow2.*No such file or directory\n$/,
    ],
  ];
  it.each(broken)(
    'the second copy fails (%s): stop at once, no bitmap added anywhere, nothing left, exit 1',
    async (_name, breakIt, why) => {
      const s = stopped('stp-convert-fails');
      breakIt(s);
      const before = snapshotTree(s.sb.nas);
      const r = await backup(s, { disks: `${s.rootDisk},${s.dataDisk}`, extra: fullFlags() });
      expect(r.code).toBe(1);
      expect(r.stdout).toMatch(
        new RegExp(
          `^qemu-img convert failed for ${esc(s.dataDisk!)} ${MP}/${VM}/${esc(TS)}\\.partial/datadisk\\.${DATA_VOL}\\.qcow2\nqemu-img: Could not open '${esc(s.dataDisk!)}': `,
        ),
      );
      expect(r.stdout).toMatch(why);
      // The first disk copied natively; the second refused by the native reader, so qemu-img words the error.
      expect(qemuImgCalls(s)).toEqual(['convert']);
      expect(logText(s.sb)).toContain(`Copying ${s.dataDisk} with qemu-img convert: the native reader refuses it`);
      expect(bitmapsIn(s.rootDisk)).toEqual([]);
      expect(snapshotTree(s.sb.nas)).toEqual(before);
      expectClean(s);
    },
  );

  it('a source disk that does not exist: refused before anything is mounted', async () => {
    const s = stopped('stp-missing');
    const gone = join(s.primary, '00000000-0000-4000-8000-000000000000');
    const r = await backup(s, { disks: `${s.rootDisk},${gone}`, extra: fullFlags() });
    expect(r).toMatchObject({ code: 1, stdout: `Source disk does not exist: ${gone}\n` });
    expect(s.fake.names()).toEqual(['version', 'list']);
    expect(bitmapsIn(s.rootDisk)).toEqual([]);
    expect(snapshotTree(s.sb.nas)).toEqual([]);
    expectClean(s);
  });
});
