// Differential test of the offline incremental's copy (copyDirty) on random images made by
// the real qemu-img/qemu-io: a source (optionally over a backing file) gets a bitmap, is
// flattened into the "parent backup", then takes random writes, zero writes and discards
// (recorded by qemu-io in the bitmap, as a running QEMU records them) and maybe grows.
// The incremental built from the bitmap, read through the parent (qemu-img compare),
// equals the source at backup time; it is a clean image that holds no more than the
// dirty clusters.
import { execFileSync, spawnSync } from 'node:child_process';
import { join } from 'node:path';
import fc from 'fast-check';
import { afterAll, describe, expect, it } from 'vitest';
import { copyDirty } from '../../lib/ops/backup/stopped-incremental.js';
import { dirtyRanges, Qcow2Image, readBitmapDirectory, type GuestRange } from '../../lib/qcow2/index.js';
import { HashPool } from '../../lib/store/hash-pool.js';
import { digestLayer } from '../../lib/store/layer-digest.js';
import { newDigestSpec } from '../../lib/store/manifest.js';
import { removeTempDirs, tempDir } from '../helpers/tmp.js';

afterAll(removeTempDirs);

const KiB = 1024;
const MiB = 1024 * KiB;
const runs = Number(process.env.NASBACKUP_OFFLINE_RUNS ?? 12);

function qemuIo(path: string, cmds: string[]): void {
  if (cmds.length === 0) return;
  const r = spawnSync('qemu-io', ['-f', 'qcow2', ...cmds.flatMap((c) => ['-c', c]), path], { encoding: 'utf8' });
  if (r.status !== 0 || /error|failed/i.test(r.stdout)) throw new Error(`qemu-io failed: ${r.stdout}${r.stderr}`);
}

interface Case {
  clusterBits: number;
  baseClusterBits: number;
  granularityBits: number;
  withBase: boolean;
  size: number;
  /** Grow the source by this many 64 KiB units after the parent backup (0: not). */
  grow: number;
  baseOps: string[];
  before: string[];
  after: string[];
}

const opsArb = (size: number, max: number): fc.Arbitrary<string[]> => {
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
      arbitrary: fc.tuple(off, fc.integer({ min: 1, max: 8192 })).map(([o, n]) => `write -z -u ${o} ${Math.min(n * 512, size - o)}`),
    },
    {
      weight: 1,
      arbitrary: fc.tuple(off, fc.integer({ min: 1, max: 8192 })).map(([o, n]) => `discard ${o} ${Math.min(n * 512, size - o)}`),
    },
  );
  return fc.array(op, { maxLength: max });
};

const caseArb: fc.Arbitrary<Case> = fc
  .record({
    clusterBits: fc.constantFrom(12, 14, 16, 19, 21),
    baseClusterBits: fc.constantFrom(12, 16, 21),
    granularityBits: fc.constantFrom(16, 17, 18, 20, 21),
    withBase: fc.boolean(),
    units: fc.integer({ min: 1, max: 512 }), // up to 32 MiB
    grow: fc.oneof({ weight: 4, arbitrary: fc.constant(0) }, { weight: 1, arbitrary: fc.integer({ min: 1, max: 64 }) }),
  })
  .chain(({ units, ...rest }) => {
    const size = units * 64 * KiB;
    return fc
      .record({ baseOps: opsArb(size, 4), before: opsArb(size, 4), after: opsArb(size, 8) })
      .map((ops) => ({ ...rest, size, ...ops }));
  });

async function bitmapOf(path: string, name: string) {
  const img = await Qcow2Image.open(path);
  try {
    const bm = (await readBitmapDirectory(img)).bitmaps.find((b) => b.name === name);
    if (!bm) throw new Error(`no bitmap ${name}`);
    const ranges: GuestRange[] = [];
    for await (const r of dirtyRanges(img, bm)) ranges.push({ ...r });
    return { bm, ranges, virtualSize: img.virtualSize };
  } finally {
    await img.close();
  }
}

function mapTop(path: string): Array<{ start: number; length: number; depth: number; data: boolean; zero: boolean }> {
  return JSON.parse(execFileSync('qemu-img', ['map', '--output=json', path], { encoding: 'utf8', maxBuffer: 64 << 20 })) as Array<{
    start: number;
    length: number;
    depth: number;
    data: boolean;
    zero: boolean;
  }>;
}

describe('offline incremental: flatten(parent + incremental) = source at backup time', () => {
  const pool = new HashPool({ workers: 2, slotBytes: 256 * KiB, slots: 4 });
  afterAll(() => pool.close());

  it('random sources (cluster sizes 4 KiB–2 MiB, granularities 64 KiB–2 MiB, backing chains, zero writes, discards, growth)', async () => {
    const dir = tempDir('offline-diff');
    let n = 0;
    await fc.assert(
      fc.asyncProperty(caseArb, async (c) => {
        const d = join(dir, `c${n++}`);
        execFileSync('mkdir', ['-p', join(d, 'disk'), join(d, 'nas', 'p'), join(d, 'nas', 'i')]);
        const src = join(d, 'disk', 'top.qcow2');
        const create = ['create', '-q', '-f', 'qcow2', '-o', `cluster_size=${1 << c.clusterBits}`];
        if (c.withBase) {
          const base = join(d, 'disk', 'base.qcow2');
          execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', `cluster_size=${1 << c.baseClusterBits}`, base, String(c.size)]);
          qemuIo(base, c.baseOps);
          execFileSync('qemu-img', [...create, '-b', 'base.qcow2', '-F', 'qcow2', src, String(c.size)]);
        } else execFileSync('qemu-img', [...create, src, String(c.size)]);
        qemuIo(src, c.before);
        execFileSync('qemu-img', ['bitmap', '--add', '-g', String(2 ** c.granularityBits), src, 'b']);
        // The parent backup: the source as it is when the bitmap starts recording.
        const parent = join(d, 'nas', 'p', 'root.qcow2');
        execFileSync('qemu-img', ['convert', '-O', 'qcow2', src, parent]);
        qemuIo(src, c.after);
        if (c.grow > 0) {
          execFileSync('qemu-img', ['resize', '-q', src, String(c.size + c.grow * 64 * KiB)]);
          qemuIo(src, [`write -P 0x5c ${c.size} ${Math.min(64 * KiB, c.grow * 64 * KiB)}`]);
        }
        const { bm, ranges, virtualSize } = await bitmapOf(src, 'b');
        const inc = join(d, 'nas', 'i', 'root.qcow2');
        // Every other case hashes on the pool's workers (the engine reading into its slots).
        const onPool = n % 2 === 0;
        const r = await copyDirty({
          src,
          bitmap: bm,
          virtualSize,
          parentSize: c.size,
          dst: inc,
          backing: '../p/root.qcow2',
          ...(onPool ? { pool } : {}),
        });
        // What new manifests record: 64 MiB extents in 1 MiB parts.
        expect(r.digest).toEqual(await digestLayer(inc, newDigestSpec('xxh64')));
        if (onPool) expect(pool.available).toBe(4);

        const cmp = spawnSync('qemu-img', ['compare', inc, src], { encoding: 'utf8' });
        expect(cmp.stdout + cmp.stderr).toContain('Images are identical');
        expect(spawnSync('qemu-img', ['check', inc]).status).toBe(0);
        const info = JSON.parse(execFileSync('qemu-img', ['info', '--output=json', inc], { encoding: 'utf8' })) as Record<string, unknown>;
        expect(info['backing-filename']).toBe('../p/root.qcow2');
        expect(info['backing-filename-format']).toBe('qcow2');
        expect(info['virtual-size']).toBe(virtualSize);
        // Nothing but the dirty ranges (widened to 64 KiB clusters) and the grown tail is in the new layer.
        const unit = 64 * KiB;
        const covered = (s: number, e: number): boolean =>
          (s >= c.size && e <= virtualSize) ||
          ranges.some((x) => Math.floor(x.offset / unit) * unit <= s && e <= Math.ceil((x.offset + x.length) / unit) * unit);
        for (const e of mapTop(inc).filter((x) => x.depth === 0)) {
          // qemu-img map merges adjacent extents: check each 64 KiB cluster of it.
          for (let s = e.start; s < e.start + e.length; s += unit) expect(covered(s, Math.min(s + unit, e.start + e.length))).toBe(true);
        }
        const dirty = ranges.reduce((a, x) => a + x.length, 0);
        expect(r.dirtyBytes).toBe(dirty);
        expect(r.stats.readBytes).toBeLessThanOrEqual(r.stats.totalBytes);
      }),
      { numRuns: runs },
    );
  });

  it('dirty clusters that read as zeros become zero clusters over the parent’s data', async () => {
    const d = tempDir('offline-zero');
    const src = join(d, 'top.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', src, String(8 * MiB)]);
    qemuIo(src, ['write -P 0x11 0 8M']);
    execFileSync('qemu-img', ['bitmap', '--add', src, 'b']);
    execFileSync('mkdir', ['-p', join(d, 'p')]);
    execFileSync('qemu-img', ['convert', '-O', 'qcow2', src, join(d, 'p', 'root.qcow2')]);
    qemuIo(src, ['write -z 1M 1M', 'discard 4M 512k', 'write -P 0 6M 64k']);
    const { bm, virtualSize } = await bitmapOf(src, 'b');
    const inc = join(d, 'inc.qcow2');
    const r = await copyDirty({ src, bitmap: bm, virtualSize, parentSize: 8 * MiB, dst: inc, backing: 'p/root.qcow2' });
    expect(r.stats.dataBytes).toBe(0);
    expect(r.stats.zeroBytes).toBe(1 * MiB + 512 * KiB + 64 * KiB);
    const top = mapTop(inc).filter((x) => x.depth === 0);
    expect(top.map((x) => [x.start, x.length, x.data, x.zero])).toEqual([
      [1 * MiB, 1 * MiB, false, true],
      [4 * MiB, 512 * KiB, false, true],
      [6 * MiB, 64 * KiB, false, true],
    ]);
    expect(spawnSync('qemu-img', ['compare', inc, src], { encoding: 'utf8' }).stdout).toContain('Images are identical');
  });
});
