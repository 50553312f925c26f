// -o backup -M incremental of a stopped VM (-d): the offline incremental. The parent is a
// real stopped full backup of ours (-M full, which seeds the parent bitmap on the disks),
// then qemu-io writes into the disks (recorded in the bitmap, as a running QEMU records
// them), then the incremental: only the dirty clusters, backed by the parent file, no
// fallback marker; restored (the chain read through) it equals the disk. Every
// untrustworthy input falls back to the full copy with the marker and the reason logged.
import { execFileSync, spawnSync } from 'node:child_process';
import { closeSync, openSync, readFileSync, readSync, renameSync, rmSync, statSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { bindNas, logText, run, writeShim } from '../helpers/cli.js';
import { imageBitmaps, leaveBitmapsInUse } from '../helpers/bitmaps.js';
import { removeTempDirs } from '../helpers/tmp.js';
import { planOffline } from '../../lib/ops/backup/stopped-incremental.js';
import type { BackupArgs } from '../../lib/ops/backup/args.js';
import type { OpContext } from '../../lib/ops/context.js';
import {
  backup,
  bitmapsIn,
  compareImages,
  DATA_VOL,
  dataFile,
  expectClean,
  fullFlags,
  incrementalFlags,
  MiB,
  NEW_BITMAP,
  PARENT_BITMAP,
  PARENT_TS,
  qemuInfo,
  rootFile,
  ROOT_VOL,
  scenario,
  TS,
  VM,
  type Scenario,
} from './scenario.js';

afterAll(removeTempDirs);

const FALLBACK = 'INCREMENTAL_FALLBACK=true\n';

const sizeLines = (s: Scenario, ts = TS): string =>
  [`datadisk.${DATA_VOL}.qcow2`, `root.${ROOT_VOL}.qcow2`].map((f) => `${statSync(join(s.sb.nas, VM, ts, f)).size}\n`).join('');

function qemuIo(path: string, cmds: string[]): void {
  const r = spawnSync('qemu-io', ['-f', 'qcow2', ...cmds.flatMap((c) => ['-c', c]), path], { encoding: 'utf8' });
  if (r.status !== 0 || /error|failed/i.test(r.stdout)) throw new Error(`qemu-io failed: ${r.stdout}${r.stderr}`);
}

/** A stopped VM with a parent full backup of ours (bitmap PARENT_BITMAP seeded on both disks), then guest writes. */
async function withParent(tag: string): Promise<Scenario> {
  const s = scenario(tag, { dataDisk: true, state: 'shut off' });
  const r = await backup(
    s,
    { path: `${VM}/${PARENT_TS}`, disks: `${s.rootDisk},${s.dataDisk}`, extra: fullFlags(PARENT_BITMAP) },
    {
      NASBACKUP_AGENT_PROFILE: 'merged',
    },
  );
  expect(r).toMatchObject({ code: 0, stderr: '' });
  expect(bitmapsIn(s.rootDisk)).toEqual([PARENT_BITMAP]);
  // What the guest wrote since: data, zeros over the parent's data, a discard.
  qemuIo(s.rootDisk, ['write -P 0x77 3M 192k', 'write -z 0 64k', 'discard 4M 256k']);
  qemuIo(s.dataDisk!, ['write -P 0x88 7M 4k']);
  return s;
}

const parents = (): string[] => [rootFile(PARENT_TS), dataFile(PARENT_TS)];

async function incremental(
  s: Scenario,
  env: NodeJS.ProcessEnv = { NASBACKUP_AGENT_PROFILE: 'merged' },
  extra = incrementalFlags(parents()),
) {
  return backup(s, { disks: `${s.rootDisk},${s.dataDisk}`, extra }, env);
}

describe('-o backup -M incremental, stopped VM: offline incremental', () => {
  it('only the dirty clusters, backed by the parent file; restores to the disk; bitmaps moved on; no marker', async () => {
    const s = await withParent('off-inc');
    const r = await incremental(s);
    expect(r).toMatchObject({ code: 0, stderr: '' });
    expect(r.stdout).toBe(sizeLines(s));
    for (const [file, parent, disk] of [
      [rootFile(), rootFile(PARENT_TS), s.rootDisk],
      [dataFile(), dataFile(PARENT_TS), s.dataDisk!],
    ] as const) {
      const abs = join(s.sb.nas, file);
      const info = qemuInfo(abs);
      expect(info['backing-filename']).toBe(`../${PARENT_TS}/${parent.split('/').at(-1)}`);
      expect(info['backing-filename-format']).toBe('qcow2');
      expect(info['virtual-size']).toBe(qemuInfo(disk)['virtual-size']);
      expect(compareImages(abs, disk)).toBe('Images are identical.');
      expect(spawnSync('qemu-img', ['check', abs]).status).toBe(0);
      expect(bitmapsIn(disk)).toEqual([NEW_BITMAP]);
      expect(imageBitmaps(disk)).toEqual([{ name: NEW_BITMAP, flags: ['auto'] }]);
    }
    // The root incremental holds 4 dirty 64 KiB clusters of data (3M..3M+192k) and zeros at 0 and 4M.
    const map = JSON.parse(execFileSync('qemu-img', ['map', '--output=json', join(s.sb.nas, rootFile())], { encoding: 'utf8' })) as Array<{
      start: number;
      length: number;
      depth: number;
      data: boolean;
      zero: boolean;
    }>;
    const top = map.filter((e) => e.depth === 0);
    expect(top.filter((e) => e.data).map((e) => [e.start, e.length])).toEqual([[3 * MiB, 192 * 1024]]);
    expect(top.filter((e) => !e.data && e.zero).map((e) => [e.start, e.length])).toEqual([
      [0, 64 * 1024],
      [4 * MiB, 256 * 1024],
    ]);
    const manifest = JSON.parse(readFileSync(join(s.final, 'manifest.json'), 'utf8')) as Record<string, unknown>;
    expect(manifest).toMatchObject({
      kind: 'incremental',
      mode: 'incremental',
      checkpoint: NEW_BITMAP,
      incrementalFrom: PARENT_BITMAP,
      parent: `${VM}/${PARENT_TS}`,
    });
    // The digests streamed while writing are what chain verify reads back from every layer.
    const v = await run(s.sb, ['chain', 'verify', ...bindNas(s.sb), '--vm', VM, '--backup', `${VM}/${TS}`]);
    expect(v.code).toBe(0);
    expect(v.stdout).toContain(`OK   ${rootFile()}\n`);
    expect(v.stdout).toContain(`OK   ${dataFile(PARENT_TS)}\n`);
    expect(v.stdout).not.toContain('no manifest');
    const log = logText(s.sb);
    expect(log).not.toContain('not possible');
    expect(log).toContain(`Removed bitmap ${PARENT_BITMAP} from ${s.rootDisk}`);
    expectClean(s);
  });

  it('rebase-era agent: BITMAP_CREATED, then the sizes, no fallback marker', async () => {
    const s = await withParent('off-inc-g2');
    const r = await incremental(s, {});
    expect(r).toMatchObject({ code: 0, stderr: '', stdout: `BITMAP_CREATED=${NEW_BITMAP}\n` + sizeLines(s) });
    expect(compareImages(join(s.sb.nas, rootFile()), s.rootDisk)).toBe('Images are identical.');
    expectClean(s);
  });

  it('a disk that grew since the parent: the grown tail is copied too, same virtual size as the disk', async () => {
    const s = await withParent('off-inc-grow');
    execFileSync('qemu-img', ['resize', '-q', s.dataDisk!, String(12 * MiB)]);
    qemuIo(s.dataDisk!, ['write -P 0x99 10M 64k']);
    const r = await incremental(s);
    expect(r).toMatchObject({ code: 0, stdout: sizeLines(s) });
    expect(qemuInfo(join(s.sb.nas, dataFile()))['virtual-size']).toBe(12 * MiB);
    expect(compareImages(join(s.sb.nas, dataFile()), s.dataDisk!)).toBe('Images are identical.');
    expectClean(s);
  });

  it('a second offline incremental chains onto the first', async () => {
    const s = await withParent('off-inc-2');
    expect((await incremental(s)).code).toBe(0);
    qemuIo(s.rootDisk, ['write -P 0x31 9M 1M']);
    const next = '2025.01.05.00.00.00';
    const r = await backup(
      s,
      {
        path: `${VM}/${next}`,
        disks: `${s.rootDisk},${s.dataDisk}`,
        extra: incrementalFlags([rootFile(), dataFile()], 'backup-1736121600', NEW_BITMAP),
      },
      { NASBACKUP_AGENT_PROFILE: 'merged' },
    );
    expect(r).toMatchObject({ code: 0, stdout: sizeLines(s, next) });
    expect(compareImages(join(s.sb.nas, VM, next, `root.${ROOT_VOL}.qcow2`), s.rootDisk)).toBe('Images are identical.');
    expect(bitmapsIn(s.rootDisk)).toEqual(['backup-1736121600']);
  });
});

// ---- fallbacks ----------------------------------------------------------------------------

function poke(path: string, at: number, bytes: Buffer): void {
  const fd = openSync(path, 'r+');
  try {
    writeSync(fd, bytes, 0, bytes.length, at);
  } finally {
    closeSync(fd);
  }
}
function peek(path: string, at: number, n: number): Buffer {
  const fd = openSync(path, 'r');
  try {
    const b = Buffer.alloc(n);
    readSync(fd, b, 0, n, at);
    return b;
  } finally {
    closeSync(fd);
  }
}

const fallbacks: Array<
  [string, (s: Scenario) => Promise<void> | void, (s: Scenario) => string, { bitmapsAfter?: (s: Scenario) => void }?]
> = [
  [
    'the parent bitmap is missing on one disk',
    (s) => execFileSync('qemu-img', ['bitmap', '--remove', s.dataDisk!, PARENT_BITMAP]),
    (s) => `parent bitmap ${PARENT_BITMAP} missing on disk ${s.dataDisk}`,
  ],
  [
    'the parent bitmap is disabled on one disk',
    (s) => execFileSync('qemu-img', ['bitmap', '--disable', s.dataDisk!, PARENT_BITMAP]),
    (s) => `parent bitmap ${PARENT_BITMAP} on disk ${s.dataDisk} is disabled`,
  ],
  [
    'the parent bitmap was left in-use by a crash',
    (s) => leaveBitmapsInUse(s.rootDisk),
    (s) => `parent bitmap ${PARENT_BITMAP} on disk ${s.rootDisk} is in-use (not saved cleanly)`,
  ],
  [
    'a program without bitmap support wrote to a disk (autoclear bit clear: every bitmap stale)',
    (s) => poke(s.rootDisk, 88, Buffer.alloc(8)),
    (s) => `the bitmaps of disk ${s.rootDisk} are stale`,
  ],
  [
    'a raw data disk',
    (s) => {
      execFileSync('qemu-img', ['convert', '-O', 'raw', s.dataDisk!, `${s.dataDisk}.raw`]);
      renameSync(`${s.dataDisk}.raw`, s.dataDisk!);
    },
    (s) => `disk ${s.dataDisk} is raw (not qcow2): it carries no bitmap`,
  ],
  [
    'the parent file is not where the arguments say',
    (s) => rmSync(join(s.sb.nas, dataFile(PARENT_TS))),
    () => `/${VM}/${PARENT_TS}/datadisk.${DATA_VOL}.qcow2 does not exist`,
  ],
  [
    'the parent backup was taken at another checkpoint (its manifest says so)',
    (s) => {
      const p = join(s.sb.nas, VM, PARENT_TS, 'manifest.json');
      const m = JSON.parse(readFileSync(p, 'utf8')) as { checkpoint: string };
      m.checkpoint = 'backup-1735000000';
      writeFileSync(p, JSON.stringify(m));
    },
    () => `parent backup ${VM}/${PARENT_TS} was taken at checkpoint backup-1735000000, not at bitmap ${PARENT_BITMAP}`,
  ],
  [
    'the parent backup has no manifest',
    (s) => rmSync(join(s.sb.nas, VM, PARENT_TS, 'manifest.json')),
    () => `parent backup ${VM}/${PARENT_TS} has no manifest`,
  ],
  [
    'the parent file was replaced by another image',
    (s) => execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', join(s.sb.nas, rootFile(PARENT_TS)), String(16 * MiB)]),
    () => `is not the file its manifest describes`,
  ],
  [
    'a disk that shrank',
    (s) => execFileSync('qemu-img', ['resize', '-q', '--shrink', s.dataDisk!, String(4 * MiB)]),
    (s) => `disk ${s.dataDisk} shrank since the parent backup`,
  ],
  [
    'qemu-img info disagrees with the native reader (granularity)',
    (s) =>
      void writeShim(
        s.sb,
        'qemu-img',
        `if [ "$1" = info ]; then /usr/bin/qemu-img "$@" | sed 's/"granularity": 65536/"granularity": 131072/'; exit 0; fi\nexec /usr/bin/qemu-img "$@"`,
      ),
    (s) => `qemu-img info disagrees on bitmap ${PARENT_BITMAP} of ${s.rootDisk}`,
  ],
];

describe('-M incremental, stopped VM: anything untrustworthy is the full copy, with the marker and the reason', () => {
  it.each(fallbacks)('%s', async (_name, breakIt, reason) => {
    const s = await withParent('off-fb');
    await breakIt(s);
    const r = await incremental(s);
    expect(r).toMatchObject({ code: 0, stderr: '' });
    expect(r.stdout).toBe(FALLBACK + sizeLines(s));
    // A full copy: no backing file, the disk's content.
    for (const [file, disk] of [
      [rootFile(), s.rootDisk],
      [dataFile(), s.dataDisk!],
    ] as const) {
      expect(qemuInfo(join(s.sb.nas, file))['backing-filename']).toBeUndefined();
      if (!peek(disk, 0, 4).equals(Buffer.from('QFI\xfb', 'latin1'))) continue; // the raw disk: compared below
      expect(compareImages(join(s.sb.nas, file), disk)).toBe('Images are identical.');
    }
    const log = logText(s.sb);
    expect(log).toContain(`Offline incremental of ${VM} not possible (`);
    expect(log).toContain(reason(s));
    expect(JSON.parse(readFileSync(join(s.final, 'manifest.json'), 'utf8'))).toMatchObject({ kind: 'full', parent: null });
    expectClean(s);
  });
});

describe('planOffline, an rbd disk', () => {
  it('is a full copy before anything is opened: an rbd image carries no qcow2 bitmap', async () => {
    const args = {
      vm: VM,
      mode: 'incremental',
      bitmapNew: NEW_BITMAP,
      bitmapParent: PARENT_BITMAP,
      parentPaths: [rootFile(PARENT_TS)],
    } as unknown as BackupArgs;
    const src = `rbd:cloudstack/${ROOT_VOL}:mon_host=10.0.0.9`;
    const plan = await planOffline(
      {} as OpContext,
      args,
      [{ src, volId: ROOT_VOL, file: `root.${ROOT_VOL}.qcow2` }],
      ['raw'],
      '/nonexistent',
    );
    expect(plan).toEqual({ kind: 'full', reason: `disk ${src} is raw (rbd): it carries no bitmap`, seen: [] });
  });
});
