// The verified flatten never writes a byte it has not proven: on random qemu-img chains (data,
// zero and discarded clusters, small manifest extents, with and without parts), a byte flipped
// in any layer's data either fails the flatten with BACKUP_DAMAGED naming that layer, or —
// where newer layers hide the whole extent (or, with parts, the whole part), so it is not read —
// the flatten succeeds and equals the undamaged disk. Undamaged, every point equals qemu-img's
// own flatten.
import { execFileSync } from 'node:child_process';
import { closeSync, openSync, readFileSync, readSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it, vi } from 'vitest';
import { NasbackupError } from '../../lib/errors.js';
import { flattenVerified, type LayerExpectation } from '../../lib/ops/flatten.js';
import { ImageChain, Qcow2Image } from '../../lib/qcow2/index.js';
import { digestLayer } from '../../lib/store/layer-digest.js';
import { layerPartBytes } from '../../lib/store/manifest.js';
import { makeImage, qemuImg } from '../helpers/qemu.js';
import { rng } from '../helpers/random.js';
import { removeTempDirs, tempDir } from '../helpers/tmp.js';

afterAll(removeTempDirs);

const KiB = 1024;
const MiB = 1024 * KiB;

const SIZE = 8 * MiB;
const EXTENT = 512 * KiB;

/** full <- inc1 <- … : random data writes (some whole extents), zero writes and discards, at `grain` offsets and lengths. */
function makeChain(dir: string, seed: number, layers: number, clusterKiB: number, grain = 64 * KiB): string[] {
  const r = rng(seed);
  const files: string[] = [];
  for (let i = 0; i < layers; i++) {
    const f = join(dir, `l${i}.qcow2`);
    makeImage(f, {
      size: SIZE,
      extra: ['-o', `cluster_size=${clusterKiB * KiB}`],
      ...(i === 0 ? {} : { backing: `l${i - 1}.qcow2` }),
    });
    const cmds: string[] = [];
    const n = i === 0 ? 12 : 5;
    for (let w = 0; w < n; w++) {
      const kind = r(10);
      // Whole extents now and then: the way a newer layer hides an older extent entirely.
      const off = kind < 3 ? r(SIZE / EXTENT) * EXTENT : r(SIZE / grain) * grain;
      const len = kind < 3 ? EXTENT : (1 + r(8)) * grain;
      const l = Math.min(len, SIZE - off);
      if (kind === 9) cmds.push('-c', `write -z ${off} ${l}`);
      else if (kind === 8 && i > 0) cmds.push('-c', `discard ${off} ${l}`);
      else cmds.push('-c', `write -P 0x${(0x20 + i * 16 + w).toString(16)} ${off} ${l}`);
    }
    execFileSync('qemu-io', ['-f', 'qcow2', ...cmds, f], { stdio: 'ignore' });
    files.push(f);
  }
  return files;
}

/** Each layer's expectation as restore builds it from a manifest: extents only, or (`partBytes`) parts too. */
async function expectations(files: string[], extent = EXTENT, partBytes?: number): Promise<LayerExpectation[]> {
  const out: LayerExpectation[] = [];
  for (const f of files) {
    const d = await digestLayer(f, { extentBytes: extent, ...(partBytes ? { partBytes } : {}) });
    out.push({
      backup: f,
      file: f,
      extentBytes: extent,
      algorithm: 'xxh64',
      digests: new Map(d.extents.map((e) => [e.index, e])),
      ...(partBytes ? { partBytes: layerPartBytes(partBytes, d.unitBytes) } : {}),
    });
  }
  return out.reverse(); // top first, like the chain
}

/** The flatten of the chain whose top is `top`, into memory (a sparse target), or the error it failed with. */
async function flatten(top: string, expect: LayerExpectation[]): Promise<Buffer | Error> {
  const chain = await ImageChain.open(top);
  const disk = Buffer.alloc(chain.virtualSize);
  try {
    await flattenVerified(chain, {
      expect,
      target: { kind: 'sparse' },
      write: async (buf, at) => void buf.copy(disk, at),
      checkpoint: () => {},
      pieceBytes: 128 * KiB,
    });
    return disk;
  } catch (e) {
    return e as Error;
  } finally {
    await chain.close();
  }
}

function qemuFlatten(dir: string, top: string): Buffer {
  const raw = join(dir, 'ref.raw');
  qemuImg(['convert', '-U', '-f', 'qcow2', '-O', 'raw', top, raw]);
  return readFileSync(raw);
}

/** Host offsets of a few data bytes of a layer (its own clusters). */
async function dataBytes(file: string, pick: (n: number) => number, count: number): Promise<Array<{ guest: number; host: number }>> {
  const img = await Qcow2Image.open(file);
  try {
    const runs: Array<{ pos: number; len: number; host: number }> = [];
    for (let pos = 0; pos < img.virtualSize;) {
      const s = await img.status(pos, img.virtualSize - pos);
      if (s.kind === 'data') runs.push({ pos, len: s.length, host: s.host! });
      pos += s.length;
    }
    if (runs.length === 0) return [];
    return Array.from({ length: count }, () => {
      const r = runs[pick(runs.length)]!;
      const o = pick(r.len);
      return { guest: r.pos + o, host: r.host + o };
    });
  } finally {
    await img.close();
  }
}

function flip(file: string, at: number): void {
  const fd = openSync(file, 'r+');
  try {
    const b = Buffer.alloc(1);
    readSync(fd, b, 0, 1, at);
    b[0] = b[0]! ^ 0xff;
    writeSync(fd, b, 0, 1, at);
  } finally {
    closeSync(fd);
  }
}

describe('verified flatten: damage is refused or provably unread', () => {
  const hiddenTotal = { extents: 0, parts: 0 };
  for (const [seed, clusterKiB, grain] of [
    [1, 64, 'extents'],
    [2, 64, 'extents'],
    [3, 4, 'extents'],
    [4, 128, 'extents'],
    [1, 64, 'parts'],
    [3, 4, 'parts'],
    [4, 128, 'parts'],
    [5, 16, 'parts'],
  ] as const) {
    it(`random chain ${seed} (${clusterKiB} KiB clusters, proven in ${grain}): every point exact; every flipped byte refused or hidden whole`, async () => {
      const dir = tempDir(`flatten-damage-${seed}-${grain}`);
      const files = makeChain(dir, seed, 4, clusterKiB);
      // Parts of 64 KiB (a 128 KiB cluster's part is the cluster).
      const part = grain === 'parts' ? 64 * KiB : undefined;
      const expect4 = await expectations(files, EXTENT, part);
      // Undamaged: every point equals qemu-img's flatten.
      for (let top = 0; top < files.length; top++) {
        const got = await flatten(files[top]!, expect4.slice(files.length - 1 - top));
        expect(got).toBeInstanceOf(Buffer);
        expect((got as Buffer).equals(qemuFlatten(dir, files[top]!))).toBe(true);
      }
      const clean = qemuFlatten(dir, files.at(-1)!);
      const pick = rng(seed * 7919);
      const outcomes = { refused: 0, hidden: 0 };
      for (const [L, file] of files.entries()) {
        for (const { guest, host } of await dataBytes(file, pick, 6)) {
          flip(file, host);
          try {
            const got = await flatten(files.at(-1)!, expect4);
            if (got instanceof Buffer) {
              // Not read: the whole extent is hidden by newer layers, and the disk is the undamaged one.
              expect(got.equals(clean), `layer ${L} guest ${guest}`).toBe(true);
              outcomes.hidden++;
            } else {
              expect(got).toBeInstanceOf(NasbackupError);
              expect((got as NasbackupError).code).toBe('BACKUP_DAMAGED');
              expect((got as Error).message).toContain(`${file} is damaged`);
              const e = Math.floor(guest / EXTENT);
              const p = part === undefined ? 0 : layerPartBytes(part, clusterKiB * KiB);
              expect((got as Error).message).toContain(
                part === undefined ? `extent ${e} ` : `extent ${e}, part ${Math.floor((guest % EXTENT) / p)} `,
              );
              outcomes.refused++;
            }
            // The layer's own point always sees it.
            const own = await flatten(file, expect4.slice(files.length - 1 - L));
            expect(own).toBeInstanceOf(NasbackupError);
          } finally {
            flip(file, host);
          }
        }
      }
      hiddenTotal[grain] += outcomes.hidden;
      expect(outcomes.refused).toBeGreaterThan(0);
      expect(outcomes.refused + outcomes.hidden).toBe(files.length * 6);
    }, 60_000);
  }
  it('the chains above include extents and parts hidden whole (not read), so both outcomes were exercised', () => {
    expect(hiddenTotal.extents).toBeGreaterThan(0);
    expect(hiddenTotal.parts).toBeGreaterThan(0);
  });
});

describe('verified flatten: every target kind receives the same disk', () => {
  /** The flatten written into memory as `target` receives it; what each write covered, checked against the kind's rules. */
  async function flattenAs(
    top: string,
    layers: Array<LayerExpectation | null>,
    target: Parameters<typeof flattenVerified>[1]['target'],
    seen: number[] = [],
  ) {
    const chain = await ImageChain.open(top);
    // Unwritten bytes of a sparse file or a new image read as zeros; a device's old data must all be overwritten.
    const disk = Buffer.alloc(chain.virtualSize, target.kind === 'device' ? 0xee : 0);
    const covered = new Uint8Array(chain.virtualSize);
    let writing = 0;
    try {
      await flattenVerified(chain, {
        expect: layers,
        target,
        write: async (buf, at) => {
          // One write at a time, though pieces are read IN_FLIGHT wide.
          expect(++writing).toBe(1);
          await new Promise(setImmediate); // in flight for a turn of the loop, as a real write is
          writing--;
          if (target.kind === 'units') {
            expect(at % target.unit).toBe(0);
            expect(buf.length % target.unit === 0 || at + buf.length === chain.virtualSize).toBe(true);
          }
          if (target.kind !== 'device') expect(buf.equals(Buffer.alloc(buf.length))).toBe(false);
          for (let i = at; i < at + buf.length; i++) covered[i]!++;
          buf.copy(disk, at);
        },
        checkpoint: () => {},
        pieceBytes: 256 * KiB,
        inspect: (x) => void seen.push(x.length),
      });
    } finally {
      await chain.close();
    }
    // Nothing written twice; a device written whole.
    expect(covered.every((c) => c <= 1)).toBe(true);
    if (target.kind === 'device') expect(covered.every((c) => c === 1)).toBe(true);
    return disk;
  }

  for (const [seed, clusterKiB] of [
    [11, 64],
    [12, 4],
    [13, 16],
  ] as const) {
    it(`random chain ${seed} (${clusterKiB} KiB clusters, one layer without a manifest): sparse, device and 64 KiB units equal qemu-img`, async () => {
      const dir = tempDir(`flatten-targets-${seed}`);
      // Writes at cluster granularity: a 64 KiB unit of the new image often mixes layers.
      const files = makeChain(dir, seed, 4, clusterKiB, clusterKiB * KiB);
      const expect4: Array<LayerExpectation | null> = await expectations(files);
      expect4[2] = null; // an older backup without a manifest: read only where visible
      // The top two layers in parts (version 3), the bottom one in extents: a chain across an upgrade.
      const parted = await expectations(files, EXTENT, 64 * KiB);
      const mixed: Array<LayerExpectation | null> = [parted[0]!, parted[1]!, null, expect4[3]!];
      const want = qemuFlatten(dir, files.at(-1)!);
      for (const target of [{ kind: 'sparse' }, { kind: 'device' }, { kind: 'units', unit: 64 * KiB }] as const) {
        const got = await flattenAs(files.at(-1)!, expect4, target);
        expect(got.equals(want), target.kind).toBe(true);
        expect((await flattenAs(files.at(-1)!, mixed, target)).equals(want), `${target.kind}, parts`).toBe(true);
      }
    }, 60_000);
  }

  it('a stretch no layer holds is one piece up to its extent (a sparse disk is cheap) and every target still receives the same disk', async () => {
    const dir = tempDir('flatten-holes');
    // 40 MiB, three layers: data near the start, in the middle and at the very end; the rest no layer holds.
    const size = 40 * MiB;
    const files = [0, 1, 2].map((i) => join(dir, `h${i}.qcow2`));
    const at: number[][] = [[0, 17 * MiB + 64 * KiB], [3 * MiB], [size - 128 * KiB, 21 * MiB]];
    for (const [i, f] of files.entries()) {
      makeImage(f, {
        ...(i === 0 ? { size } : { backing: `h${i - 1}.qcow2` }),
        writes: at[i]!.map((offset) => ({ pattern: 0x31 + i, offset, length: 128 * KiB })),
      });
    }
    const want = qemuFlatten(dir, files.at(-1)!);
    for (const layers of [await expectations(files, 4 * MiB), await expectations(files, 4 * MiB, 256 * KiB), files.map(() => null)]) {
      for (const target of [{ kind: 'sparse' }, { kind: 'device' }, { kind: 'units', unit: 64 * KiB }] as const) {
        const seen: number[] = [];
        const got = await flattenAs(files.at(-1)!, layers, target, seen);
        expect(got.equals(want), target.kind).toBe(true);
        // Every byte was seen once, and most of the disk in stretches longer than a piece (256 KiB).
        expect(seen.reduce((a, b) => a + b, 0)).toBe(size);
        expect(seen.filter((n) => n > 256 * KiB).reduce((a, b) => a + b, 0)).toBeGreaterThan(size / 2);
        // Never past a manifest extent (4 MiB) with manifests; up to 64 MiB without.
        expect(Math.max(...seen)).toBeLessThanOrEqual(layers[0] ? 4 * MiB : 64 * MiB);
        if (!layers[0]) expect(Math.max(...seen)).toBeGreaterThan(4 * MiB);
      }
    }
  }, 60_000);
});

describe('verified flatten at the default sizes: PIECE-sized requests, halved where the buffers would take more than half the pool', () => {
  it('one layer read: 4 MiB pieces and writes; layers mixed: 2 and 1 MiB pieces; every target equals qemu-img, a flipped byte is refused', async () => {
    const { HashPool } = await import('../../lib/store/hash-pool.js');
    const dir = tempDir('flatten-default-sizes');
    const size = 32 * MiB;
    const files = [0, 1, 2, 3].map((i) => join(dir, `d${i}.qcow2`));
    // The full holds every byte; inc1 a whole aligned 4 MiB at 8 MiB (it and the full's hidden data: 8 slots, halved once);
    // inc2 and inc3 clusters inside [16, 20) MiB (three layers proven there: halved twice).
    const writes: Array<Array<{ offset: number; length: number }>> = [
      [{ offset: 0, length: size }],
      [{ offset: 8 * MiB, length: 4 * MiB }],
      [0, 5, 17, 40].map((c) => ({ offset: 16 * MiB + c * 64 * KiB, length: 64 * KiB })),
      [3, 30, 63].map((c) => ({ offset: 16 * MiB + c * 64 * KiB, length: 128 * KiB })),
    ];
    for (const [i, f] of files.entries()) {
      makeImage(f, {
        ...(i === 0 ? { size } : { backing: `d${i - 1}.qcow2` }),
        writes: writes[i]!.map((w, k) => ({ pattern: 0x41 + i * 8 + k, ...w })),
      });
    }
    const want = qemuFlatten(dir, files.at(-1)!);
    const proven = await expectations(files, 64 * MiB);
    // Every request for a piece's buffers (the spy calls through).
    const spy = vi.spyOn(HashPool.prototype, 'acquireRuns');
    const requests = (): number[][] => spy.mock.calls.map(([counts]) => counts);
    try {
      for (const layers of [proven, files.map(() => null)]) {
        for (const target of [{ kind: 'sparse' }, { kind: 'device' }, { kind: 'units', unit: 64 * KiB }] as const) {
          const chain = await ImageChain.open(files.at(-1)!);
          const disk = Buffer.alloc(size, target.kind === 'device' ? 0xee : 0);
          const pieces: number[] = [];
          const writeSizes: number[] = [];
          let last = 0;
          spy.mockClear();
          try {
            await flattenVerified(chain, {
              expect: layers,
              target,
              write: async (buf, at) => {
                writeSizes.push(buf.length);
                buf.copy(disk, at);
              },
              checkpoint: () => {},
              progress: (done) => {
                pieces.push(done - last);
                last = done;
              },
            });
          } finally {
            await chain.close();
          }
          expect(disk.equals(want), target.kind).toBe(true);
          expect(last).toBe(size);
          // Where only the full is read: 4 MiB pieces, each one 4 MiB write.
          expect(pieces.filter((n) => n === 4 * MiB).length).toBeGreaterThanOrEqual(4);
          expect(Math.max(...writeSizes)).toBe(4 * MiB);
          // A piece's buffers never take more than half the pool (8 slots of 1 MiB), unless it is a smallest piece.
          expect(requests().length).toBeGreaterThan(8);
          for (const r of requests()) expect(r.reduce((a, b) => a + b, 0)).toBeLessThanOrEqual(4);
          if (layers[0]) {
            // Proven layers read whole beside the data hiding them: halved to 2 MiB at 8 MiB, to 1 MiB at 16 MiB.
            expect(pieces).toContain(2 * MiB);
            expect(pieces).toContain(MiB);
            expect(requests().some((r) => r.length === 3)).toBe(true);
          }
        }
      }
      // A byte flipped in inc2's data, where pieces are halved: refused, naming the layer.
      const [hit] = await dataBytes(files[2]!, () => 0, 1);
      const fd = openSync(files[2]!, 'r+');
      try {
        const b = Buffer.alloc(1);
        readSync(fd, b, 0, 1, hit!.host);
        b[0]! ^= 0xff;
        writeSync(fd, b, 0, 1, hit!.host);
      } finally {
        closeSync(fd);
      }
      const damaged = await ImageChain.open(files.at(-1)!);
      try {
        const err = await flattenVerified(damaged, {
          expect: proven,
          target: { kind: 'sparse' },
          write: async () => {},
          checkpoint: () => {},
        }).catch((e: unknown) => e);
        expect(err).toBeInstanceOf(NasbackupError);
        expect((err as NasbackupError).code).toBe('BACKUP_DAMAGED');
        expect((err as Error).message).toContain(`disk ${files[2]}, extent 0`);
      } finally {
        await damaged.close();
      }
    } finally {
      spy.mockRestore();
    }
  }, 60_000);
});
