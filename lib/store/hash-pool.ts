// Extent digests off the reader's path: SHA-256 on worker threads, so the digests of
// different extents are computed on every core while the main thread only reads. The
// workers know nothing of the canonical stream (layer-digest.ts builds it); they hash what
// they are told, in order: a byte
// repeated n times, a range of the shared read buffer, or literal bytes. Reads land in
// slots of one shared memory that the workers see too, so data is never copied between
// threads; a slot is free again once the worker that hashed it says so. That memory is the
// XXH64 module's (digest/xxh64.ts), so XXH64 hashes a slot where it lies, never copying it.
// With `workers: 0` the same messages are hashed on this thread, one per turn of the event
// loop after the sender moved on (an inline hasher): no isolate to pay for (~12 MiB), and
// the hashing of a slot overlaps its write and the next reads, which the libuv threads do.
// XXH64 (~6 GB/s on one core, faster than any disk or NAS here) is always hashed inline, so
// workers start only when a SHA-256 manifest is read or written.
import { markPageAligned } from '../qcow2/index.js';
import { createDigest, Xxh64, Xxh64Memory, type DigestAlgorithm, type StreamDigest } from './digest/index.js';
import { availableParallelism } from 'node:os';
import { Worker } from 'node:worker_threads';

/** What a hash sink receives (layer-digest.ts): one extent's stream, piece by piece. */
export interface ExtentSink {
  /** `n` copies of `byte`. */
  repeat(byte: number, n: number): void;
  bytes(b: Buffer): void;
  /** The hex digest of everything given, now or once a worker has hashed it. */
  end(): string | Promise<string>;
  /**
   * Optional, for a manifest's parts: `cut()` ends a part here (the hash restarts), and
   * `endParts()` ends the last one and gives every part's digest, in order. One sink then
   * carries an extent's parts, where a sink per part would cost a message and a job each.
   */
  cut?(): void;
  endParts?(): string[] | Promise<string[]>;
}

/** One read buffer of the pool. */
export interface Slot {
  readonly id: number;
  readonly buf: Buffer;
}

/** A request waiting for slots: adjacent runs of `counts[i]` slots, granted all at once. */
interface Waiter {
  counts: number[];
  grant: (firsts: number[]) => void;
  reject: (e: Error) => void;
}

const OP_REPEAT = 0;
const OP_RANGE = 1;
const OP_LITERAL = 2;
const OP_CUT = 3;

/**
 * CommonJS source, evaluated: the same from dist/ and from the single-file bundle (no
 * worker file to find). Messages: {job, ops: Float64Array of [op, a, b] triples,
 * literals, end, release}; reply {job, digest (when end), parts (the digests of the parts
 * cut before the last, when end), release}.
 */
const HASH_WORKER = String.raw`
const { parentPort, workerData } = require('node:worker_threads');
const { createHash } = require('node:crypto');
const mem = Buffer.from(workerData.sab);
const fills = new Map();
const jobs = new Map();
parentPort.on('message', (m) => {
  if (m === 'stop') { parentPort.close(); return; }
  let j = jobs.get(m.job);
  if (!j) jobs.set(m.job, (j = { h: createHash('sha256'), parts: [] }));
  const ops = m.ops;
  for (let i = 0; i < ops.length; i += 3) {
    const t = ops[i], a = ops[i + 1], b = ops[i + 2];
    if (t === 0) {
      let f = fills.get(a);
      if (!f) fills.set(a, (f = Buffer.alloc(65536, a)));
      for (let left = b; left > 0; left -= f.length) j.h.update(left >= f.length ? f : f.subarray(0, left));
    } else if (t === 1) j.h.update(mem.subarray(a, a + b));
    else if (t === 2) j.h.update(m.literals[a]);
    else { j.parts.push(j.h.digest('hex')); j.h = createHash('sha256'); }
  }
  let digest = null, parts = null;
  if (m.end) { digest = j.h.digest('hex'); parts = j.parts; jobs.delete(m.job); }
  parentPort.postMessage({ job: m.job, digest, parts, release: m.release });
});
`;

interface HashMessage {
  job: number;
  /** A worker only ever gets sha256. */
  alg: DigestAlgorithm;
  ops: Float64Array;
  literals: Buffer[];
  end: boolean;
  release: number[];
}

interface HashReply {
  job: number;
  digest: string | null;
  /** With the digest: the parts cut before the last one. */
  parts: string[] | null;
  release: number[];
}

/** What the pool posts to: a Worker, or the inline hasher. */
interface Hasher {
  postMessage(m: HashMessage): void;
  terminate(): Promise<unknown>;
}

/**
 * The worker's loop on this thread: messages queued, each hashed in its own setImmediate
 * turn (I/O completions run in between), replies given as a worker's would be.
 */
class InlineHasher implements Hasher {
  private readonly queue: HashMessage[] = [];
  private readonly jobs = new Map<number, { h: StreamDigest; parts: string[] }>();
  private scheduled = false;
  private stopped = false;

  private readonly mem: Buffer;

  constructor(
    private readonly xmem: Xxh64Memory,
    private readonly reply: (m: HashReply) => void,
    private readonly fail: (e: Error) => void,
  ) {
    this.mem = Buffer.from(xmem.buffer);
  }

  postMessage(m: HashMessage): void {
    if (this.stopped) return;
    this.queue.push(m);
    this.schedule();
  }

  terminate(): Promise<void> {
    this.stopped = true;
    this.queue.length = 0;
    this.jobs.clear();
    return Promise.resolve();
  }

  private schedule(): void {
    if (this.scheduled || this.queue.length === 0) return;
    this.scheduled = true;
    setImmediate(() => {
      this.scheduled = false;
      const m = this.queue.shift();
      if (!m || this.stopped) return;
      try {
        this.reply(this.hash(m));
      } catch (e) {
        this.fail(e instanceof Error ? e : new Error(String(e)));
        return;
      }
      this.schedule();
    });
  }

  private hash(m: HashMessage): HashReply {
    let j = this.jobs.get(m.job);
    if (!j) this.jobs.set(m.job, (j = { h: createDigest(m.alg, this.xmem), parts: [] }));
    let h = j.h;
    // XXH64 reads the slots where they lie (the pool's memory is the module's).
    let inPlace = h instanceof Xxh64 ? h : null;
    const ops = m.ops;
    for (let i = 0; i < ops.length; i += 3) {
      const t = ops[i]!;
      const a = ops[i + 1]!;
      const b = ops[i + 2]!;
      if (t === OP_REPEAT) h.repeat(a, b);
      else if (t === OP_RANGE) {
        if (inPlace) inPlace.updateAt(a, b);
        else h.update(this.mem.subarray(a, a + b));
      } else if (t === OP_LITERAL) h.update(m.literals[a]!);
      else {
        j.parts.push(h.digest());
        j.h = h = createDigest(m.alg, this.xmem);
        inPlace = h instanceof Xxh64 ? h : null;
      }
    }
    let digest: string | null = null;
    let parts: string[] | null = null;
    if (m.end) {
      digest = h.digest();
      parts = j.parts;
      this.jobs.delete(m.job);
    }
    return { job: m.job, digest, parts, release: m.release };
  }
}

interface Pending<T> {
  resolve: (v: T) => void;
  reject: (e: Error) => void;
}

export interface HashPoolOptions {
  /** SHA-256 worker threads (default: one per core, at most 4; started on first use); 0: hash on this thread, after the caller moved on. */
  workers?: number;
  slotBytes?: number;
  slots?: number;
}

export class HashPool {
  readonly slotBytes: number;
  /** Worker threads (0: the inline hasher on this thread). */
  readonly threads: number;
  /** The slots' memory: the XXH64 module's (hashed in place), shared with the workers (SHA-256). */
  private readonly xmem: Xxh64Memory;
  private readonly mem: Buffer;
  /** Index 0..threads-1: the workers; index `threads`: the inline hasher. Each made on first use. */
  private readonly hashers: Array<Hasher | undefined> = [];
  /** Outstanding extents per hasher. */
  private readonly load: number[] = [];
  /** Bytes sent to each worker and not hashed yet, per message in order (replies come in order). */
  private readonly backlog: number[][] = [];
  private readonly backlogBytes: number[] = [];
  /** Per slot: free (neither read into nor waiting for a hasher). */
  private readonly isFree: boolean[] = [];
  private freeCount = 0;
  /** References per slot: the reader's until done(), and one per message that carries it. */
  private readonly refs: number[] = [];
  /** Served in order: a request that does not fit yet holds back the ones behind it (no starvation). */
  private readonly waiting: Waiter[] = [];
  private readonly jobs = new Map<number, Pending<HashReply>>();
  private readonly open = new Set<RecordingSink>();
  private nextJob = 1;
  private failure: Error | null = null;
  private closed = false;

  constructor(opts: HashPoolOptions = {}) {
    const threads = Math.max(0, opts.workers ?? Math.min(4, availableParallelism()));
    this.threads = threads;
    const workers = Math.max(1, threads);
    this.slotBytes = opts.slotBytes ?? 4 << 20;
    const slots = Math.max(2, opts.slots ?? 4 * workers + 2);
    // Sized once: the memory never grows, so the slots' views stay valid.
    this.xmem = new Xxh64Memory(this.slotBytes * slots);
    // Its slots start at page boundaries: reads may land in them past the page cache (lib/qcow2/io.ts).
    markPageAligned(this.xmem.buffer);
    this.mem = Buffer.from(this.xmem.buffer);
    for (let i = 0; i < slots; i++) {
      this.isFree.push(true);
      this.refs.push(0);
    }
    this.freeCount = slots;
    for (let i = 0; i <= threads; i++) {
      this.hashers.push(undefined);
      this.load.push(0);
      this.backlog.push([]);
      this.backlogBytes.push(0);
    }
  }

  private hasher(i: number): Hasher {
    let h = this.hashers[i];
    if (h) return h;
    if (i === this.threads)
      h = new InlineHasher(
        this.xmem,
        (m) => this.reply(i, m),
        (e) => this.fail(e),
      );
    else {
      const w = new Worker(HASH_WORKER, { eval: true, workerData: { sab: this.xmem.buffer } });
      w.on('message', (m: HashReply) => this.reply(i, m));
      w.on('error', (e) => this.fail(e));
      w.on('exit', (code) => {
        if (!this.closed) this.fail(new Error(`a hash worker exited (code ${code})`));
      });
      h = w;
    }
    this.hashers[i] = h;
    return h;
  }

  /**
   * Start the workers now when `algorithm` is one they hash (SHA-256): a caller that knows
   * the algorithm early (a running VM's backup, while QEMU copies) takes their start-up
   * (threads, module loading) off its path. Otherwise they start with the first extent.
   */
  warm(algorithm: DigestAlgorithm): this {
    if (algorithm === 'sha256') for (let i = 0; i < this.threads; i++) this.hasher(i);
    return this;
  }

  /** Worker threads started so far (they start with the first SHA-256 extent, or warm()). */
  get workersStarted(): number {
    return this.hashers.slice(0, this.threads).filter(Boolean).length;
  }

  /** Slots free now (neither read into nor waiting for a worker). */
  get available(): number {
    return this.freeCount;
  }

  /** The pool's slot count. */
  get size(): number {
    return this.refs.length;
  }

  /** A free slot, or null when all are in use (or others wait). Give it back with done() once fed. */
  tryAcquire(): Slot | null {
    this.throwIfFailed();
    if (this.waiting.length > 0) return null;
    const at = this.place([1]);
    return at ? this.slot(at[0]!) : null;
  }

  /** A free slot, waiting for a worker to release one (the caller must have flushed). */
  acquire(): Promise<Slot> {
    return this.acquireRuns([1]).then(([b]) => ({ id: this.slotOf(b!)!, buf: b! }));
  }

  /**
   * One buffer per count, each `count` adjacent slots (one contiguous read buffer of that
   * many slots' bytes), granted all at once, after every request made before it: a caller
   * that takes everything it needs in one request never holds part of it while it waits, so
   * requests that each fit the pool are always served. Give each back with release().
   */
  acquireRuns(counts: number[]): Promise<Buffer[]> {
    this.throwIfFailed();
    if (counts.some((n) => !Number.isInteger(n) || n < 1) || counts.reduce((a, b) => a + b, 0) > this.size)
      return Promise.reject(new RangeError(`slot runs ${counts.join(', ')} do not fit a pool of ${this.size}`));
    const at = this.waiting.length === 0 ? this.place(counts) : null;
    if (at) return Promise.resolve(this.runs(at, counts));
    return new Promise((resolve, reject) => this.waiting.push({ counts, grant: (firsts) => resolve(this.runs(firsts, counts)), reject }));
  }

  /** The reader is done with the slot: free once every message that carries it was hashed. */
  done(slot: Slot): void {
    this.unref([slot.id]);
  }

  /** done() for every slot of a buffer acquireRuns() gave. */
  release(buf: Buffer): void {
    const r = this.slotsOf(buf);
    if (!r) throw new RangeError('not a buffer of this pool');
    const ids: number[] = [];
    for (let id = r[0]; id <= r[1]; id++) ids.push(id);
    this.unref(ids);
  }

  /**
   * A sink for one extent: SHA-256 goes to the worker with the fewest bytes waiting (then the
   * fewest extents), XXH64 (or anything without workers) to the inline hasher.
   */
  sink(algorithm: DigestAlgorithm): ExtentSink {
    this.throwIfFailed();
    let w = this.threads;
    if (algorithm === 'sha256' && this.threads > 0) {
      w = 0;
      const lighter = (i: number): boolean =>
        this.backlogBytes[i]! < this.backlogBytes[w]! || (this.backlogBytes[i] === this.backlogBytes[w] && this.load[i]! < this.load[w]!);
      for (let i = 1; i < this.threads; i++) if (lighter(i)) w = i;
    }
    this.load[w]!++;
    const s = new RecordingSink(this, this.nextJob++, w, algorithm);
    this.open.add(s);
    return s;
  }

  /** Send what every open sink recorded so far, and the slots it referenced (free once hashed). */
  flush(): void {
    for (const s of this.open) s.flush(false);
  }

  /** A digest given up (its reader failed): its open extents are ended, their results dropped. */
  abandon(): void {
    if (this.failure) return;
    for (const s of [...this.open]) s.end().catch(() => {});
  }

  /** Stop the workers; pending digests fail. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.fail(new Error('the hash pool was closed'));
    await Promise.all(this.hashers.flatMap((w) => (w ? [w.terminate()] : [])));
  }

  // ---- internal (RecordingSink and the workers' replies) ----

  slotOf(b: Buffer): number | null {
    return this.slotsOf(b)?.[0] ?? null;
  }

  /** The first and last slot a buffer of the pool spans, or null for another buffer. */
  slotsOf(b: Buffer): [number, number] | null {
    const { buffer, base } = this.xmem;
    if (b.buffer !== buffer || b.byteOffset < base) return null;
    const first = Math.floor((b.byteOffset - base) / this.slotBytes);
    return [first, Math.max(first, Math.floor((b.byteOffset + b.length - 1 - base) / this.slotBytes))];
  }

  post(worker: number, msg: HashMessage): void {
    this.throwIfFailed();
    for (const id of msg.release) this.refs[id]!++;
    let bytes = 0;
    for (let i = 0; i < msg.ops.length; i += 3) if (msg.ops[i] !== OP_REPEAT) bytes += msg.ops[i + 2]!;
    for (const l of msg.literals) bytes += l.length;
    this.backlog[worker]!.push(bytes);
    this.backlogBytes[worker]! += bytes;
    this.hasher(worker).postMessage(msg);
  }

  expect(job: number): Promise<HashReply> {
    return new Promise((resolve, reject) => this.jobs.set(job, { resolve, reject }));
  }

  closeSink(s: RecordingSink): void {
    this.open.delete(s);
  }

  private reply(worker: number, m: HashReply): void {
    this.backlogBytes[worker]! -= this.backlog[worker]!.shift() ?? 0;
    if (m.digest !== null) {
      this.load[worker]!--;
      const p = this.jobs.get(m.job);
      this.jobs.delete(m.job);
      p?.resolve(m);
    }
    this.unref(m.release);
  }

  private unref(ids: number[]): void {
    let freed = false;
    for (const id of ids) {
      if (--this.refs[id]! > 0) continue;
      this.isFree[id] = true;
      this.freeCount++;
      freed = true;
    }
    // Waiting requests in order, while the first one fits.
    while (freed && this.waiting.length > 0) {
      const at = this.place(this.waiting[0]!.counts);
      if (!at) break;
      this.waiting.shift()!.grant(at);
    }
  }

  /** Take adjacent free slots for every count (first fit, in order), or nothing when one does not fit. */
  private place(counts: number[]): number[] | null {
    const firsts: number[] = [];
    for (const n of counts) {
      let at = -1;
      for (let i = 0, run = 0; i < this.isFree.length; i++) {
        run = this.isFree[i] ? run + 1 : 0;
        if (run === n) {
          at = i - n + 1;
          break;
        }
      }
      if (at < 0) {
        for (const [k, f] of firsts.entries()) this.take(f, counts[k]!, true);
        return null;
      }
      this.take(at, n, false);
      firsts.push(at);
    }
    return firsts;
  }

  private take(first: number, n: number, giveBack: boolean): void {
    for (let id = first; id < first + n; id++) {
      this.isFree[id] = giveBack;
      this.refs[id] = giveBack ? 0 : 1;
    }
    this.freeCount += giveBack ? n : -n;
  }

  private runs(firsts: number[], counts: number[]): Buffer[] {
    return firsts.map((f, k) => {
      const at = this.xmem.base + f * this.slotBytes;
      return this.mem.subarray(at, at + counts[k]! * this.slotBytes);
    });
  }

  private slot(id: number): Slot {
    return { id, buf: this.runs([id], [1])[0]! };
  }

  private fail(e: Error): void {
    this.failure ??= e;
    for (const p of this.jobs.values()) p.reject(this.failure);
    this.jobs.clear();
    for (const w of this.waiting.splice(0)) w.reject(this.failure);
  }

  private throwIfFailed(): void {
    if (this.failure) throw this.failure;
  }
}

/** Records one extent's stream as ops; flushed to its worker as the reads go by. */
class RecordingSink implements ExtentSink {
  private ops: number[] = [];
  private literals: Buffer[] = [];
  private slots = new Set<number>();
  private result: Promise<HashReply> | null = null;

  constructor(
    private readonly pool: HashPool,
    private readonly job: number,
    private readonly worker: number,
    private readonly alg: DigestAlgorithm,
  ) {}

  repeat(byte: number, n: number): void {
    const o = this.ops;
    const k = o.length;
    // Consecutive runs of one byte (status runs across several feeds) in one op.
    if (k >= 3 && o[k - 3] === OP_REPEAT && o[k - 2] === byte) o[k - 1]! += n;
    else o.push(OP_REPEAT, byte, n);
  }

  bytes(b: Buffer): void {
    if (b.length === 0) return;
    const slots = this.pool.slotsOf(b);
    if (slots !== null) {
      this.ops.push(OP_RANGE, b.byteOffset, b.length);
      for (let id = slots[0]; id <= slots[1]; id++) this.slots.add(id);
    } else if (b.length === 1) this.repeat(b[0]!, 1);
    else {
      // Not in the shared buffer (a decompressed cluster): copied, as the caller may reuse it.
      this.ops.push(OP_LITERAL, this.literals.length, 0);
      this.literals.push(Buffer.from(b));
    }
  }

  cut(): void {
    this.ops.push(OP_CUT, 0, 0);
  }

  flush(end: boolean): void {
    if (!end && this.ops.length === 0 && this.slots.size === 0) return;
    this.pool.post(this.worker, {
      job: this.job,
      alg: this.alg,
      ops: Float64Array.from(this.ops),
      literals: this.literals,
      end,
      release: [...this.slots],
    });
    this.ops = [];
    this.literals = [];
    this.slots = new Set();
  }

  end(): Promise<string> {
    return this.finish().then((r) => r.digest!);
  }

  endParts(): Promise<string[]> {
    return this.finish().then((r) => [...(r.parts ?? []), r.digest!]);
  }

  private finish(): Promise<HashReply> {
    if (this.result) return this.result;
    this.result = this.pool.expect(this.job);
    this.flush(true);
    this.pool.closeSink(this);
    return this.result;
  }
}
