// The verified flatten of a backing chain, for restore: the disk is processed piece by piece
// (a piece divides every layer's manifest extent). A layer is proven in GRAINS: its
// manifest's parts (version 3), else its extents. A grain of a layer CONTRIBUTES when any
// byte of it is not held by a layer above (the guest sees that layer's data, zero or hole
// there); each contributing grain is read whole — the bytes the guest sees and the ones
// newer layers hide there — so that its digest (the canonical stream of
// lib/store/layer-digest.ts) is checked while the flattened piece, composed from the same
// buffers (top layer wins), goes to the target. A grain wholly hidden by newer layers is not
// read: nothing of it reaches the target (`chain verify` proves those). With parts, a grain
// is 1 MiB, so a restore reads little beyond what the guest sees; with 64 MiB extents, an
// extent a newer layer hides partly is read whole. A damaged layer fails the restore at the
// first contributing grain that does not match, without reading the chain twice. Digests run
// on a HashPool (reads land in its slots; hashed inline or on workers); a layer without a
// manifest is read only where it is visible.
import { NasbackupError } from '../errors.js';
import type { ImageChain, Qcow2Image, Extent } from '../qcow2/index.js';
import { HashPool, type ExtentSink } from '../store/hash-pool.js';
import { LayerDigester, unallocatedDigest } from '../store/layer-digest.js';
import { PART_DIGEST_BYTES, type DigestAlgorithm } from '../store/digest/index.js';
import type { ExtentDigest } from '../store/manifest.js';

/** What one layer must hold, from its backup's manifest. */
export interface LayerExpectation {
  /** `<instance>/<timestamp>`, for messages. */
  backup: string;
  /** The disk's file name in that backup. */
  file: string;
  extentBytes: number;
  /** The manifest's digest algorithm. */
  algorithm: DigestAlgorithm;
  /**
   * Extent number → the manifest's entry (digest; with version 3 its parts' digests, which the
   * manifest's reader checked against it); an extent not listed must be wholly unallocated.
   */
  digests: ReadonlyMap<number, ExtentDigest>;
  /** Manifest version 3: the layer's part size (layerPartBytes); the layer is proven part by part. */
  partBytes?: number;
}

/** What a layer is proven in: its parts, else its extents. */
const grainOf = (e: LayerExpectation): number => e.partBytes ?? e.extentBytes;
/** Sorted, disjoint [from, to) ranges (of grain numbers, or of guest bytes). */
type Ranges = Array<[number, number]>;

/** One piece of the guest disk as it is read: `data` is null for a piece that reads as zeros without being read. */
export interface FlatExtent {
  offset: number;
  length: number;
  data: Buffer | null;
}

export interface FlattenOptions {
  /** Per layer (0 = top): what to check it against, or null (no manifest: read only where visible). */
  expect: ReadonlyArray<LayerExpectation | null>;
  /**
   * How the target takes the disk: `sparse` a file where a hole reads as zeros (only data is
   * written, all-zero data skipped); `device` every byte (it holds old data); `units` only
   * whole aligned units of `unit` bytes holding something other than zeros (a new qcow2 image:
   * what is not written reads as zeros).
   */
  target: { kind: 'sparse' } | { kind: 'device' } | { kind: 'units'; unit: number };
  /** Called for one write at a time (the next once this one settled). */
  write: (buf: Buffer, offset: number) => Promise<void>;
  /** A cancellation point before every piece. */
  checkpoint: () => void;
  /** Every range of the disk once, before it is written (tests, extension point). */
  inspect?: (extent: FlatExtent) => void | Promise<void>;
  progress?: (done: number, total: number) => void;
  pieceBytes?: number;
  /** Hash worker threads; 0 (the default) hashes on this thread, between the reads and writes. */
  hashWorkers?: number;
}

/**
 * Memory: every buffer a piece reads into is taken from one pool of BUFFER_BYTES, in slots of
 * SLOT_BYTES: a layer the piece reads gets adjacent slots spanning its reads there (one
 * buffer, so each read and each write is one request), and gives them back once hashed. So
 * memory is bounded by the pool whatever the disk size or the chain's shape, while requests
 * stay as large as a piece: a piece is PIECE bytes unless its buffers would take more than
 * half the pool (a proven layer's extent read beside the data hiding it, several layers
 * mixed), then halved down to a floor whose buffers for every layer the pool holds. Nothing
 * is composed into a piece-sized buffer: writes go out from the layers' buffers. The pool
 * keeps a restore within 32 MiB of the idle program's memory (issue 18): the rest of that
 * margin is the engine's own (tables, heap, the runtime's code pages it touches). Larger
 * requests matter on a small host: each one costs a hand-off to a libuv thread and back
 * (futex wake-ups, a promise), and a 3 GiB chain restored in 1 MiB pieces measured ~0.3 s
 * more CPU in those than in 4 MiB ones.
 */
export const PIECE = 4 << 20;
export const SLOT_BYTES = 1 << 20;
export const IN_FLIGHT = 4;
export const BUFFER_BYTES = 8 << 20;
const MIN_PIECE = 1 << 20;
/** The longest piece of a stretch no layer holds anything in, when no layer has a manifest (else its extent). */
const HOLE_SPAN = 64 << 20;

interface Run {
  pos: number;
  len: number;
  kind: Extent['kind'];
  /** Where a data run's bytes start in the layer's file (-1 for other kinds). */
  host: number;
  cc: NonNullable<Extent['compressed']> | null;
}
/** A guest range whose content comes from layer `layer` (data), or reads as zeros (layer -1). */
interface Seg {
  pos: number;
  len: number;
  layer: number;
}
/** A layer's buffer in one piece: guest byte `pos` of the layer is `buf[pos - base]`. */
interface LayerBuf {
  buf: Buffer;
  base: number;
}
const view = (lb: LayerBuf, pos: number, len: number): Buffer => lb.buf.subarray(pos - lb.base, pos - lb.base + len);

const ZEROS = Buffer.alloc(PIECE);
const isAllZero = (b: Buffer): boolean => {
  for (let o = 0; o < b.length; o += ZEROS.length) {
    const n = Math.min(ZEROS.length, b.length - o);
    if (!b.subarray(o, o + n).equals(ZEROS.subarray(0, n))) return false;
  }
  return true;
};
const gcd = (a: number, b: number): number => (b === 0 ? a : gcd(b, a % b));

/** How a chain is cut into pieces, and the pool its buffers come from. */
export interface PieceSizes {
  /** The largest piece: a power of two dividing every checked layer's extent (a piece never straddles two). */
  max: number;
  /** The smallest a piece is halved to: never below MIN_PIECE or a layer's unit (unless `max` is). */
  min: number;
  slot: number;
  /** The pool's slots: BUFFER_BYTES of them, never fewer than a smallest piece reading every layer takes. */
  slots: number;
}

export function pieceSizes(images: ReadonlyArray<Qcow2Image>, expect: ReadonlyArray<LayerExpectation | null>, want = PIECE): PieceSizes {
  let max = want;
  for (const e of expect) if (e) max = gcd(max, e.extentBytes);
  const min = Math.min(max, Math.max(MIN_PIECE, ...images.map((i) => i.subclusterSize)));
  const slot = Math.min(SLOT_BYTES, min);
  return { max, min, slot, slots: Math.max(Math.floor(BUFFER_BYTES / slot), images.length * Math.ceil(min / slot)) };
}

/** The largest piece (see pieceSizes): a new image's clusters divide it. */
export const pieceBytesFor = (images: ReadonlyArray<Qcow2Image>, expect: ReadonlyArray<LayerExpectation | null>, want = PIECE): number =>
  pieceSizes(images, expect, want).max;

/** A read of one piece: `len` guest bytes at `pos` of layer `L`, from its run `r`. */
interface PieceRead {
  L: number;
  r: Run;
  pos: number;
  len: number;
}

/** What one piece does, worked out from the layers' metadata when it is claimed. */
interface PiecePlan {
  runs: Run[][];
  segs: Seg[];
  reads: PieceRead[];
  /** Per layer, the guest ranges of the piece it is proven in (its contributing grains there). */
  prove: Ranges[];
  /** Per layer read, the guest range its buffer spans ([from, to)), in layer order. */
  spans: Array<{ L: number; from: number; to: number }>;
  /** Per span, the adjacent slots its buffer takes (the pool request). */
  counts: number[];
}

// The steps of a piece are functions of their own, not closures of flattenVerified: each is
// compiled (and, once offsets pass 2^31, recompiled) on its own, where one large async
// function was recompiled whole, at ~90 ms of the compiler's time each.

/** Each layer's statuses over [start, end), up to `until(L)` (metadata only; cached L2 tables). */
async function pieceRuns(images: ReadonlyArray<Qcow2Image>, start: number, end: number, until: (L: number) => number): Promise<Run[][]> {
  const runs: Run[][] = [];
  for (const [L, img] of images.entries()) {
    const stop = Math.min(end, until(L));
    const rs: Run[] = [];
    for (let pos = start; pos < stop;) {
      const e = await img.status(pos, stop - pos);
      const len = Math.min(e.length, stop - pos);
      rs.push({ pos, len, kind: e.kind, host: e.host ?? -1, cc: e.compressed ?? null });
      pos += len;
    }
    runs.push(rs);
  }
  return runs;
}

/** `ranges` (guest bytes) covers [pos, pos + len). */
const covers = (ranges: Ranges, pos: number, len: number): boolean => ranges.some(([a, b]) => a <= pos && pos + len <= b);

/** Each part of `r` inside `ranges` (guest bytes), as [from, to). */
function* clip(r: { pos: number; len: number }, ranges: Ranges): Generator<[number, number]> {
  for (const [a, b] of ranges) {
    const from = Math.max(a, r.pos);
    const to = Math.min(b, r.pos + r.len);
    if (from < to) yield [from, to];
  }
}

/** What a piece reads: a proven layer's data all of it where it is proven (whether seen or hidden), another layer's only where visible. */
function pieceReads(runs: Run[][], segs: Seg[], prove: Ranges[], expect: ReadonlyArray<LayerExpectation | null>): PieceRead[] {
  for (const s of segs)
    if (s.layer >= 0 && expect[s.layer] && !covers(prove[s.layer]!, s.pos, s.len))
      throw new Error(`internal: layer ${s.layer} is visible at ${s.pos} in a grain judged hidden`);
  const reads: PieceRead[] = [];
  for (const [L, rs] of runs.entries()) {
    for (const r of rs) {
      if (r.kind !== 'data' && r.kind !== 'compressed') continue;
      for (const [from, to] of clip(r, prove[L]!)) reads.push({ L, r, pos: from, len: to - from });
    }
  }
  for (const s of segs) {
    // A proven layer's visible data was read above (it lies in its proven grains).
    if (s.layer < 0 || expect[s.layer]) continue;
    // Visible data of an unproven layer: its run(s) over the segment.
    for (const r of runs[s.layer]!) {
      const a = Math.max(r.pos, s.pos);
      const b = Math.min(r.pos + r.len, s.pos + s.len);
      if (a < b) reads.push({ L: s.layer, r, pos: a, len: b - a });
    }
  }
  return reads;
}

/** One read into the layer's buffer. */
function readInto(img: Qcow2Image, lb: LayerBuf, { r, pos, len }: PieceRead): Promise<void> {
  if (r.kind === 'data') return img.readHost(lb.buf, pos - lb.base, len, r.host + (pos - r.pos));
  const cc = r.cc!;
  return img.readCompressed(cc).then((c) => {
    const from = pos - cc.clusterStart;
    c.copy(lb.buf, pos - lb.base, from, from + len);
  });
}

export async function flattenVerified(chain: ImageChain, o: FlattenOptions): Promise<{ dataBytes: number }> {
  const images = chain.images;
  const size = chain.virtualSize;
  // Where layer L is visible at all: below the smallest virtual size of the layers above it
  // and itself (past a backing file's end the guest reads zeros, like QEMU).
  const visLimit: number[] = [];
  images.forEach((img, i) => visLimit.push(Math.min(img.virtualSize, i === 0 ? size : visLimit[i - 1]!)));
  const sizes = pieceSizes(images, o.expect, o.pieceBytes);
  if (sizes.max > ZEROS.length) throw new RangeError(`piece ${sizes.max} is larger than ${PIECE}`);
  if (o.target.kind === 'units' && sizes.min % o.target.unit !== 0)
    throw new RangeError(`piece ${sizes.min} is not a multiple of the unit ${o.target.unit}`);
  for (const [i, e] of o.expect.entries()) {
    if (e && sizes.min % images[i]!.subclusterSize !== 0)
      throw new NasbackupError(
        'BACKUP_DAMAGED',
        `Backup ${e.backup}: disk ${e.file}: the manifest's extent size ${e.extentBytes} does not fit the layer's clusters`,
      );
  }
  const checked = o.expect.some((e) => e !== null);
  // Every layer buffer is taken from the hash pool (a proven layer's is hashed in place, no
  // copy; another layer's is handed back unhashed): the pool is the restore's memory.
  const hashPool = new HashPool({
    slotBytes: sizes.slot,
    slots: sizes.slots,
    // Inline by default: a worker's isolate costs ~12 MiB, and on 2 cores it measured no faster.
    workers: o.hashWorkers ?? 0,
  });
  // A piece is halved while its buffers take more than this (two such pieces in flight).
  const slotsPerPiece = Math.floor(sizes.slots / 2);
  // Per checked layer, the grains that contribute to the guest's view (metadata only).
  let needed: Array<Ranges | null>;
  try {
    needed = checked ? await contributingGrains(images, o.expect, visLimit) : o.expect.map(() => null);
  } catch (e) {
    await hashPool.close();
    throw e;
  }
  const verifier = new ChainVerifier(images, o.expect, needed, hashPool);

  /** What piece [start, end) reads, composes and proves (metadata only; cached L2 tables). */
  const plan = async (start: number, end: number): Promise<PiecePlan> => {
    // Where each layer's grains here are read whole (and proven).
    const prove = images.map((img, L) =>
      needed[L] ? provenIn(needed[L], grainOf(o.expect[L]!), start, Math.min(end, img.virtualSize)) : [],
    );
    // 1. Each layer's own statuses over the piece.
    const runs = await pieceRuns(images, start, end, (L) => Math.max(visLimit[L]!, prove[L]!.at(-1)?.[1] ?? 0));
    // 2. What the guest sees: top layer wins where it holds anything (data, zero, compressed).
    const segs = visibleSegments(runs, visLimit, start, end);
    // 3. Reads: a proven layer's data where it is proven, another layer's only where visible; each layer into its own buffer.
    const reads = pieceReads(runs, segs, prove, o.expect);
    const spans: PiecePlan['spans'] = [];
    for (const rd of reads) {
      const sp = spans.find((x) => x.L === rd.L);
      if (sp) {
        sp.from = Math.min(sp.from, rd.pos);
        sp.to = Math.max(sp.to, rd.pos + rd.len);
      } else spans.push({ L: rd.L, from: rd.pos, to: rd.pos + rd.len });
    }
    spans.sort((a, b) => a.L - b.L);
    const counts = spans.map((sp) => Math.ceil((sp.to - sp.from) / sizes.slot));
    return { runs, segs, reads, prove, spans, counts };
  };

  let next = 0;
  let done = 0;
  let dataBytes = 0;
  let failed = false;
  let hashTail: Promise<void> = Promise.resolve();
  // Writes go to the target one at a time, in the order pieces hand them over: buffered writes
  // to one file take its inode lock anyway, and writers waiting for it spin, burning the CPU
  // the reads and digests need, on threads the reads need too (measured on a 3 GiB chain:
  // 0.3-0.6 s less system time and ~9% less time without sync; a flushed restore, bound by
  // the disk's writes, moved inside the noise). IN_FLIGHT pieces are claimed at once; the pool
  // decides how many of them read at a time.
  let writeTail: Promise<void> = Promise.resolve();
  const writeInTurn = (data: Buffer, offset: number): Promise<void> => {
    const w = writeTail.then(() => o.write(data, offset));
    writeTail = w.then(
      () => {},
      () => {},
    );
    return w;
  };

  const onePiece = async (start: number, end: number, p: PiecePlan, grant: Promise<Buffer[]>, myTurn: Promise<void>): Promise<void> => {
    let taken: Buffer[] = [];
    try {
      // The buffers, granted in piece order (all of a piece's at once: it never holds part of
      // them while it waits, and the pool holds the largest piece's).
      taken = await grant;
      const bufs: Array<LayerBuf | null> = images.map(() => null);
      for (const [k, sp] of p.spans.entries()) bufs[sp.L] = { buf: taken[k]!, base: sp.from };
      await Promise.all(p.reads.map((r) => readInto(images[r.L]!, bufs[r.L]!, r)));
      // 4. The flattened piece to the target (it is removed if a digest fails later).
      const writes = compose(start, end, p.segs, bufs, o.target);
      for (const w of writes.inspect) await o.inspect?.(w);
      const written = Promise.all(writes.spans.map((w) => writeInTurn(w.data, w.offset)));
      written.catch(() => {}); // awaited below
      // 5. Digests, in disk order (a layer's extent spans several pieces).
      await myTurn;
      if (!failed) verifier.update(start, end, p.runs, bufs, p.prove);
      await written;
      dataBytes += writes.dataBytes;
      done += end - start;
      o.progress?.(done, size);
    } finally {
      // A slot is free again once what was sent of it is hashed (at once when nothing was).
      for (const b of taken) hashPool.release(b);
    }
  };

  // A stretch that no layer holds anything in is one piece however long, up to the end of the
  // manifest extent it lies in (so each proven layer's extent is still fed piece by piece in
  // order): an empty stretch of a large disk then costs a few status lookups instead of a
  // piece per MiB, whose short-lived objects would swell the heap (measured: +11 MiB of peak
  // RSS restoring a sparse 100 GiB chain of 5 layers).
  const span = o.expect.reduce((g, e) => (e ? gcd(g, e.extentBytes) : g), 0) || HOLE_SPAN;
  const holeEnd = async (start: number): Promise<number | null> => {
    const limit = Math.min(size, (Math.floor(start / span) + 1) * span);
    if (limit - start <= sizes.max) return null;
    let end = limit;
    // The oldest layer first: on a full disk it holds data, and one lookup settles it.
    for (let L = images.length - 1; L >= 0; L--) {
      const img = images[L]!;
      if (start >= img.virtualSize) continue; // past its end a layer holds nothing
      const stop = Math.min(end, img.virtualSize);
      const e = await img.status(start, stop - start);
      if (e.kind !== 'unallocated') return null;
      if (start + e.length < stop) end = start + e.length;
    }
    end = start + Math.floor((end - start) / sizes.max) * sizes.max;
    return end - start > sizes.max ? end : null;
  };
  // Pieces are claimed one at a time, in disk order: a claim looks up statuses, sizes the
  // piece and asks the pool for its buffers (so they are granted in disk order).
  let claims: Promise<unknown> = Promise.resolve();
  type Claim = { start: number; end: number; plan: PiecePlan; grant: Promise<Buffer[]>; prev: Promise<void>; release: () => void };
  const claim = (): Promise<Claim | null> => {
    const c = claims.then(async (): Promise<Claim | null> => {
      if (failed || next >= size) return null;
      const start = next;
      let end = (await holeEnd(start)) ?? Math.min(start + sizes.max, (Math.floor(start / sizes.max) + 1) * sizes.max, size);
      let p = await plan(start, end);
      // Halved while its buffers would take more than their share of the pool.
      while (p.counts.reduce((a, b) => a + b, 0) > slotsPerPiece && end - start > sizes.min) {
        end = start + Math.max(sizes.min, Math.floor((end - start) / 2 / sizes.min) * sizes.min);
        p = await plan(start, end);
      }
      next = end;
      const grant = p.counts.length ? hashPool.acquireRuns(p.counts) : Promise.resolve([]);
      grant.catch(() => {}); // awaited by the piece
      // This piece's turn to hash comes once the previous piece's did.
      const prev = hashTail;
      let release!: () => void;
      hashTail = new Promise<void>((r) => (release = r));
      return { start, end, plan: p, grant, prev, release };
    });
    claims = c.catch(() => {});
    return c;
  };

  const worker = async (): Promise<void> => {
    for (;;) {
      o.checkpoint();
      const c = await claim();
      if (c === null) return;
      try {
        await onePiece(c.start, c.end, c.plan, c.grant, c.prev);
      } finally {
        c.release();
      }
    }
  };
  try {
    const settled = await Promise.allSettled(
      Array.from({ length: IN_FLIGHT }, () =>
        worker().catch((e: unknown) => {
          failed = true;
          throw e;
        }),
      ),
    );
    const first = settled.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (first) throw first.reason;
    await verifier.finish();
  } catch (e) {
    hashPool.abandon();
    throw e;
  } finally {
    await hashPool.close();
  }
  return { dataBytes };
}

/**
 * Per checked layer, the grains that contribute to the guest's view: those with a byte below
 * the layer's visibility limit that no layer above holds (data, zero or compressed). Only
 * they can change what the target receives (the layer's data, its zeros, or its holes that
 * let older layers show), so only they are read and proven; the rest is wholly hidden. As
 * ranges of grain numbers: a 2 TiB disk in 1 MiB parts stays a few ranges.
 */
async function contributingGrains(
  images: ReadonlyArray<Qcow2Image>,
  expect: ReadonlyArray<LayerExpectation | null>,
  visLimit: number[],
): Promise<Array<Ranges | null>> {
  // What the layers above hold: sorted, disjoint [start, end) ranges.
  let covered: Array<[number, number]> = [];
  const out: Array<Ranges | null> = [];
  for (const [L, img] of images.entries()) {
    const lim = visLimit[L]!;
    const e = expect[L];
    if (e) {
      const set: Ranges = [];
      const g = grainOf(e);
      const free = (a: number, b: number): void => {
        const from = Math.floor(a / g);
        const to = Math.ceil(b / g);
        const last = set.at(-1);
        if (last && last[1] >= from) last[1] = Math.max(last[1], to);
        else set.push([from, to]);
      };
      let cur = 0;
      for (const [a, b] of covered) {
        if (a >= lim) break;
        if (a > cur) free(cur, a);
        cur = Math.max(cur, b);
      }
      if (cur < lim) free(cur, lim);
      out.push(set);
    } else out.push(null);
    if (L === images.length - 1) break;
    // Add this layer's held ranges (below its limit: nothing lower shows past it anyway).
    const mine: Array<[number, number]> = [];
    for (let pos = 0; pos < lim;) {
      const s = await img.status(pos, lim - pos);
      const len = Math.min(s.length, lim - pos);
      if (s.kind !== 'unallocated') {
        const last = mine.at(-1);
        if (last && last[1] === pos) last[1] = pos + len;
        else mine.push([pos, pos + len]);
      }
      pos += len;
    }
    covered = unionRanges(covered, mine);
  }
  return out;
}

/** The guest ranges of [start, end) that lie in the grains `needed` (grain numbers). */
function provenIn(needed: Ranges, grain: number, start: number, end: number): Ranges {
  const out: Ranges = [];
  // The first range that ends after `start`.
  let lo = 0;
  let hi = needed.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (needed[mid]![1] * grain <= start) lo = mid + 1;
    else hi = mid;
  }
  for (let i = lo; i < needed.length && needed[i]![0] * grain < end; i++)
    out.push([Math.max(start, needed[i]![0] * grain), Math.min(end, needed[i]![1] * grain)]);
  return out;
}

function unionRanges(a: Array<[number, number]>, b: Array<[number, number]>): Array<[number, number]> {
  const all = [...a, ...b].sort((x, y) => x[0] - y[0]);
  const out: Array<[number, number]> = [];
  for (const [s, e] of all) {
    const last = out.at(-1);
    if (last && s <= last[1]) last[1] = Math.max(last[1], e);
    else out.push([s, e]);
  }
  return out;
}

/** The guest's view of [start, end): segments from the top-most layer holding each range; zeros elsewhere. */
function visibleSegments(runs: Run[][], visLimit: number[], start: number, end: number): Seg[] {
  // The ranges no layer above holds yet, filled top-down: a range is taken by the first layer holding it.
  let free: Array<[number, number]> = [[start, end]];
  const segs: Seg[] = [];
  for (const [L, rs] of runs.entries()) {
    if (free.length === 0) break;
    const lim = Math.min(end, visLimit[L]!);
    const nextFree: Array<[number, number]> = [];
    let i = 0;
    for (const [fs, fe0] of free) {
      // Past this layer's end the guest reads zeros: nothing below shows there (limits only shrink downwards).
      if (fe0 > lim) segs.push({ pos: Math.max(fs, lim), len: fe0 - Math.max(fs, lim), layer: -1 });
      const fe = Math.min(fe0, lim);
      let cur = fs;
      while (i < rs.length && rs[i]!.pos + rs[i]!.len <= cur) i++;
      for (let j = i; j < rs.length && rs[j]!.pos < fe; j++) {
        const r = rs[j]!;
        if (r.kind === 'unallocated') continue;
        const a = Math.max(r.pos, cur);
        const b = Math.min(r.pos + r.len, fe);
        if (a >= b) continue;
        if (a > cur) nextFree.push([cur, a]);
        segs.push({ pos: a, len: b - a, layer: r.kind === 'zero' ? -1 : L });
        cur = b;
      }
      if (cur < fe) nextFree.push([cur, fe]);
    }
    free = nextFree;
  }
  for (const [fs, fe] of free) segs.push({ pos: fs, len: fe - fs, layer: -1 });
  return segs.sort((a, b) => a.pos - b.pos);
}

/**
 * The writes of one piece, each straight from the buffer of the layer it comes from (adjacent
 * segments of one layer are one write): on a sparse file, data only (all-zero data skipped);
 * on a device, every byte (zeros from a shared zero buffer); on a new image, runs of aligned
 * units holding something other than zeros, a unit that mixes layers composed in a buffer of
 * its own (rare: layers hold whole clusters).
 */
function compose(
  start: number,
  end: number,
  segs: Seg[],
  bufs: Array<LayerBuf | null>,
  target: FlattenOptions['target'],
): { spans: Array<{ offset: number; data: Buffer }>; inspect: FlatExtent[]; dataBytes: number } {
  const slice = (s: Seg): Buffer => view(bufs[s.layer]!, s.pos, s.len);
  const inspect = segs.map((s): FlatExtent => ({ offset: s.pos, length: s.len, data: s.layer < 0 ? null : slice(s) }));
  const spans: Array<{ offset: number; data: Buffer }> = [];
  let dataBytes = 0;
  if (target.kind === 'units') {
    // Aligned units holding something other than zeros, written straight from the layer's
    // buffer when one layer's data covers the unit, else composed (top layer wins). Where no
    // layer holds data the unit is known to be zeros without looking.
    // Offsets below are from the piece's start; a run is one layer's, written from its buffer.
    const unit = target.unit;
    const len = end - start;
    let runFrom = -1;
    let runBuf: LayerBuf | null = null;
    const flush = (to: number): void => {
      if (runFrom < 0) return;
      spans.push({ offset: start + runFrom, data: view(runBuf!, start + runFrom, to - runFrom) });
      dataBytes += to - runFrom;
      runFrom = -1;
      runBuf = null;
    };
    let si = 0;
    for (let u = 0; u < len; u += unit) {
      const ue = Math.min(u + unit, len);
      while (si < segs.length && segs[si]!.pos + segs[si]!.len <= start + u) si++;
      let data = false;
      let only: number | null = null; // the one layer over the whole unit, -2 when mixed
      for (let k = si; k < segs.length && segs[k]!.pos < start + ue; k++) {
        const L = segs[k]!.layer;
        if (L >= 0) data = true;
        only = only === null || only === L ? L : -2;
      }
      if (data && only === -2) {
        // A unit of its own: the piece's offsets shifted so that the unit sits at `u`.
        flush(u);
        const out = Buffer.alloc(ue - u);
        for (let k = si; k < segs.length && segs[k]!.pos < start + ue; k++) {
          const sg = segs[k]!;
          const a = Math.max(sg.pos, start + u) - start;
          const b = Math.min(sg.pos + sg.len, start + ue) - start;
          if (sg.layer >= 0) view(bufs[sg.layer]!, start + a, b - a).copy(out, a - u);
        }
        if (!isAllZero(out)) {
          spans.push({ offset: start + u, data: out });
          dataBytes += out.length;
        }
        continue;
      }
      const buf = data && !isAllZero(view(bufs[only!]!, start + u, ue - u)) ? bufs[only!]! : null;
      if (buf === null || (runBuf !== null && runBuf !== buf)) flush(u);
      if (buf !== null && runFrom < 0) {
        runFrom = u;
        runBuf = buf;
      }
    }
    flush(len);
    return { spans, inspect, dataBytes };
  }
  // A file or a device: runs of adjacent segments of one layer (or of zeros).
  for (let i = 0; i < segs.length;) {
    const L = segs[i]!.layer;
    let j = i + 1;
    while (j < segs.length && segs[j]!.layer === L) j++;
    const from = segs[i]!.pos;
    const to = segs[j - 1]!.pos + segs[j - 1]!.len;
    i = j;
    if (L < 0) {
      // Zeros: a hole of a sparse file; written on a device (it holds old data).
      if (target.kind === 'device')
        for (let at = from; at < to; at += ZEROS.length)
          spans.push({ offset: at, data: ZEROS.subarray(0, Math.min(ZEROS.length, to - at)) });
      continue;
    }
    const data = view(bufs[L]!, from, to - from);
    if (target.kind === 'sparse' && isAllZero(data)) continue;
    spans.push({ offset: from, data });
    dataBytes += data.length;
  }
  return { spans, inspect, dataBytes };
}

/**
 * Each proven layer's stream, fed in disk order to a LayerDigester (the one definition of a
 * manifest's digests), every extent compared with the manifest as soon as its digest is known
 * (on a hash worker, shortly after the stream passed its end); a mismatch fails with
 * BACKUP_DAMAGED naming the backup, the disk and the extent. Extents that do not contribute
 * to the guest's view are not fed (the digester sees them as holes and lists nothing there).
 */
class ChainVerifier {
  private readonly digesters: Array<LayerDigester | null>;
  /** Per layer, the manifest's digests of the contributing grains that hold something, not reached yet, in order. */
  private readonly listed: Array<Listed | null>;
  /** Comparisons waiting for a worker's digest. */
  private readonly checks: Array<Promise<void>> = [];
  private failure: Error | null = null;

  constructor(
    private readonly images: Qcow2Image[],
    private readonly expect: ReadonlyArray<LayerExpectation | null>,
    needed: ReadonlyArray<Ranges | null>,
    /** Where the digests are computed. */
    private readonly pool: HashPool,
  ) {
    this.listed = expect.map((e, L) => (e ? new Listed(expectedDigests(e, needed[L]!, images[L]!)) : null));
    this.digesters = images.map((img, L) => {
      const e = expect[L];
      if (!e) return null;
      // A grain's digest is the digester's "extent" digest when the grain is the extent, and a
      // part's digest (the same stream, cut at the part) when it is a part.
      const g = grainOf(e);
      const dg: LayerDigester = new LayerDigester({
        virtualSize: img.virtualSize,
        unitBytes: img.subclusterSize,
        extentBytes: g,
        algorithm: e.algorithm,
        sink: (a) => this.workerSink(L, pool.sink(a), () => Math.ceil(dg.position / g) - 1),
      });
      return dg;
    });
  }

  /** Feed piece [start, end) of every proven layer (called in disk order). */
  update(start: number, end: number, runs: Run[][], bufs: Array<LayerBuf | null>, prove: Ranges[]): void {
    if (this.failure) throw this.failure;
    for (const [L, dg] of this.digesters.entries()) {
      if (!dg || prove[L]!.length === 0) continue;
      // Only the proven grains: the others are holes to the digester, which lists nothing there.
      for (const r of runs[L]!) {
        if (r.kind === 'unallocated') continue; // a gap is unallocated
        for (const [from, to] of clip(r, prove[L]!)) {
          if (r.kind === 'zero') dg.add(from, to - from, 'zero');
          else dg.add(from, to - from, 'data', view(bufs[L]!, from, to - from));
        }
      }
      // The stream to the piece's end (what is left of it unallocated), so every grain that ends here is
      // reported; the listed ones that end here and were not reported held nothing.
      const reached = Math.min(end, this.images[L]!.virtualSize);
      if (start >= reached) continue;
      dg.add(reached, 0, 'unallocated');
      this.passed(L, reached === this.images[L]!.virtualSize ? Infinity : Math.floor(reached / grainOf(this.expect[L]!)));
    }
    // What was recorded goes to the workers now (the slots are theirs until hashed).
    this.pool.flush();
  }

  /** Every digester to the end of its layer: the extents not reached yet are settled, every digest compared. */
  async finish(): Promise<void> {
    for (const [L, dg] of this.digesters.entries()) {
      if (!dg) continue;
      await dg.settle();
      this.passed(L, Infinity);
    }
    await Promise.all(this.checks);
    if (this.failure) throw this.failure;
  }

  /** A sink hashed on a worker: its extent is compared once the worker answers. */
  private workerSink(L: number, s: ExtentSink, index: () => number): ExtentSink {
    return {
      repeat: (b, n) => s.repeat(b, n),
      bytes: (b) => s.bytes(b),
      end: () => {
        const digest = Promise.resolve(s.end());
        digest.catch(() => {}); // compared below, or abandoned when the extent is refused now
        const i = index();
        const want = this.take(L, i);
        this.checks.push(
          digest
            .then((d) => {
              if (d !== want) this.fail(L, i, 'the content does not match the digest in the manifest');
            })
            .catch((e: unknown) => void (this.failure ??= e instanceof Error ? e : new Error(String(e)))),
        );
        return digest;
      },
    };
  }

  /** The manifest's digest of a held grain the stream just passed (refused if it records none). */
  private take(L: number, index: number): string {
    this.passed(L, index);
    const list = this.listed[L]!;
    const want = list.next()?.[0] === index ? list.shift()[1] : undefined;
    if (want === undefined) this.fail(L, index, 'the layer holds data where its manifest records none');
    return want;
  }

  /** Listed grains below `index` were passed without holding anything. */
  private passed(L: number, index: number): void {
    const next = this.listed[L]!.next();
    if (next !== undefined && next[0] < index) this.fail(L, next[0], 'the layer holds nothing where its manifest records data');
  }

  private fail(L: number, index: number, why: string): never {
    const e = this.expect[L]!;
    const g = grainOf(e);
    const from = index * g;
    const to = Math.min(from + g, this.images[L]!.virtualSize);
    const per = e.extentBytes / g;
    const which = e.partBytes === undefined ? `extent ${index}` : `extent ${Math.floor(index / per)}, part ${index % per}`;
    throw new NasbackupError(
      'BACKUP_DAMAGED',
      `Backup ${e.backup} is damaged: disk ${e.file}, ${which} (guest bytes ${from}-${to}): ${why}`,
    );
  }
}

/** A cursor over the digests a layer's stream must produce: `next()` peeks, `shift()` takes. */
class Listed {
  private head: [number, string] | undefined;
  constructor(private readonly it: Iterator<[number, string]>) {
    this.head = it.next().value as [number, string] | undefined;
  }
  next(): [number, string] | undefined {
    return this.head;
  }
  shift(): [number, string] {
    const h = this.head!;
    this.head = this.it.next().value as [number, string] | undefined;
    return h;
  }
}

/**
 * The digests the stream of layer `img` must produce over its contributing grains, in order:
 * [grain number, digest] for each grain the manifest says holds something. With parts, an
 * extent's parts are decoded only when the restore reaches it (memory stays flat on a large
 * disk), and a part the manifest records as wholly unallocated (its digest is that of status
 * bytes only) is not listed: the digester reports nothing for such a part either.
 */
function* expectedDigests(e: LayerExpectation, needed: Ranges, img: Qcow2Image): Generator<[number, string]> {
  const g = grainOf(e);
  const per = e.extentBytes / g;
  const n = PART_DIGEST_BYTES[e.algorithm];
  for (const [a, b] of needed) {
    for (let i = a; i < b;) {
      const x = Math.floor(i / per);
      const extentEnd = Math.min(b, (x + 1) * per);
      const listed = e.digests.get(x);
      if (listed !== undefined && e.partBytes === undefined) yield [i, listed.digest];
      else if (listed !== undefined) {
        const bin = Buffer.from(listed.parts!, 'base64');
        for (let k = i; k < extentEnd; k++) {
          const d = bin.subarray((k - x * per) * n, (k - x * per + 1) * n).toString('hex');
          const units = Math.ceil((Math.min((k + 1) * g, img.virtualSize) - k * g) / img.subclusterSize);
          if (d !== unallocatedDigest(e.algorithm, units)) yield [k, d];
        }
      }
      i = extentEnd;
    }
  }
}
