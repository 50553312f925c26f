// Content digests of ONE qcow2 layer (its own clusters, never its backing's), per fixed
// guest extent. The canonical stream of an extent, unit by unit (a unit is the layer's
// subcluster, i.e. its cluster without extended L2): one status byte (0 unallocated,
// 1 data, 2 zero) and, for a data unit, its guest bytes (decompressed when compressed;
// the last unit of a disk whose size is not a unit multiple is short). SHA-256 of that
// stream is the extent's digest; an extent wholly unallocated in the layer is not listed.
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

const READ_CHUNK = 8 << 20;

type Step =
  | { t: 'status'; byte: number; n: number }
  | { t: 'compressed'; cc: NonNullable<Extent['compressed']>; from: number; len: number }
  | { t: 'read'; host: number; len: number };
const DATA_MARK = Buffer.from([DATA]);

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
  const out: LayerDigest = { virtualSize: img.virtualSize, unitBytes: unit, dataBytes: 0, zeroBytes: 0, extents: [] };
  const chunk = Math.min(READ_CHUNK, Math.max(unit, extentBytes));
  const bufs = [Buffer.alloc(chunk), Buffer.alloc(chunk)];
  for (let index = 0; index * extentBytes < img.virtualSize; index++) {
    opts.between?.();
    const start = index * extentBytes;
    const end = Math.min(start + extentBytes, img.virtualSize);
    // First the extent's map (metadata only), then its stream, the next data read running
    // while the current one is hashed.
    const steps: Step[] = [];
    let held = false;
    for (let pos = start; pos < end;) {
      const e = await img.status(pos, end - pos);
      const len = Math.min(e.length, end - pos);
      if (e.kind === 'unallocated' || e.kind === 'zero') {
        if (e.kind === 'zero') {
          held = true;
          out.zeroBytes += len;
        }
        steps.push({ t: 'status', byte: e.kind === 'zero' ? ZERO : UNALLOCATED, n: units(pos, len, unit) });
      } else if (e.kind === 'compressed') {
        held = true;
        out.dataBytes += len;
        steps.push({ t: 'compressed', cc: e.compressed!, from: pos - e.compressed!.clusterStart, len });
      } else {
        held = true;
        out.dataBytes += len;
        // Whole units per read, so a unit never straddles two reads.
        const most = chunk - (chunk % unit);
        for (let done = 0; done < len; done += most) steps.push({ t: 'read', host: e.host! + done, len: Math.min(most, len - done) });
      }
      pos += len;
    }
    if (!held) continue;
    const hash = createHash('sha256');
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
      if (x.t === 'status') statusRun(hash, x.byte, x.n);
      else if (x.t === 'compressed') dataRun(hash, (await img.readCompressed(x.cc)).subarray(x.from, x.from + x.len), unit, DATA_MARK);
      else {
        const data: Buffer = await pending!;
        startRead();
        dataRun(hash, data, unit, DATA_MARK);
      }
    }
    out.extents.push({ index, digest: hash.digest('hex') });
  }
  return out;
}

/** Units covering [pos, pos + len) (pos is unit-aligned; the disk's last unit may be short). */
function units(pos: number, len: number, unit: number): number {
  return Math.ceil((pos + len) / unit) - Math.floor(pos / unit);
}

const runCache = new Map<number, Buffer>();
function statusRun(hash: Hash, byte: number, n: number): void {
  // Long runs (a 2 TiB unallocated disk) in bounded pieces.
  const piece = 1 << 16;
  let b = runCache.get(byte);
  if (!b) runCache.set(byte, (b = Buffer.alloc(piece, byte)));
  for (let left = n; left > 0; left -= piece) hash.update(left >= piece ? b : b.subarray(0, left));
}

function dataRun(hash: Hash, data: Buffer, unit: number, mark: Buffer): void {
  for (let o = 0; o < data.length; o += unit) {
    hash.update(mark);
    hash.update(data.subarray(o, Math.min(o + unit, data.length)));
  }
}
