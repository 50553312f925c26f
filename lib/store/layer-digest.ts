// Content digests of ONE qcow2 layer (its own clusters, never its backing's), per fixed
// guest extent. The canonical stream of an extent, unit by unit (a unit is the layer's
// subcluster, i.e. its cluster without extended L2): one status byte (0 unallocated,
// 1 data, 2 zero) and, for a data unit, its guest bytes (decompressed when compressed;
// the last unit of a disk whose size is not a unit multiple is short). The manifest's
// digest algorithm (digest/index.ts) over that stream is the extent's digest; an extent
// wholly unallocated in the layer is not listed. With parts (manifest version 3), the
// extent's stream is cut into parts of whole units (layerPartBytes), each part's stream is
// hashed, and the extent's digest is made over the parts' digests (combineParts): a part
// wholly unallocated is hashed like any other (its status bytes), so every listed extent
// records all its parts.
//
// One definition: LayerDigester builds that stream from what a writer says it wrote,
// range by range in guest order (a copy engine feeds it while it writes); digestImage()
// re-reads a written file and feeds the same digester, so both give the same digests.
import { Qcow2Image, type Extent } from '../qcow2/index.js';
import { combineParts, createDigest, DEFAULT_DIGEST_ALGORITHM, type DigestAlgorithm, type StreamDigest } from './digest/index.js';
import { HashPool, type ExtentSink, type Slot } from './hash-pool.js';
import { DEFAULT_EXTENT_BYTES, layerPartBytes, type ExtentDigest } from './manifest.js';

export const UNALLOCATED = 0;
export const DATA = 1;
export const ZERO = 2;

export interface LayerDigest {
  virtualSize: number;
  unitBytes: number;
  dataBytes: number;
  zeroBytes: number;
  extents: ExtentDigest[];
}

export interface DigestOptions {
  extentBytes?: number;
  /** The manifest's part size (version 3): each extent's digest is made over its parts'. */
  partBytes?: number;
  /** The manifest's digest algorithm (default: the one new manifests use). */
  algorithm?: DigestAlgorithm;
  /** Called between extents (a cancellation point). */
  between?: () => void;
  /** Read into this pool's slots and hash there (on its workers, or on this thread); else on a pool of our own, on this thread. */
  pool?: HashPool;
  /** digestLayer: read the data past the page cache where the file system suits it (what the device holds, not what is cached). */
  directReads?: boolean;
}

export type UnitKind = 'data' | 'zero' | 'unallocated';

export interface LayerDigesterOptions {
  virtualSize: number;
  /** The written layer's subcluster size (its cluster size without extended L2). */
  unitBytes: number;
  /** A multiple of unitBytes; the manifest's extent size by default. */
  extentBytes?: number;
  /** The manifest's part size (version 3; the layer's part is layerPartBytes of it); none by default. */
  partBytes?: number;
  /** The manifest's digest algorithm (default: the one new manifests use). */
  algorithm?: DigestAlgorithm;
  /** Called with each listed extent as soon as the stream passes its end (a reader can compare early). */
  onExtent?: (e: ExtentDigest) => void;
  /** Where each extent's stream is hashed (a HashPool), with this digester's algorithm; here, synchronously, by default. */
  sink?: (algorithm: DigestAlgorithm) => ExtentSink;
}

const STATUS: Record<Exclude<UnitKind, 'data'>, number> = { zero: ZERO, unallocated: UNALLOCATED };

/**
 * The canonical stream of one layer, built from what was written to it: `add()` each
 * range in guest order with what the layer holds there (data with its guest bytes, a
 * zero cluster, or nothing); a gap between two ranges, and whatever follows the last one
 * at `finish()`, is unallocated. The kind may change only at a unit boundary (a unit is
 * all data, all zero or all unallocated in a qcow2 layer); data may come in any pieces.
 * Hashing is synchronous in `add()`, so the caller may reuse its buffer afterwards.
 */
export class LayerDigester {
  readonly virtualSize: number;
  readonly unitBytes: number;
  readonly extentBytes: number;
  private pos = 0;
  /** The current extent's hash, created at its first unit that holds something. */
  private hash: ExtentSink | null = null;
  private readonly newSink: () => ExtentSink;
  /** Digests still being computed on worker threads, in extent order. */
  private readonly pending: Array<Promise<ExtentDigest>> = [];
  /** Unallocated units that opened the current extent, hashed only if it holds something. */
  private lazyUnallocated = 0;
  /** Kind of the unit `pos` is inside of (meaningful when pos is not on a unit boundary). */
  private unitKind: UnitKind = 'unallocated';
  private done = false;
  private readonly out: LayerDigest;
  private readonly onExtent: ((e: ExtentDigest) => void) | undefined;

  constructor(opts: LayerDigesterOptions) {
    const { virtualSize, unitBytes } = opts;
    const extentBytes = opts.extentBytes ?? DEFAULT_EXTENT_BYTES;
    if (!Number.isSafeInteger(virtualSize) || virtualSize < 0) throw new RangeError(`virtual size ${virtualSize} is not a size`);
    if (!Number.isSafeInteger(unitBytes) || unitBytes < 512) throw new RangeError(`unit ${unitBytes} is not a (sub)cluster size`);
    if (!Number.isSafeInteger(extentBytes) || extentBytes <= 0 || extentBytes % unitBytes !== 0)
      throw new RangeError(`extent size ${extentBytes} is not a multiple of the unit ${unitBytes}`);
    this.virtualSize = virtualSize;
    this.unitBytes = unitBytes;
    this.extentBytes = extentBytes;
    this.out = { virtualSize, unitBytes, dataBytes: 0, zeroBytes: 0, extents: [] };
    this.onExtent = opts.onExtent;
    const { sink } = opts;
    const algorithm = opts.algorithm ?? DEFAULT_DIGEST_ALGORITHM;
    const newSink = sink ? () => sink(algorithm) : () => new HashSink(algorithm);
    if (opts.partBytes === undefined) this.newSink = newSink;
    else {
      const part = layerPartBytes(opts.partBytes, unitBytes);
      if (extentBytes % part !== 0) throw new RangeError(`part size ${part} does not divide the extent size ${extentBytes}`);
      this.newSink = () => {
        const s = newSink();
        if (!cuts(s)) throw new Error('internal: a parted digest needs a sink that cuts parts');
        return new PartedSink(s, part / unitBytes, algorithm);
      };
    }
  }

  /** Guest offset up to which the stream is built. */
  get position(): number {
    return this.pos;
  }

  /** What the layer holds in [offset, offset + length); `data` (exactly `length` bytes) for data. */
  add(offset: number, length: number, kind: UnitKind, data?: Buffer): void {
    if (this.done) throw new Error('the digester is finished');
    if (kind === 'data' ? data?.length !== length : data !== undefined)
      throw new RangeError(
        kind === 'data' ? `data range of ${length} bytes given ${data?.length ?? 'no'} bytes` : `a ${kind} range carries no bytes`,
      );
    if (!(Number.isSafeInteger(offset) && Number.isSafeInteger(length) && length >= 0))
      throw new RangeError(`range ${offset}+${length} is not a guest range`);
    if (offset < this.pos) throw new RangeError(`range at ${offset} is not in guest order (the stream is at ${this.pos})`);
    if (offset + length > this.virtualSize) throw new RangeError(`range ${offset}+${length} ends past the disk (${this.virtualSize})`);
    if (offset > this.pos) this.feedUnits(offset - this.pos, 'unallocated');
    if (length > 0) this.feedUnits(length, kind, data);
  }

  /** The digests; the rest of the disk after the last range is unallocated. */
  finish(): LayerDigest {
    this.close();
    if (this.pending.length > 0) throw new Error('digests are still being computed on worker threads: use settle()');
    return this.out;
  }

  /** finish(), once the worker threads have hashed every extent (with a `sink` option). */
  async settle(): Promise<LayerDigest> {
    this.close();
    for (const p of this.pending.splice(0)) {
      const e = await p;
      this.out.extents.push(e);
      this.onExtent?.(e);
    }
    return this.out;
  }

  private close(): void {
    if (this.done) return;
    if (this.pos < this.virtualSize) this.feedUnits(this.virtualSize - this.pos, 'unallocated');
    this.done = true;
  }

  private feedUnits(length: number, kind: UnitKind, data?: Buffer): void {
    const unit = this.unitBytes;
    if (this.pos % unit !== 0 && kind !== this.unitKind)
      throw new RangeError(`${kind} at ${this.pos} inside a ${this.unitKind} unit of ${unit} bytes`);
    if (kind === 'data') this.out.dataBytes += length;
    else if (kind === 'zero') this.out.zeroBytes += length;
    let from = 0;
    while (from < length) {
      const extentEnd = Math.min((Math.floor(this.pos / this.extentBytes) + 1) * this.extentBytes, this.virtualSize);
      const take = Math.min(length - from, extentEnd - this.pos);
      if (kind === 'data') this.data(data!.subarray(from, from + take));
      else {
        // Units that start in [pos, pos + take): the first may have started in an earlier call.
        const n = Math.ceil((this.pos + take) / unit) - Math.ceil(this.pos / unit);
        if (kind === 'unallocated' && this.hash === null) this.lazyUnallocated += n;
        else statusRun(this.held(), STATUS[kind], n);
      }
      this.pos += take;
      from += take;
      if (this.pos === extentEnd) this.closeExtent();
    }
    this.unitKind = kind;
  }

  private held(): ExtentSink {
    if (this.hash === null) {
      this.hash = this.newSink();
      statusRun(this.hash, UNALLOCATED, this.lazyUnallocated);
    }
    return this.hash;
  }

  private data(bytes: Buffer): void {
    const hash = this.held();
    const unit = this.unitBytes;
    for (let o = 0; o < bytes.length;) {
      const p = this.pos + o;
      const within = p % unit;
      if (within === 0) hash.repeat(DATA, 1);
      const n = Math.min(bytes.length - o, unit - within);
      hash.bytes(bytes.subarray(o, o + n));
      o += n;
    }
  }

  private closeExtent(): void {
    if (this.hash !== null) {
      const index = Math.ceil(this.pos / this.extentBytes) - 1;
      const h = this.hash;
      const digest = h instanceof PartedSink ? h.endExtent() : h.end();
      const entry = (d: string | Parted): ExtentDigest => (typeof d === 'string' ? { index, digest: d } : { index, ...d });
      if (!(digest instanceof Promise) && this.pending.length === 0) {
        const e = entry(digest);
        this.out.extents.push(e);
        this.onExtent?.(e);
      } else {
        const p = Promise.resolve(digest).then(entry);
        p.catch(() => {}); // awaited by settle(); a digest abandoned on failure must not go unhandled
        this.pending.push(p);
      }
    }
    this.hash = null;
    this.lazyUnallocated = 0;
  }
}

const unallocatedDigests = new Map<string, string>();
/** The digest of `units` units the layer leaves unallocated (a part that holds nothing): their status bytes alone. */
export function unallocatedDigest(algorithm: DigestAlgorithm, units: number): string {
  const key = `${algorithm}:${units}`;
  let d = unallocatedDigests.get(key);
  if (d === undefined) {
    const h = createDigest(algorithm);
    h.repeat(UNALLOCATED, units);
    unallocatedDigests.set(key, (d = h.digest()));
  }
  return d;
}

type CuttingSink = ExtentSink & Required<Pick<ExtentSink, 'cut' | 'endParts'>>;
const cuts = (s: ExtentSink): s is CuttingSink => s.cut !== undefined && s.endParts !== undefined;

interface Parted {
  digest: string;
  parts: string;
}

/**
 * One extent's stream cut into parts of `unitsPerPart` units, on one sink that cuts at each
 * part's end (a HashPool's, or HashSink here). A unit starts at each `repeat` (a run of
 * status bytes, or a data unit's status byte); a data unit's bytes follow its status byte, so
 * a part boundary only ever falls at a `repeat`.
 */
class PartedSink implements ExtentSink {
  private units = 0;

  constructor(
    private readonly sink: CuttingSink,
    private readonly unitsPerPart: number,
    private readonly algorithm: DigestAlgorithm,
  ) {}

  repeat(byte: number, n: number): void {
    while (n > 0) {
      if (this.units === this.unitsPerPart) {
        this.sink.cut();
        this.units = 0;
      }
      const take = Math.min(n, this.unitsPerPart - this.units);
      this.sink.repeat(byte, take);
      this.units += take;
      n -= take;
    }
  }

  bytes(b: Buffer): void {
    this.sink.bytes(b);
  }

  end(): string | Promise<string> {
    const p = this.endExtent();
    return p instanceof Promise ? p.then((x) => x.digest) : p.digest;
  }

  /** The extent's digest over its parts' digests, and those (base64). */
  endExtent(): Parted | Promise<Parted> {
    const combine = (hex: string[]): Parted => {
      const bin = Buffer.from(hex.join(''), 'hex');
      return { digest: combineParts(this.algorithm, bin), parts: bin.toString('base64') };
    };
    const all = this.sink.endParts();
    return all instanceof Promise ? all.then(combine) : combine(all);
  }
}

/** The digest on this thread. */
class HashSink implements ExtentSink {
  private h: StreamDigest;
  private readonly parts: string[] = [];
  constructor(private readonly algorithm: DigestAlgorithm) {
    this.h = createDigest(algorithm);
  }
  repeat(byte: number, n: number): void {
    this.h.repeat(byte, n);
  }
  bytes(b: Buffer): void {
    this.h.update(b);
  }
  end(): string {
    return this.h.digest();
  }
  cut(): void {
    this.parts.push(this.h.digest());
    this.h = createDigest(this.algorithm);
  }
  endParts(): string[] {
    return [...this.parts, this.h.digest()];
  }
}

const READ_CHUNK = 8 << 20;
/** Steps mapped ahead of the one being hashed (reads among them run meanwhile). */
const MAX_AHEAD = 64;

type Step =
  | { t: 'status'; pos: number; len: number; kind: 'zero' | 'unallocated' }
  | { t: 'compressed'; pos: number; cc: NonNullable<Extent['compressed']>; from: number; len: number }
  | { t: 'read'; pos: number; host: number; len: number };

/** The digests of the layer in file `path`, re-read. */
export async function digestLayer(path: string, opts: DigestOptions = {}): Promise<LayerDigest> {
  const img = await Qcow2Image.open(path, { directReads: opts.directReads ?? false });
  try {
    return await digestImage(img, opts);
  } finally {
    await img.close();
  }
}

export async function digestImage(img: Qcow2Image, opts: DigestOptions = {}): Promise<LayerDigest> {
  const extentBytes = opts.extentBytes ?? DEFAULT_EXTENT_BYTES;
  if (extentBytes % img.clusterSize !== 0)
    throw new RangeError(`extent size ${extentBytes} is not a multiple of the cluster size ${img.clusterSize}`);
  if (opts.pool) return digestOn(img, extentBytes, opts, opts.pool);
  // Without one, a pool of two read buffers hashed on this thread: XXH64 then reads them
  // where they lie (the pool's memory is its module's), never copying them to hash.
  const slotBytes = Math.min(READ_CHUNK, Math.max(img.subclusterSize, extentBytes));
  const pool = new HashPool({ workers: 0, slotBytes, slots: 2 });
  try {
    return await digestOn(img, extentBytes, opts, pool);
  } finally {
    await pool.close();
  }
}

async function digestOn(img: Qcow2Image, extentBytes: number, opts: DigestOptions, pool: HashPool): Promise<LayerDigest> {
  const dg = new LayerDigester({
    virtualSize: img.virtualSize,
    unitBytes: img.subclusterSize,
    extentBytes,
    ...(opts.partBytes !== undefined ? { partBytes: opts.partBytes } : {}),
    ...(opts.algorithm ? { algorithm: opts.algorithm } : {}),
    sink: (a) => pool.sink(a),
  });
  const chunk = pool.slotBytes;
  const steps = mapSteps(img, extentBytes, chunk, opts.between);
  // Steps in guest order; the reads among the next ones run while the current is hashed.
  const ahead: Array<{ step: Step; slot?: Slot; read?: Promise<void> }> = [];
  let next: Step | null = null;
  let more = true;
  const fill = async (): Promise<void> => {
    while (ahead.length < MAX_AHEAD) {
      if (next === null) {
        const r = more ? await steps.next() : null;
        if (!r || r.done) {
          more = false;
          return;
        }
        next = r.value;
      }
      if (next.t === 'read') {
        const slot = ahead.length === 0 ? await pool.acquire() : pool.tryAcquire();
        if (!slot) return;
        const read = img.readHost(slot.buf, 0, next.len, next.host);
        read.catch(() => {}); // awaited in turn below
        ahead.push({ step: next, slot, read });
      } else ahead.push({ step: next });
      next = null;
    }
  };
  try {
    for (;;) {
      await fill();
      const a = ahead.shift();
      if (!a) break;
      const x = a.step;
      try {
        if (x.t === 'status') dg.add(x.pos, x.len, x.kind);
        else if (x.t === 'compressed') dg.add(x.pos, x.len, 'data', (await img.readCompressed(x.cc)).subarray(x.from, x.from + x.len));
        else {
          await a.read;
          dg.add(x.pos, x.len, 'data', a.slot!.buf.subarray(0, x.len));
        }
      } finally {
        // Sent to the hasher first: a message that carries the slot holds it until hashed.
        pool.flush();
        if (a.slot) pool.done(a.slot);
      }
    }
  } catch (e) {
    pool.abandon();
    throw e;
  } finally {
    // On a failure, the reads still running finish before their buffers go back.
    for (const a of ahead.splice(0)) {
      await a.read?.catch(() => {});
      if (a.slot) pool.done(a.slot);
    }
  }
  return dg.settle();
}

/** The layer's steps in guest order, mapped extent by extent; a wholly unallocated extent gives none. */
async function* mapSteps(img: Qcow2Image, extentBytes: number, chunk: number, between?: () => void): AsyncGenerator<Step> {
  for (let index = 0; index * extentBytes < img.virtualSize; index++) {
    between?.();
    const start = index * extentBytes;
    const end = Math.min(start + extentBytes, img.virtualSize);
    const steps: Step[] = [];
    let held = false;
    for (let pos = start; pos < end;) {
      const e = await img.status(pos, end - pos);
      const len = Math.min(e.length, end - pos);
      if (e.kind === 'unallocated' || e.kind === 'zero') steps.push({ t: 'status', pos, len, kind: e.kind });
      else if (e.kind === 'compressed')
        steps.push({ t: 'compressed', pos, cc: e.compressed!, from: pos - e.compressed!.clusterStart, len });
      else
        for (let done = 0; done < len; done += chunk)
          steps.push({ t: 'read', pos: pos + done, host: e.host! + done, len: Math.min(chunk, len - done) });
      if (e.kind !== 'unallocated') held = true;
      pos += len;
    }
    // Nothing held: the digester skips an unallocated extent without a step.
    if (held) yield* steps;
  }
}

function statusRun(sink: ExtentSink, byte: number, n: number): void {
  if (n > 0) sink.repeat(byte, n);
}
