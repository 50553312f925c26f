// The streaming digester (what a writer feeds while it writes a layer) gives exactly the
// digests of re-reading the written file: random real images (qemu-img/qemu-io) over
// several cluster sizes, extended L2 subclusters, zero clusters, compressed clusters and
// disk sizes that are not a cluster multiple, fed in random pieces in guest order; what
// the layer holds is taken from `qemu-img map` of the layer alone and its bytes from
// `qemu-img convert`, so the feed owes nothing to lib/qcow2.
import { createHash } from 'node:crypto';
import { execFileSync } from 'node:child_process';
import { readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { Qcow2Image } from '../../lib/qcow2/index.js';
import { createDigest, type DigestAlgorithm } from '../../lib/store/digest/index.js';
import { HashPool } from '../../lib/store/hash-pool.js';
import { digestLayer, LayerDigester, type UnitKind } from '../../lib/store/layer-digest.js';
import { describeLayer, layerEntry } from '../../lib/store/manifest-file.js';
import { recomputeDigests } from '../helpers/layer-digest.js';
import { rng } from '../helpers/random.js';
import { removeTempDirs, tempDir } from '../helpers/tmp.js';

afterAll(removeTempDirs);

const KiB = 1024;
const MiB = 1024 * KiB;

const layerOnly = (path: string): string =>
  `json:${JSON.stringify({ driver: 'qcow2', file: { driver: 'file', filename: path }, backing: null })}`;

interface Layer {
  size: number;
  unit: number;
  rows: Array<{ start: number; length: number; kind: UnitKind }>;
  bytes: Buffer;
}

/** What the layer holds, from qemu-img alone. */
function readLayer(path: string, scratch: string): Layer {
  const info = JSON.parse(execFileSync('qemu-img', ['info', '-U', '--output=json', path], { encoding: 'utf8' })) as {
    'cluster-size': number;
    'virtual-size': number;
    'format-specific': { data: { 'extended-l2'?: boolean } };
  };
  const unit = info['cluster-size'] / (info['format-specific'].data['extended-l2'] ? 32 : 1);
  const map = JSON.parse(execFileSync('qemu-img', ['map', '-U', '--output=json', layerOnly(path)], { encoding: 'utf8' })) as Array<{
    start: number;
    length: number;
    present?: boolean;
    zero: boolean;
    data: boolean;
  }>;
  const raw = join(scratch, `layer-${Math.random().toString(36).slice(2)}.raw`);
  execFileSync('qemu-img', ['convert', '-U', '-O', 'raw', layerOnly(path), raw]);
  const bytes = readFileSync(raw);
  rmSync(raw, { force: true });
  const rows = map.map((r): Layer['rows'][number] => ({
    start: r.start,
    length: r.length,
    kind: r.present === false ? 'unallocated' : r.data ? 'data' : r.zero ? 'zero' : 'unallocated',
  }));
  return { size: info['virtual-size'], unit, rows, bytes };
}

/** Feed the layer in random pieces: data split anywhere, zero at unit boundaries, unallocated sometimes left as a gap. */
function stream(
  layer: Layer,
  extentBytes: number,
  rand: (n: number) => number,
  algorithm: DigestAlgorithm = 'xxh64',
  partBytes?: number,
): ReturnType<LayerDigester['finish']> {
  const dg = new LayerDigester({
    virtualSize: layer.size,
    unitBytes: layer.unit,
    extentBytes,
    algorithm,
    ...(partBytes ? { partBytes } : {}),
  });
  for (const r of layer.rows) {
    if (r.kind === 'unallocated' && rand(2) === 0) continue;
    for (let off = r.start; off < r.start + r.length;) {
      const left = r.start + r.length - off;
      let n: number;
      if (r.kind === 'data') n = Math.min(left, 1 + rand(3 * layer.unit));
      else {
        const units = 1 + rand(4);
        n = Math.min(left, (Math.floor(off / layer.unit) + units) * layer.unit - off);
      }
      dg.add(off, n, r.kind, r.kind === 'data' ? layer.bytes.subarray(off, off + n) : undefined);
      off += n;
    }
  }
  return dg.finish();
}

/** A random image: data, zero writes, discards (over a backing sometimes), an odd size. */
function randomImage(path: string, rand: (n: number) => number, clusterSize: number, extendedL2: boolean): void {
  const size = (4 + rand(12)) * MiB + rand(2) * (1 + rand(127)) * 512;
  const opts = [`cluster_size=${clusterSize}`, ...(extendedL2 ? ['extended_l2=on'] : [])].join(',');
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', opts, path, String(size)]);
  const cmds: string[] = [];
  const sectors = size / 512;
  for (let i = 0; i < 24; i++) {
    const big = rand(3) === 0;
    const off = rand(sectors) * 512;
    const len = Math.min(size - off, (1 + rand(big ? 4096 : 64)) * 512);
    if (len <= 0) continue;
    const op = rand(6);
    if (op <= 2) cmds.push('-c', `write -P 0x${(1 + rand(255)).toString(16)} ${off} ${len}`);
    else if (op === 3) cmds.push('-c', `write -P 0 ${off} ${len}`);
    else if (op === 4) cmds.push('-c', `write -z ${off} ${len}`);
    else cmds.push('-c', `discard ${off} ${len}`);
  }
  // The disk's last bytes, so the short last unit is covered.
  cmds.push('-c', `write -P 0x5a ${size - 512} 512`);
  execFileSync('qemu-io', ['-f', 'qcow2', ...cmds, path], { stdio: 'ignore' });
}

/** The kinds of cluster the native reader finds (to prove the corpus has what it claims). */
async function kinds(path: string): Promise<Set<string>> {
  const img = await Qcow2Image.open(path);
  try {
    const seen = new Set<string>();
    for (let pos = 0; pos < img.virtualSize;) {
      const e = await img.status(pos, img.virtualSize - pos);
      seen.add(e.kind);
      pos += e.length;
    }
    return seen;
  } finally {
    await img.close();
  }
}

describe('LayerDigester (streaming) = digestLayer (re-read of the written file)', () => {
  const dir = tempDir('layer-digester');
  // Small slots and few of them: many flushes, slots reused, reads waiting for a free one.
  const pool = new HashPool({ workers: 2, slotBytes: 256 * KiB, slots: 3 });
  afterAll(() => pool.close());
  const shapes: Array<[number, boolean]> = [
    [4 * KiB, false],
    [64 * KiB, false],
    [64 * KiB, true],
    [512 * KiB, false],
    [2 * MiB, false],
  ];
  for (const [cs, ext] of shapes) {
    it(`random images, cluster ${cs / KiB} KiB${ext ? ' with subclusters' : ''}, plain and compressed`, async () => {
      const seen = new Set<string>();
      for (let seed = 1; seed <= 3; seed++) {
        const rand = rng(seed * 7919 + cs + (ext ? 1 : 0));
        const img = join(dir, `r-${cs}-${ext}-${seed}.qcow2`);
        randomImage(img, rand, cs, ext);
        const variants = [img];
        if (!ext) {
          const c = join(dir, `c-${cs}-${seed}.qcow2`);
          execFileSync('qemu-img', ['convert', '-c', '-O', 'qcow2', '-o', `cluster_size=${cs}`, img, c]);
          variants.push(c);
          expect(await kinds(c)).toContain('compressed');
        }
        for (const k of await kinds(img)) seen.add(k);
        for (const path of variants) {
          const layer = readLayer(path, dir);
          for (const extentBytes of [Math.max(cs, MiB), 2 * Math.max(cs, 2 * MiB), 64 * MiB]) {
            // XXH64 hashes inline on the pool; SHA-256 goes to its worker threads.
            for (const algorithm of ['xxh64', 'sha256'] as const) {
              // Whole extents, and parts of a quarter extent (manifest version 3; never below a unit).
              for (const partBytes of [undefined, extentBytes / 4]) {
                const what = `${path} extent ${extentBytes} ${algorithm} part ${partBytes ?? 'none'}`;
                const opts = { extentBytes, algorithm, ...(partBytes ? { partBytes } : {}) };
                const reread = await digestLayer(path, opts);
                const streamed = stream(layer, extentBytes, rand, algorithm, partBytes);
                expect(streamed, what).toEqual(reread);
                // Hashed on the pool, reads in flight: the same digests.
                expect(await digestLayer(path, { ...opts, pool }), `${what}, pool`).toEqual(reread);
                // And both agree with the independent recomputation (subclusters included).
                expect(reread.extents, what).toEqual(recomputeDigests(path, dir, extentBytes, algorithm, partBytes).extents);
              }
            }
          }
          expect((await digestLayer(path)).extents.length).toBeGreaterThan(0);
        }
      }
      // The corpus holds every kind of unit it claims to cover.
      if (cs <= 64 * KiB) expect(seen).toEqual(new Set(['data', 'zero', 'unallocated']));
    });
  }
});

describe('LayerDigester refuses a feed it cannot digest', () => {
  const dg = () => new LayerDigester({ virtualSize: 4 * MiB, unitBytes: 64 * KiB, extentBytes: MiB });
  it('out of guest order, past the end, data without its bytes, a kind change inside a unit', () => {
    const a = dg();
    a.add(MiB, 64 * KiB, 'zero');
    expect(() => a.add(0, 64 * KiB, 'zero')).toThrow(/not in guest order/);
    expect(() => dg().add(4 * MiB - 512, 1024, 'zero')).toThrow(/past the disk/);
    expect(() => dg().add(0, 512, 'data', Buffer.alloc(511))).toThrow(/given 511 bytes/);
    expect(() => dg().add(0, 512, 'zero', Buffer.alloc(512))).toThrow(/carries no bytes/);
    const b = dg();
    b.add(0, 4096, 'data', Buffer.alloc(4096, 1));
    expect(() => b.add(4096, 4096, 'zero')).toThrow(/inside a data unit/);
    expect(() => b.add(8192, 4096, 'data', Buffer.alloc(4096))).toThrow(/inside a data unit/);
    expect(() => new LayerDigester({ virtualSize: MiB, unitBytes: 64 * KiB, extentBytes: 96 * KiB })).toThrow(/not a multiple/);
  });
  it('reports each extent as soon as the stream passes its end', () => {
    const seen: Array<[number, number]> = [];
    const a = new LayerDigester({
      virtualSize: 4 * MiB,
      unitBytes: 64 * KiB,
      extentBytes: MiB,
      onExtent: (e) => seen.push([e.index, a.position]),
    });
    a.add(0, 64 * KiB, 'data', Buffer.alloc(64 * KiB, 3));
    expect(seen).toEqual([]);
    a.add(2 * MiB, 64 * KiB, 'zero');
    expect(seen).toEqual([[0, MiB]]);
    const r = a.finish();
    expect(seen).toEqual([
      [0, MiB],
      [2, 3 * MiB],
    ]);
    expect(r.extents.map((e) => e.index)).toEqual([0, 2]);
  });
  it('an empty layer lists no extent; finish() twice gives the same result; nothing after finish', () => {
    const a = dg();
    a.add(2 * MiB, MiB, 'unallocated');
    const r = a.finish();
    expect(r).toEqual({ virtualSize: 4 * MiB, unitBytes: 64 * KiB, dataBytes: 0, zeroBytes: 0, extents: [] });
    expect(a.finish()).toBe(r);
    expect(() => a.add(3 * MiB, 512, 'unallocated')).toThrow(/finished/);
  });
});

describe('a manifest entry from streamed digests', () => {
  const dir = tempDir('layer-entry');
  it('equals the entry of a re-read; digests of another geometry are refused', async () => {
    const img = join(dir, 'e.qcow2');
    randomImage(img, rng(42), 64 * KiB, false);
    const layer = readLayer(img, dir);
    const streamed = stream(layer, 64 * MiB, rng(43));
    expect(await layerEntry(img, 'vol-1', streamed)).toEqual(
      await describeLayer(img, 'vol-1', { algorithm: 'xxh64', extentBytes: 64 * MiB }),
    );
    await expect(layerEntry(img, 'vol-1', { ...streamed, unitBytes: 4 * KiB })).rejects.toThrow(/units of 4096/);
    await expect(layerEntry(img, 'vol-1', { ...streamed, virtualSize: streamed.virtualSize + 512 })).rejects.toThrow(/virtual size/);
  });
});

describe('HashPool', () => {
  const dir = tempDir('hash-pool');
  it('closed while a digest runs: the digest fails, nothing hangs; a cancellation point stops it too', async () => {
    const img = join(dir, 'big.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', img, String(64 * MiB)]);
    execFileSync('qemu-io', ['-f', 'qcow2', '-c', `write -P 0x21 0 ${64 * MiB}`, img], { stdio: 'ignore' });
    const pool = new HashPool({ workers: 2, slotBytes: MiB, slots: 4 });
    const running = digestLayer(img, { extentBytes: 4 * MiB, algorithm: 'sha256', pool });
    const failed = expect(running).rejects.toThrow(/closed/);
    await pool.close();
    await failed;
    const pool2 = new HashPool({ workers: 1 });
    let n = 0;
    await expect(
      digestLayer(img, {
        extentBytes: 4 * MiB,
        algorithm: 'sha256',
        pool: pool2,
        between: () => {
          if (++n === 3) throw new Error('interrupted');
        },
      }),
    ).rejects.toThrow(/interrupted/);
    // The pool still serves a digest afterwards, equal to hashing here.
    const sha = { extentBytes: 4 * MiB, algorithm: 'sha256' } as const;
    expect(await digestLayer(img, { ...sha, pool: pool2 })).toEqual(await digestLayer(img, sha));
    await pool2.close();
  });

  it('XXH64 extents never start a worker (hashed inline); the first SHA-256 extent starts them', async () => {
    const img = join(dir, 'route.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', img, String(16 * MiB)]);
    execFileSync('qemu-io', ['-f', 'qcow2', '-c', `write -P 0x42 0 ${12 * MiB}`, img], { stdio: 'ignore' });
    const pool = new HashPool({ workers: 2, slotBytes: MiB, slots: 4 });
    try {
      const x = { extentBytes: 4 * MiB, algorithm: 'xxh64' } as const;
      expect(await digestLayer(img, { ...x, pool })).toEqual(await digestLayer(img, x));
      expect(pool.workersStarted).toBe(0);
      const sha = { extentBytes: 4 * MiB, algorithm: 'sha256' } as const;
      expect(await digestLayer(img, { ...sha, pool })).toEqual(await digestLayer(img, sha));
      expect(pool.workersStarted).toBeGreaterThan(0);
    } finally {
      await pool.close();
    }
    // warm() starts them ahead for SHA-256 only.
    const warmed = new HashPool({ workers: 2 });
    expect(warmed.warm('xxh64').workersStarted).toBe(0);
    expect(warmed.warm('sha256').workersStarted).toBe(2);
    await warmed.close();
  });
});

describe("HashPool slot runs (a piece's buffers)", () => {
  const settledNow = async <T>(p: Promise<T>): Promise<boolean> => {
    let done = false;
    void p.then(
      () => (done = true),
      () => (done = true),
    );
    for (let i = 0; i < 3; i++) await new Promise(setImmediate);
    return done;
  };

  it('adjacent slots per run, all of a request at once, in request order; a fragmented pool waits instead of splitting a run', async () => {
    const pool = new HashPool({ workers: 0, slotBytes: 1024, slots: 8 });
    try {
      const [a, b] = await pool.acquireRuns([3, 2]);
      expect([a!.length, b!.length]).toEqual([3072, 2048]);
      expect(pool.slotsOf(a!)).toEqual([0, 2]);
      expect(pool.slotsOf(b!)).toEqual([3, 4]);
      expect(pool.available).toBe(3);
      // 3 free slots (5-7) hold a run of 3, not a request of 2 + 2.
      const [c] = await pool.acquireRuns([3]);
      expect(pool.slotsOf(c!)).toEqual([5, 7]);
      pool.release(b!); // slots 3-4 free: 2 of them, not 3 in a row
      const waitsForThree = pool.acquireRuns([3]);
      expect(await settledNow(waitsForThree)).toBe(false);
      // Later requests queue behind it, even ones that would fit now (no starvation).
      const single = pool.acquire();
      expect(pool.tryAcquire()).toBeNull();
      expect(await settledNow(single)).toBe(false);
      pool.release(a!); // 0-4 free: the run of 3 first, then the single slot
      const [d] = await waitsForThree;
      expect(pool.slotsOf(d!)).toEqual([0, 2]);
      expect((await single).id).toBe(3);
      // A request larger than the pool can never be served: refused at once.
      await expect(pool.acquireRuns([5, 4])).rejects.toThrow(/do not fit a pool of 8/);
      await expect(pool.acquireRuns([0])).rejects.toThrow(RangeError);
    } finally {
      await pool.close();
    }
  });

  it('a run hashed in place across its slots is free again only once hashed; a closed pool fails its waiters', async () => {
    const pool = new HashPool({ workers: 0, slotBytes: 1024, slots: 4 });
    const [run] = await pool.acquireRuns([4]);
    run!.fill(0x5a);
    const sink = pool.sink('xxh64');
    sink.bytes(run!.subarray(500, 3500)); // spans all four slots
    pool.flush();
    pool.release(run!);
    // Still referenced by the message until the inline hasher ran.
    expect(pool.available).toBe(0);
    const x = createDigest('xxh64');
    x.update(Buffer.alloc(3000, 0x5a));
    const want = x.digest();
    expect(await sink.end()).toBe(want);
    expect(pool.available).toBe(4);
    const [held] = await pool.acquireRuns([3]);
    const waiting = pool.acquireRuns([2]);
    await pool.close();
    await expect(waiting).rejects.toThrow(/closed/);
    expect(held!.length).toBe(3072);
  });
});

describe('HashPool with the inline hasher (workers: 0)', () => {
  const dir = tempDir('hash-pool-inline');
  it('several layers fed side by side from the slots (XXH64 in place, SHA-256 too, pools at once) = each fed alone here', async () => {
    const rand = rng(1818);
    const unit = 4 * KiB;
    const size = 3 * MiB + 3 * unit + 1000;
    // Per layer a random feed in guest order: data (its bytes), zero or unallocated runs, odd piece sizes.
    const feeds = Array.from({ length: 4 }, () => {
      const ranges: Array<{ offset: number; length: number; kind: UnitKind; data?: Buffer }> = [];
      for (let pos = 0; pos < size;) {
        const kind: UnitKind = (['data', 'data', 'zero', 'unallocated'] as const)[rand(4)]!;
        let length = Math.min(size - pos, (1 + rand(40)) * unit);
        if (kind === 'data' && pos + length < size) length -= rand(3) * 777; // data may stop inside a unit
        const data = kind === 'data' ? Buffer.from(Array.from({ length }, () => rand(256))) : undefined;
        ranges.push({ offset: pos, length, kind, ...(data ? { data } : {}) });
        pos += length;
        // Another kind only at a unit boundary: a data run that stopped inside one goes on as data.
        if (pos % unit !== 0 && pos < size) {
          const more = Math.min(size - pos, unit - (pos % unit));
          ranges.push({ offset: pos, length: more, kind: 'data', data: Buffer.from(Array.from({ length: more }, () => rand(256))) });
          pos += more;
        }
      }
      return ranges;
    });
    const alone = (ranges: (typeof feeds)[number], algorithm: DigestAlgorithm) => {
      const dg = new LayerDigester({ virtualSize: size, unitBytes: unit, extentBytes: 16 * unit, algorithm });
      for (const r of ranges) dg.add(r.offset, r.length, r.kind, r.data);
      return dg.finish();
    };
    const pools = [
      new HashPool({ workers: 0, slotBytes: 48 * KiB, slots: 3 }),
      new HashPool({ workers: 1, slotBytes: 64 * KiB, slots: 4 }),
    ];
    try {
      const algorithms: DigestAlgorithm[] = ['xxh64', 'xxh64', 'sha256', 'xxh64'];
      const runs = feeds.map((ranges, i) => {
        const pool = pools[i % 2]!;
        const dg = new LayerDigester({
          virtualSize: size,
          unitBytes: unit,
          extentBytes: 16 * unit,
          algorithm: algorithms[i]!,
          sink: (a) => pool.sink(a),
        });
        return { pool, dg, ranges, next: 0 };
      });
      // By turns, one range each: its data copied into a slot (in pieces of the slot's size), fed from there.
      while (runs.some((r) => r.next < r.ranges.length)) {
        const r = runs[rand(runs.length)]!;
        const x = r.ranges[r.next++];
        if (!x) continue;
        if (!x.data) r.dg.add(x.offset, x.length, x.kind);
        else
          for (let at = 0; at < x.length; at += r.pool.slotBytes) {
            const slot = await r.pool.acquire();
            const n = Math.min(r.pool.slotBytes, x.length - at);
            // At an odd place in the slot: the stripes are not aligned.
            const from = rand(2) * Math.min(7, r.pool.slotBytes - n);
            x.data.copy(slot.buf, from, at, at + n);
            r.dg.add(x.offset + at, n, 'data', slot.buf.subarray(from, from + n));
            r.pool.flush();
            r.pool.done(slot);
          }
      }
      const got = await Promise.all(runs.map((r) => r.dg.settle()));
      expect(got).toEqual(feeds.map((f, i) => alone(f, algorithms[i]!)));
      expect(got.every((d) => d.extents.length > 0)).toBe(true);
    } finally {
      await Promise.all(pools.map((p) => p.close()));
    }
  });

  it('hashes on this thread but only after the sender moved on: a slot is held until then, and digests equal hashing here', async () => {
    const pool = new HashPool({ workers: 0, slotBytes: 64 * KiB, slots: 2 });
    try {
      expect(pool.threads).toBe(0);
      const slot = pool.tryAcquire()!;
      slot.buf.fill(0x5a);
      const sink = pool.sink('sha256');
      sink.repeat(1, 3);
      sink.bytes(slot.buf);
      sink.bytes(Buffer.from('literal'));
      pool.flush();
      pool.done(slot);
      // Not hashed within flush(): the slot is still referenced by the queued message.
      expect(pool.available).toBe(1);
      const digest = sink.end();
      await new Promise((r) => setImmediate(r));
      await new Promise((r) => setImmediate(r));
      expect(pool.available).toBe(2);
      const want = createHash('sha256')
        .update(Buffer.from([1, 1, 1]))
        .update(Buffer.alloc(64 * KiB, 0x5a))
        .update('literal')
        .digest('hex');
      expect(await digest).toBe(want);
    } finally {
      await pool.close();
    }
  });

  it('a re-read digest on the inline pool equals one hashed here; closed while digesting, the digest fails and nothing hangs', async () => {
    const img = join(dir, 'inline.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', img, String(24 * MiB)]);
    execFileSync('qemu-io', ['-f', 'qcow2', '-c', `write -P 0x33 0 ${9 * MiB}`, '-c', `write -z ${12 * MiB} ${MiB}`, img], {
      stdio: 'ignore',
    });
    const pool = new HashPool({ workers: 0, slotBytes: MiB, slots: 3 });
    expect(await digestLayer(img, { extentBytes: 4 * MiB, pool })).toEqual(await digestLayer(img, { extentBytes: 4 * MiB }));
    expect(pool.available).toBe(3);
    const running = digestLayer(img, { extentBytes: 4 * MiB, pool });
    const failed = expect(running).rejects.toThrow(/closed/);
    await pool.close();
    await failed;
  });
});
