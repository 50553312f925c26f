// The native dirty-bitmap reader against QEMU's own view: on random images (qemu-io
// writes, zero writes and discards after `qemu-img bitmap --add`), every dirty range it
// reads equals what qemu-nbd exports for the bitmap (`nbdinfo --map=qemu:dirty-bitmap:…`,
// qemu-nbd started by nbdinfo on a private socket), and the directory (names, flags,
// granularity) equals `qemu-img info`. Malformed directories and tables are refused with
// their codes.
import { execFileSync, spawnSync } from 'node:child_process';
import { closeSync, openSync, readSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import fc from 'fast-check';
import { afterAll, describe, expect, it } from 'vitest';
import { dirtyRanges, readBitmapDirectory, type GuestRange } from '../../lib/qcow2/bitmaps.js';
import { Qcow2Image } from '../../lib/qcow2/image.js';
import { readBitmaps } from '../../lib/qcow2/info.js';
import { Qcow2Error } from '../../lib/qcow2/errors.js';
import { leaveBitmapsInUse } from '../helpers/bitmaps.js';
import { removeTempDirs, tempDir } from '../helpers/tmp.js';
import { numRuns, qemuInfo } from './gen.js';

afterAll(removeTempDirs);

const KiB = 1024;
const MiB = 1024 * KiB;

/** QEMU's dirty ranges of `name`, from qemu-nbd -B through nbdinfo (merged). */
function qemuDirty(path: string, name: string): GuestRange[] {
  const out = execFileSync(
    'nbdinfo',
    ['--json', `--map=qemu:dirty-bitmap:${name}`, '--', '[', 'qemu-nbd', '-r', '-f', 'qcow2', '-B', name, path, ']'],
    { encoding: 'utf8', maxBuffer: 256 << 20, timeout: 60_000 },
  );
  const merged: GuestRange[] = [];
  for (const e of JSON.parse(out) as Array<{ offset: number; length: number; type: number }>) {
    if ((e.type & 1) === 0) continue;
    const last = merged.at(-1);
    if (last && last.offset + last.length === e.offset) last.length += e.length;
    else merged.push({ offset: e.offset, length: e.length });
  }
  return merged;
}

async function nativeDirty(path: string, name: string): Promise<GuestRange[]> {
  const img = await Qcow2Image.open(path);
  try {
    const dir = await readBitmapDirectory(img);
    const bm = dir.bitmaps.find((b) => b.name === name);
    if (!bm) throw new Error(`no bitmap ${name}`);
    const out: GuestRange[] = [];
    for await (const r of dirtyRanges(img, bm)) out.push({ ...r });
    return out;
  } finally {
    await img.close();
  }
}

async function nativeList(path: string): Promise<Array<{ name: string; granularity: number; flags: string[] }>> {
  const img = await Qcow2Image.open(path);
  try {
    return await readBitmaps(img);
  } finally {
    await img.close();
  }
}

function qemuList(path: string): Array<{ name: string; granularity: number; flags: string[] }> {
  const fs = (qemuInfo(path)['format-specific'] as { data?: { bitmaps?: Array<{ name: string; granularity: number; flags: string[] }> } })
    .data;
  return (fs?.bitmaps ?? []).map((b) => ({ name: b.name, granularity: b.granularity, flags: b.flags }));
}

function qemuIo(path: string, cmds: string[]): void {
  if (cmds.length === 0) return;
  const r = spawnSync('qemu-io', ['-f', 'qcow2', ...cmds.flatMap((c) => ['-c', c]), path], { encoding: 'utf8' });
  if (r.status !== 0 || /error|failed/i.test(r.stdout)) throw new Error(`qemu-io failed: ${r.stdout}${r.stderr}`);
}

interface Case {
  clusterBits: number;
  granularityBits: number;
  /** Second bitmap's granularity (added between the two batches of writes, then maybe disabled). */
  granularity2Bits: number;
  disableSecond: boolean;
  size: number;
  before: string[];
  after: string[];
}

const caseArb: fc.Arbitrary<Case> = fc
  .record({
    clusterBits: fc.constantFrom(12, 13, 16, 17, 21),
    granularityBits: fc.constantFrom(16, 16, 17, 19, 21, 9, 12),
    granularity2Bits: fc.constantFrom(16, 18, 20, 21),
    disableSecond: fc.boolean(),
    // Up to 256 MiB sparse: with 4 KiB clusters and a small granularity the table has several entries.
    units: fc.integer({ min: 1, max: 4096 }),
  })
  .chain(({ units, ...rest }) => {
    const size = units * 64 * KiB;
    const off = fc.integer({ min: 0, max: size / 512 - 1 }).map((s) => s * 512);
    const op = fc.oneof(
      {
        weight: 3,
        arbitrary: fc
          .tuple(off, fc.integer({ min: 1, max: 4096 }), fc.integer({ min: 1, max: 255 }))
          .map(([o, n, p]) => `write -P ${p} ${o} ${Math.min(n * 512, size - o)}`),
      },
      {
        weight: 1,
        arbitrary: fc.tuple(off, fc.integer({ min: 1, max: 8192 })).map(([o, n]) => `write -z ${o} ${Math.min(n * 512, size - o)}`),
      },
      {
        weight: 1,
        arbitrary: fc.tuple(off, fc.integer({ min: 1, max: 8192 })).map(([o, n]) => `discard ${o} ${Math.min(n * 512, size - o)}`),
      },
    );
    return fc
      .record({
        before: fc.array(op, { maxLength: 4 }),
        after: fc.array(op, { maxLength: 8 }),
      })
      .map((ops) => ({ ...rest, size, ...ops }));
  });

describe('native dirty-bitmap reader vs qemu-nbd/nbdinfo and qemu-img info', () => {
  it('random images: every bitmap reads the same dirty ranges, flags and granularity as QEMU', async () => {
    const dir = tempDir('bitmaps-rand');
    let n = 0;
    await fc.assert(
      fc.asyncProperty(caseArb, async (c) => {
        const p = join(dir, `img${n++}.qcow2`);
        execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', `cluster_size=${1 << c.clusterBits}`, p, String(c.size)]);
        execFileSync('qemu-img', ['bitmap', '--add', '-g', String(2 ** c.granularityBits), p, 'b0']);
        qemuIo(p, c.before);
        execFileSync('qemu-img', ['bitmap', '--add', '-g', String(2 ** c.granularity2Bits), p, 'b1']);
        qemuIo(p, c.after);
        if (c.disableSecond) execFileSync('qemu-img', ['bitmap', '--disable', p, 'b1']);
        expect(await nativeList(p)).toEqual(qemuList(p));
        for (const name of ['b0', 'b1']) expect(await nativeDirty(p, name)).toEqual(qemuDirty(p, name));
      }),
      { numRuns: numRuns(10) },
    );
  });

  it('a bitmap that covers the whole disk and one that is empty', async () => {
    const dir = tempDir('bitmaps-fixed');
    const p = join(dir, 'a.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', p, String(96 * MiB + 512)]);
    execFileSync('qemu-img', ['bitmap', '--add', '-g', '512', p, 'all']);
    execFileSync('qemu-img', ['bitmap', '--add', p, 'none']);
    qemuIo(p, [`write -P 7 0 ${96 * MiB + 512}`]);
    execFileSync('qemu-img', ['bitmap', '--remove', p, 'none']);
    execFileSync('qemu-img', ['bitmap', '--add', p, 'none']);
    expect(await nativeDirty(p, 'all')).toEqual([{ offset: 0, length: 96 * MiB + 512 }]);
    expect(await nativeDirty(p, 'all')).toEqual(qemuDirty(p, 'all'));
    expect(await nativeDirty(p, 'none')).toEqual([]);
    expect(qemuDirty(p, 'none')).toEqual([]);
  });

  it('an all-ones table entry (no data cluster) reads as every bit set, as QEMU reads it', async () => {
    const dir = tempDir('bitmaps-ones');
    const p = join(dir, 'a.qcow2');
    // 4 KiB clusters, 512-byte granularity: one table entry covers 16 MiB; 40 MiB → 3 entries.
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', p, String(40 * MiB)]);
    execFileSync('qemu-img', ['bitmap', '--add', '-g', '512', p, 'b']);
    qemuIo(p, ['write -P 1 1M 4k']);
    const loc = await locate(p, 'b');
    poke(p, loc.tableOffset + 8, u64(1n)); // entry 1: all ones
    expect(await nativeDirty(p, 'b')).toEqual([
      { offset: MiB, length: 4 * KiB },
      { offset: 16 * MiB, length: 16 * MiB },
    ]);
    expect(await nativeDirty(p, 'b')).toEqual(qemuDirty(p, 'b'));
  });

  it('flags: a disabled bitmap is not auto; a crashed writer leaves it in-use, and its ranges are refused', async () => {
    const dir = tempDir('bitmaps-flags');
    const p = join(dir, 'a.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', p, String(8 * MiB)]);
    execFileSync('qemu-img', ['bitmap', '--add', p, 'off']);
    execFileSync('qemu-img', ['bitmap', '--disable', p, 'off']);
    execFileSync('qemu-img', ['bitmap', '--add', p, 'on']);
    expect(await nativeList(p)).toEqual(qemuList(p));
    expect((await nativeList(p)).map((b) => b.flags)).toEqual([[], ['auto']]);
    await leaveBitmapsInUse(p);
    expect(await nativeList(p)).toEqual(qemuList(p));
    expect((await nativeList(p)).find((b) => b.name === 'on')!.flags).toEqual(['in-use', 'auto']);
    await expect(nativeDirty(p, 'on')).rejects.toMatchObject({ code: 'QCOW2_UNSUPPORTED_FEATURE' });
  });

  it('autoclear bit 0 clear (a writer that ignored the bitmaps): every bitmap is stale, none listed (as qemu-img info)', async () => {
    const dir = tempDir('bitmaps-stale');
    const p = join(dir, 'a.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', p, String(8 * MiB)]);
    execFileSync('qemu-img', ['bitmap', '--add', p, 'b']);
    poke(p, 88, u64(0n));
    const img = await Qcow2Image.open(p);
    try {
      expect(await readBitmapDirectory(img)).toEqual({ state: 'stale', bitmaps: [] });
    } finally {
      await img.close();
    }
    expect(qemuList(p)).toEqual([]);
  });
});

// ---- malformed input ------------------------------------------------------------------------

function u64(v: bigint): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(v);
  return b;
}
function u32(v: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(v);
  return b;
}
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

/** Where the bitmaps extension's data, the directory and the named bitmap's entry and table are. */
async function locate(path: string, name: string): Promise<{ extData: number; dirOffset: number; entry: number; tableOffset: number }> {
  const h = peek(path, 0, 4096);
  let off = h.readUInt32BE(100);
  let extData = -1;
  while (off + 8 <= h.length) {
    const type = h.readUInt32BE(off);
    const len = h.readUInt32BE(off + 4);
    if (type === 0) break;
    if (type === 0x23852875) extData = off + 8;
    off += 8 + Math.ceil(len / 8) * 8;
  }
  const dirOffset = Number(h.readBigUInt64BE(extData + 16));
  const dirSize = Number(h.readBigUInt64BE(extData + 8));
  const dir = peek(path, dirOffset, dirSize);
  let p = 0;
  while (p < dirSize) {
    const nameSize = dir.readUInt16BE(p + 18);
    const extra = dir.readUInt32BE(p + 20);
    if (dir.subarray(p + 24 + extra, p + 24 + extra + nameSize).toString() === name)
      return { extData, dirOffset, entry: dirOffset + p, tableOffset: Number(dir.readBigUInt64BE(p)) };
    p = Math.ceil((p + 24 + extra + nameSize) / 8) * 8;
  }
  throw new Error(`no bitmap ${name}`);
}

type Breaker = (path: string, at: Awaited<ReturnType<typeof locate>>) => void;

describe('malformed bitmap metadata is refused with its code', () => {
  const cases: Array<[string, Breaker, string, 'directory' | 'ranges']> = [
    ['extension with length 16', (p, a) => poke(p, a.extData - 4, u32(16)), 'QCOW2_CORRUPT', 'directory'],
    ['no bitmaps in the extension', (p, a) => poke(p, a.extData, u32(0)), 'QCOW2_CORRUPT', 'directory'],
    ['more than 65535 bitmaps', (p, a) => poke(p, a.extData, u32(70000)), 'QCOW2_TOO_LARGE', 'directory'],
    ['reserved field set', (p, a) => poke(p, a.extData + 4, u32(1)), 'QCOW2_CORRUPT', 'directory'],
    ['directory of 1 GiB', (p, a) => poke(p, a.extData + 8, u64(1n << 30n)), 'QCOW2_TOO_LARGE', 'directory'],
    ['directory past the end of the file', (p, a) => poke(p, a.extData + 16, u64(1n << 40n)), 'QCOW2_CORRUPT', 'directory'],
    ['directory offset misaligned', (p, a) => poke(p, a.extData + 16, u64(BigInt(a.dirOffset + 8))), 'QCOW2_CORRUPT', 'directory'],
    ['directory size not matching the entries', (p, a) => poke(p, a.extData + 8, u64(48n)), 'QCOW2_CORRUPT', 'directory'],
    ['reserved flag bits', (p, a) => poke(p, a.entry + 12, u32(0x10 | 2)), 'QCOW2_CORRUPT', 'directory'],
    ['unknown bitmap type', (p, a) => poke(p, a.entry + 16, Buffer.from([2])), 'QCOW2_CORRUPT', 'directory'],
    ['granularity bits 8', (p, a) => poke(p, a.entry + 17, Buffer.from([8])), 'QCOW2_CORRUPT', 'directory'],
    ['granularity bits 32', (p, a) => poke(p, a.entry + 17, Buffer.from([32])), 'QCOW2_CORRUPT', 'directory'],
    ['a zero-length name', (p, a) => poke(p, a.entry + 18, Buffer.from([0, 0])), 'QCOW2_CORRUPT', 'directory'],
    ['a name that overruns the directory', (p, a) => poke(p, a.entry + 18, Buffer.from([0x03, 0xff])), 'QCOW2_CORRUPT', 'directory'],
    ['extra data that overruns the directory', (p, a) => poke(p, a.entry + 20, u32(0xffff_fff0)), 'QCOW2_CORRUPT', 'directory'],
    ['table size not matching the virtual size', (p, a) => poke(p, a.entry + 8, u32(7)), 'QCOW2_CORRUPT', 'directory'],
    ['table size beyond QEMU’s limit', (p, a) => poke(p, a.entry + 8, u32(0x8000000)), 'QCOW2_TOO_LARGE', 'directory'],
    ['table offset misaligned', (p, a) => poke(p, a.entry, u64(BigInt(a.tableOffset + 8))), 'QCOW2_CORRUPT', 'directory'],
    ['table past the end of the file', (p, a) => poke(p, a.entry, u64(1n << 40n)), 'QCOW2_CORRUPT', 'directory'],
    ['table entry with reserved bits', (p, a) => poke(p, a.tableOffset, u64(1n << 60n)), 'QCOW2_CORRUPT', 'ranges'],
    [
      'table entry with a data cluster past the end of the file',
      (p, a) => poke(p, a.tableOffset, u64(1n << 40n)),
      'QCOW2_CORRUPT',
      'ranges',
    ],
    [
      'table entry with a misaligned data cluster',
      (p, a) => poke(p, a.tableOffset, u64(BigInt(a.tableOffset + 512))),
      'QCOW2_CORRUPT',
      'ranges',
    ],
    [
      'table entry with a data cluster and the all-ones flag',
      (p, a) => poke(p, a.tableOffset, u64(BigInt(a.tableOffset) | 1n)),
      'QCOW2_CORRUPT',
      'ranges',
    ],
    ['table entry pointing into the header', (p, a) => poke(p, a.tableOffset, u64(0x200n)), 'QCOW2_CORRUPT', 'ranges'],
  ];

  it.each(cases)('%s', async (_name, breakIt, code, stage) => {
    const dir = tempDir('bitmaps-bad');
    const p = join(dir, 'a.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', p, String(64 * MiB)]);
    execFileSync('qemu-img', ['bitmap', '--add', p, 'b']);
    qemuIo(p, ['write -P 1 0 64k']);
    breakIt(p, await locate(p, 'b'));
    const img = await Qcow2Image.open(p);
    try {
      const run = async (): Promise<void> => {
        const d = await readBitmapDirectory(img);
        for (const bm of d.bitmaps) for await (const r of dirtyRanges(img, bm)) void r;
      };
      const err = await run().then(
        () => null,
        (e: unknown) => e,
      );
      expect(err).toBeInstanceOf(Qcow2Error);
      expect((err as Qcow2Error).code).toBe(code);
      if (stage === 'ranges') await expect(readBitmapDirectory(img)).resolves.toMatchObject({ state: 'present' });
    } finally {
      await img.close();
    }
  });

  it('two bitmaps of the same name', async () => {
    const dir = tempDir('bitmaps-dup');
    const p = join(dir, 'a.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', p, String(8 * MiB)]);
    execFileSync('qemu-img', ['bitmap', '--add', p, 'aa']);
    execFileSync('qemu-img', ['bitmap', '--add', p, 'ab']);
    const a = await locate(p, 'ab');
    poke(p, a.entry + 24, Buffer.from('aa'));
    const img = await Qcow2Image.open(p);
    try {
      await expect(readBitmapDirectory(img)).rejects.toMatchObject({ code: 'QCOW2_CORRUPT' });
    } finally {
      await img.close();
    }
  });
});
