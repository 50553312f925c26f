// The one copy path (stopped full backup, offline incremental, rebase, restore): a bounded
// pipeline from a source that knows its block status to a sink.
//
//   planner   walks the ranges with status(), aligns to the sink's unit, packs data into
//             requests of up to `requestBytes` (zero ranges carry no buffer and are never read)
//   readers   up to `buffers` requests read at once, each into a buffer of a fixed pool
//   delivery  strictly in guest order (the reorder window is the pool): zero detection per unit,
//             onRun (a streaming digest), then the sink's write, which runs while later reads do;
//             a buffer returns to the pool when its writes are done
//
// Memory is `buffers × requestBytes` whatever the disk size.
import { Qcow2Error } from '../errors.js';
import { pageAlignedBuffers } from '../io.js';

/** Anything that reads a guest disk with block status: an ImageChain satisfies it. */
export interface CopySource {
  readonly virtualSize: number;
  /** Status of [offset, offset + ≤maxLen): 'data'/'compressed' hold bytes, 'zero'/'unallocated' read as zeros. */
  status(offset: number, maxLen: number): Promise<{ length: number; kind: 'data' | 'compressed' | 'zero' | 'unallocated' }>;
  /** Guest bytes of [offset, offset + length) into buf[bufOffset..]. */
  readInto(buf: Buffer, bufOffset: number, offset: number, length: number): Promise<void>;
}

/** Where the copy goes: Qcow2Writer, RawFileSink, BlockDeviceSink. */
export interface CopySink {
  /** Unit the sink allocates in (cluster size); writes are aligned to it (or end at the virtual size). */
  readonly unit?: number;
  /** May be called again before an earlier call settled; `buf` is not touched after the promise settles. */
  writeData(offset: number, buf: Buffer): Promise<void>;
  /** The range must read as zeros afterwards. */
  writeZero(offset: number, length: number): Promise<void>;
}

/** A piece of the copied ranges, in guest order, as the sink was told. */
export interface CopyRun {
  offset: number;
  length: number;
  /** 'data': `data` holds the bytes (not all zeros at unit granularity when zero detection is on); 'zero': reads as zeros. */
  kind: 'data' | 'zero';
  /** Valid only until the onRun promise settles (a pool buffer). */
  data?: Buffer;
}

export interface CopyRange {
  offset: number;
  length: number;
}

/**
 * Read buffers lent by the caller (e.g. slots of a shared memory that hash workers read):
 * `take()` settles once one is free, `give()` returns it after its writes settled; every
 * buffer holds `size` bytes. A buffer given back may stay busy a while (a worker still
 * hashing it): `available` says how many can be taken now.
 */
export interface CopyBufferPool {
  readonly size: number;
  readonly available: number;
  take(): Promise<Buffer>;
  give(b: Buffer): void;
}

export interface CopyOptions {
  /**
   * Guest ranges to copy; default the whole disk. An array may be in any order. A stream is
   * consumed as the copy goes (memory does not grow with it) and must come in guest order
   * without overlap (QCOW2_RANGE otherwise). Both are widened to the unit and merged.
   */
  ranges?: CopyRange[] | AsyncIterable<CopyRange>;
  /** Bytes per read request (default 4 MiB). */
  requestBytes?: number;
  /** Buffers in the pool = reads/writes in flight (default 4). */
  buffers?: number;
  /** Use these buffers instead (requests are then at most its `size`; `buffers` is ignored). */
  bufferPool?: CopyBufferPool;
  /** Alignment unit (default the sink's `unit`, else 64 KiB). */
  unit?: number;
  /** Report data units that are all zeros as zero (default true). */
  detectZeros?: boolean;
  /** Upper bound on data bytes read per second (0/undefined: none). */
  rateBytesPerSec?: number;
  /** Called in guest order for every run of the copied ranges, before the sink sees it. */
  onRun?: (run: CopyRun) => void | Promise<void>;
  /** Guest bytes done (of the copied ranges) and their total (with streamed ranges: those seen so far), after each request. */
  onProgress?: (done: number, total: number) => void;
  /** Called before each request is started: throw to stop the copy (nothing then stays in flight). */
  checkpoint?: () => void;
}

export interface CopyStats {
  /** Guest bytes of the copied ranges. */
  totalBytes: number;
  /** Data bytes read from the source. */
  readBytes: number;
  /** Data bytes given to the sink (all-zero units excluded). */
  dataBytes: number;
  /** Bytes given to the sink as zeros. */
  zeroBytes: number;
  elapsedMs: number;
}

export const DEFAULT_REQUEST_BYTES = 4 << 20;
export const DEFAULT_BUFFERS = 4;

interface Piece {
  offset: number;
  length: number;
  kind: 'data' | 'zero';
  /** data: where it sits in the request's buffer */
  at: number;
}

interface Request {
  pieces: Piece[];
  dataBytes: number;
  buf: Buffer | null;
  read: Promise<void> | null;
}

/** Merge, widen to `unit` and clip ranges (the copy never reads partial units). */
export function normalizeRanges(ranges: CopyRange[], unit: number, size: number): CopyRange[] {
  const r = ranges
    .filter((x) => x.length > 0)
    .map((x) => ({
      start: Math.max(0, Math.floor(x.offset / unit) * unit),
      end: Math.min(size, Math.ceil((x.offset + x.length) / unit) * unit),
    }))
    .filter((x) => x.start < x.end)
    .sort((a, b) => a.start - b.start);
  const out: CopyRange[] = [];
  for (const x of r) {
    const last = out.at(-1);
    if (last && x.start <= last.offset + last.length) last.length = Math.max(last.length, x.end - last.offset);
    else out.push({ offset: x.start, length: x.end - x.start });
  }
  return out;
}

/** Streamed ranges widened to `unit`, clipped and merged as they come; they must be in guest order. */
async function* normalizeStream(ranges: AsyncIterable<CopyRange>, unit: number, size: number): AsyncGenerator<CopyRange> {
  let cur: CopyRange | null = null;
  let lastEnd = 0;
  for await (const x of ranges) {
    if (!(x.length > 0)) continue;
    if (x.offset < lastEnd) throw new Qcow2Error('QCOW2_RANGE', `streamed copy range at ${x.offset} is out of guest order`);
    lastEnd = x.offset + x.length;
    const start = Math.max(0, Math.floor(x.offset / unit) * unit);
    const end = Math.min(size, Math.ceil(lastEnd / unit) * unit);
    if (start >= end) continue;
    if (cur && start <= cur.offset + cur.length) cur.length = Math.max(cur.length, end - cur.offset);
    else {
      if (cur) yield cur;
      cur = { offset: start, length: end - start };
    }
  }
  if (cur) yield cur;
}

/** The status of `range` as alternating data / zero runs (zero and unallocated both read as zeros). */
async function* rawRuns(src: CopySource, range: CopyRange): AsyncGenerator<{ a: number; b: number; data: boolean }> {
  const end = range.offset + range.length;
  let cur: { a: number; b: number; data: boolean } | null = null;
  for (let pos = range.offset; pos < end;) {
    const s = await src.status(pos, end - pos);
    if (!(s.length > 0)) throw new Qcow2Error('QCOW2_RANGE', `no progress in the status at ${pos}`);
    const b = Math.min(end, pos + s.length);
    const data = s.kind === 'data' || s.kind === 'compressed';
    if (cur && cur.data === data) cur.b = b;
    else {
      if (cur) yield cur;
      cur = { a: pos, b, data };
    }
    pos = b;
  }
  if (cur) yield cur;
}

/**
 * The runs aligned to `unit`: a unit touched by data is data, a unit wholly zero is zero (the
 * range itself is unit-aligned, or ends at the disk's end). Contiguous, merged by kind.
 */
async function* alignedPieces(
  src: CopySource,
  range: CopyRange,
  unit: number,
): AsyncGenerator<{ offset: number; length: number; kind: 'data' | 'zero' }> {
  const end = range.offset + range.length;
  const up = (x: number): number => Math.min(end, Math.ceil(x / unit) * unit);
  const down = (x: number): number => (x === end ? end : Math.floor(x / unit) * unit);
  let pos = range.offset; // everything before is emitted
  let dataEnd = -1; // a pending data piece [pos, dataEnd)
  for await (const r of rawRuns(src, range)) {
    if (r.data) {
      if (dataEnd < 0) dataEnd = pos;
      dataEnd = Math.max(dataEnd, up(r.b));
      continue;
    }
    // A zero run: its whole units are zero, its partial edges belong to the data around it.
    const za = Math.max(up(r.a), dataEnd < 0 ? pos : dataEnd);
    const zb = down(r.b);
    if (za >= zb) continue;
    if (za > pos) {
      yield { offset: pos, length: za - pos, kind: 'data' };
    }
    yield { offset: za, length: zb - za, kind: 'zero' };
    pos = zb;
    dataEnd = -1;
  }
  if (pos < end) yield { offset: pos, length: end - pos, kind: 'data' };
}

/** Pieces packed into requests holding at most `requestBytes` of data. */
async function* requests(
  src: CopySource,
  ranges: Iterable<CopyRange> | AsyncIterable<CopyRange>,
  unit: number,
  requestBytes: number,
): AsyncGenerator<Request> {
  let req: Request = { pieces: [], dataBytes: 0, buf: null, read: null };
  for await (const range of ranges) {
    for await (const p of alignedPieces(src, range, unit)) {
      if (p.kind === 'zero') {
        req.pieces.push({ ...p, at: 0 });
        continue;
      }
      for (let off = p.offset; off < p.offset + p.length;) {
        if (req.dataBytes >= requestBytes) {
          yield req;
          req = { pieces: [], dataBytes: 0, buf: null, read: null };
        }
        const n = Math.min(requestBytes - req.dataBytes, p.offset + p.length - off);
        req.pieces.push({ offset: off, length: n, kind: 'data', at: req.dataBytes });
        req.dataBytes += n;
        off += n;
      }
    }
  }
  if (req.pieces.length) yield req;
}

/** `count` buffers of `size` bytes, allocated once (page-aligned: faster kernel copies) and lent in turn. */
export class BufferPool implements CopyBufferPool {
  private readonly free: Buffer[];
  private readonly waiters: Array<(b: Buffer) => void> = [];
  constructor(
    count: number,
    readonly size: number,
  ) {
    this.free = pageAlignedBuffers(count, size);
  }
  get available(): number {
    return this.free.length;
  }
  take(): Promise<Buffer> {
    const b = this.free.pop();
    if (b) return Promise.resolve(b);
    return new Promise((resolve) => this.waiters.push(resolve));
  }
  give(b: Buffer): void {
    const w = this.waiters.shift();
    if (w) w(b);
    else this.free.push(b);
  }
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Copy `ranges` of `src` into `sink` (null: only onRun sees the data, e.g. a digest or a verify). */
export async function copyImage(src: CopySource, sink: CopySink | null, opts: CopyOptions = {}): Promise<CopyStats> {
  const started = Date.now();
  const unit = opts.unit ?? sink?.unit ?? 65536;
  const lent = opts.bufferPool;
  const asked = Math.min(opts.requestBytes ?? DEFAULT_REQUEST_BYTES, lent ? lent.size : Infinity);
  if (lent && lent.size < unit) throw new Qcow2Error('QCOW2_RANGE', `buffers of ${lent.size} bytes cannot hold a unit of ${unit}`);
  const requestBytes = Math.max(unit, Math.floor(asked / unit) * unit);
  const detect = opts.detectZeros ?? true;
  const size = src.virtualSize;
  const given = opts.ranges ?? [{ offset: 0, length: size }];
  const stats: CopyStats = { totalBytes: 0, readBytes: 0, dataBytes: 0, zeroBytes: 0, elapsedMs: 0 };
  let ranges: Iterable<CopyRange> | AsyncIterable<CopyRange>;
  if (Array.isArray(given)) {
    const list = normalizeRanges(given, unit, size);
    stats.totalBytes = list.reduce((a, r) => a + r.length, 0);
    ranges = list;
  } else {
    // Counted as they come: the total is what the stream has handed on so far.
    const stream = normalizeStream(given, unit, size);
    ranges = (async function* () {
      for await (const r of stream) {
        stats.totalBytes += r.length;
        yield r;
      }
    })();
  }
  const pool: CopyBufferPool = lent ?? new BufferPool(Math.max(1, opts.buffers ?? DEFAULT_BUFFERS), requestBytes);
  const queue: Request[] = [];
  const writes = new Set<Promise<void>>();
  const failed: { error: Error | null } = { error: null };
  let done = 0;
  const zeros = detect ? Buffer.alloc(unit) : null;

  const emit = async (run: CopyRun, tracked: Array<Promise<void>>): Promise<void> => {
    if (opts.onRun) await opts.onRun(run);
    if (run.kind === 'data') stats.dataBytes += run.length;
    else stats.zeroBytes += run.length;
    if (sink) tracked.push(run.kind === 'data' ? sink.writeData(run.offset, run.data!) : sink.writeZero(run.offset, run.length));
  };

  const deliver = async (req: Request): Promise<void> => {
    if (req.read)
      await req.read.catch((e: unknown) => {
        // Nothing was handed on from this buffer: it goes back now.
        pool.give(req.buf!);
        throw e;
      });
    const tracked: Array<Promise<void>> = [];
    try {
      for (const p of req.pieces) {
        if (p.kind === 'zero') {
          await emit({ offset: p.offset, length: p.length, kind: 'zero' }, tracked);
          continue;
        }
        const data = req.buf!.subarray(p.at, p.at + p.length);
        if (!zeros) {
          await emit({ offset: p.offset, length: p.length, kind: 'data', data }, tracked);
          continue;
        }
        // Split into runs of all-zero units and data units.
        let runStart = 0;
        let runZero = false;
        for (let o = 0; o < p.length; o += unit) {
          const n = Math.min(unit, p.length - o);
          const z = data.subarray(o, o + n).equals(n === unit ? zeros : zeros.subarray(0, n));
          if (o === 0) runZero = z;
          else if (z !== runZero) {
            await emit(run(p.offset, data, runStart, o, runZero), tracked);
            runStart = o;
            runZero = z;
          }
        }
        await emit(run(p.offset, data, runStart, p.length, runZero), tracked);
      }
    } finally {
      // The buffer goes back once the sink is done with it (whatever happened).
      const all = Promise.all(tracked).then(() => {});
      const w = all.then(
        () => {},
        (e: unknown) => {
          failed.error ??= e instanceof Error ? e : new Error(String(e));
        },
      );
      writes.add(w);
      void w.finally(() => {
        writes.delete(w);
        if (req.buf) pool.give(req.buf);
      });
    }
    done += req.pieces.reduce((a, p) => a + p.length, 0);
    opts.onProgress?.(done, stats.totalBytes);
    if (failed.error) throw failed.error;
  };

  const rate = opts.rateBytesPerSec && opts.rateBytesPerSec > 0 ? opts.rateBytesPerSec : 0;
  const rateStart = Date.now();
  try {
    for await (const req of requests(src, ranges, unit, requestBytes)) {
      if (failed.error) throw failed.error;
      opts.checkpoint?.();
      if (req.dataBytes > 0) {
        // Deliver (in order) until a buffer is free: the pool bounds reads and writes in flight.
        while (pool.available === 0 && queue.length > 0) await deliver(queue.shift()!);
        req.buf = await pool.take();
        if (rate) {
          const due = rateStart + (stats.readBytes / rate) * 1000;
          const wait = due - Date.now();
          if (wait > 0) await sleep(wait);
        }
        stats.readBytes += req.dataBytes;
        const buf = req.buf;
        req.read = Promise.all(req.pieces.filter((p) => p.kind === 'data').map((p) => src.readInto(buf, p.at, p.offset, p.length))).then(
          () => {},
        );
        req.read.catch(() => {}); // awaited in order by deliver
      }
      queue.push(req);
      // Zero-only requests at the head need no read: hand them on at once.
      while (queue.length > 0 && queue[0]!.read === null) await deliver(queue.shift()!);
    }
    while (queue.length > 0) await deliver(queue.shift()!);
    while (writes.size) await Promise.all([...writes]);
    if (failed.error) throw failed.error;
  } catch (e) {
    // Nothing may stay in flight once we return: reads into pool buffers, sink writes.
    await Promise.allSettled(queue.map((r) => r.read ?? Promise.resolve()));
    // Requests read but never delivered: their buffers go back (a lent pool outlives the copy).
    for (const r of queue.splice(0)) if (r.buf) pool.give(r.buf);
    while (writes.size) await Promise.allSettled([...writes]);
    throw e;
  }
  stats.elapsedMs = Date.now() - started;
  return stats;
}

function run(base: number, data: Buffer, from: number, to: number, zero: boolean): CopyRun {
  return zero
    ? { offset: base + from, length: to - from, kind: 'zero' }
    : { offset: base + from, length: to - from, kind: 'data', data: data.subarray(from, to) };
}
