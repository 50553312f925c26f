// Content digests of ONE qcow2 layer (its own clusters, never its backing's), per fixed
// guest extent. The canonical stream of an extent, unit by unit (a unit is the layer's
// subcluster, i.e. its cluster without extended L2): one status byte (0 unallocated,
// 1 data, 2 zero) and, for a data unit, its guest bytes (decompressed when compressed;
// the last unit of a disk whose size is not a unit multiple is short). SHA-256 of that
// stream is the extent's digest; an extent wholly unallocated in the layer is not listed.
//
// One definition: LayerDigester builds that stream from what a writer says it wrote,
// range by range in guest order (a copy engine feeds it while it writes); digestImage()
// re-reads a written file and feeds the same digester, so both give the same digests.
import { createHash, type Hash } from 'node:crypto';
import { Qcow2Image, type Extent } from '../qcow2/index.js';
import { DEFAULT_EXTENT_BYTES, type ExtentDigest } from './manifest.js';

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
  /** Called between extents (a cancellation point). */
  between?: () => void;
}

export type UnitKind = 'data' | 'zero' | 'unallocated';

export interface LayerDigesterOptions {
  virtualSize: number;
  /** The written layer's subcluster size (its cluster size without extended L2). */
  unitBytes: number;
  /** A multiple of unitBytes; the manifest's extent size by default. */
  extentBytes?: number;
  /** Called with each listed extent as soon as the stream passes its end (a reader can compare early). */
  onExtent?: (e: ExtentDigest) => void;
}

const DATA_MARK = Buffer.from([DATA]);
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
  private hash: Hash | null = null;
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
    if (offset > this.pos) this.run(offset - this.pos, 'unallocated');
    if (length > 0) this.run(length, kind, data);
  }

  /** The digests; the rest of the disk after the last range is unallocated. */
  finish(): LayerDigest {
    if (!this.done) {
      if (this.pos < this.virtualSize) this.run(this.virtualSize - this.pos, 'unallocated');
      this.done = true;
    }
    return this.out;
  }

  private run(length: number, kind: UnitKind, data?: Buffer): void {
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

  private held(): Hash {
    if (this.hash === null) {
      this.hash = createHash('sha256');
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
      if (within === 0) hash.update(DATA_MARK);
      const n = Math.min(bytes.length - o, unit - within);
      hash.update(bytes.subarray(o, o + n));
      o += n;
    }
  }

  private closeExtent(): void {
    if (this.hash !== null) {
      const e = { index: Math.ceil(this.pos / this.extentBytes) - 1, digest: this.hash.digest('hex') };
      this.out.extents.push(e);
      this.onExtent?.(e);
    }
    this.hash = null;
    this.lazyUnallocated = 0;
  }
}

const READ_CHUNK = 8 << 20;

type Step =
  | { t: 'status'; pos: number; len: number; kind: 'zero' | 'unallocated' }
  | { t: 'compressed'; pos: number; cc: NonNullable<Extent['compressed']>; from: number; len: number }
  | { t: 'read'; pos: number; host: number; len: number };

/** The digests of the layer in file `path`, re-read. */
export async function digestLayer(path: string, opts: DigestOptions = {}): Promise<LayerDigest> {
  const img = await Qcow2Image.open(path);
  try {
    return await digestImage(img, opts);
  } finally {
    await img.close();
  }
}

export async function digestImage(img: Qcow2Image, opts: DigestOptions = {}): Promise<LayerDigest> {
  const extentBytes = opts.extentBytes ?? DEFAULT_EXTENT_BYTES;
  const unit = img.subclusterSize;
  if (extentBytes % img.clusterSize !== 0)
    throw new RangeError(`extent size ${extentBytes} is not a multiple of the cluster size ${img.clusterSize}`);
  const dg = new LayerDigester({ virtualSize: img.virtualSize, unitBytes: unit, extentBytes });
  const chunk = Math.min(READ_CHUNK, Math.max(unit, extentBytes));
  const bufs = [Buffer.alloc(chunk), Buffer.alloc(chunk)];
  for (let index = 0; index * extentBytes < img.virtualSize; index++) {
    opts.between?.();
    const start = index * extentBytes;
    const end = Math.min(start + extentBytes, img.virtualSize);
    // First the extent's map (metadata only), then its stream, the next data read running
    // while the current one is hashed.
    const steps: Step[] = [];
    for (let pos = start; pos < end;) {
      const e = await img.status(pos, end - pos);
      const len = Math.min(e.length, end - pos);
      if (e.kind === 'unallocated' || e.kind === 'zero') steps.push({ t: 'status', pos, len, kind: e.kind });
      else if (e.kind === 'compressed')
        steps.push({ t: 'compressed', pos, cc: e.compressed!, from: pos - e.compressed!.clusterStart, len });
      else {
        // Whole units per read, so the buffers stay unit-aligned.
        const most = chunk - (chunk % unit);
        for (let done = 0; done < len; done += most)
          steps.push({ t: 'read', pos: pos + done, host: e.host! + done, len: Math.min(most, len - done) });
      }
      pos += len;
    }
    // Nothing held: the digester skips an unallocated extent without a read.
    if (steps.every((x) => x.t === 'status' && x.kind === 'unallocated')) continue;
    const reads = steps.filter((x): x is Extract<Step, { t: 'read' }> => x.t === 'read');
    let next = 0;
    let pending: Promise<Buffer> | null = null;
    const startRead = (): void => {
      const r = reads[next];
      if (!r) return;
      const b = bufs[next++ % 2]!;
      pending = img.readHost(b, 0, r.len, r.host).then(() => b.subarray(0, r.len));
    };
    startRead();
    for (const x of steps) {
      if (x.t === 'status') dg.add(x.pos, x.len, x.kind);
      else if (x.t === 'compressed') dg.add(x.pos, x.len, 'data', (await img.readCompressed(x.cc)).subarray(x.from, x.from + x.len));
      else {
        const data: Buffer = await pending!;
        startRead();
        dg.add(x.pos, x.len, 'data', data);
      }
    }
  }
  return dg.finish();
}

const runCache = new Map<number, Buffer>();
function statusRun(hash: Hash, byte: number, n: number): void {
  // Long runs (a 2 TiB unallocated disk) in bounded pieces.
  const piece = 1 << 16;
  let b = runCache.get(byte);
  if (!b) runCache.set(byte, (b = Buffer.alloc(piece, byte)));
  for (let left = n; left > 0; left -= piece) hash.update(left >= piece ? b : b.subarray(0, left));
}
