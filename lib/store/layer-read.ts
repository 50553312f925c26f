// Re-read one layer at disk speed and digest it (chain verify): the same canonical stream as
// digestLayer() — it feeds the same LayerDigester — but with several large reads in flight
// across extent boundaries, so the disk never waits for the hash and the hash never waits for
// one read. Metadata (block status) is walked ahead of the reads; memory stays at
// `inFlight + 1` read buffers whatever the disk size.
import { Qcow2Image, type Extent } from '../qcow2/index.js';
import { LayerDigester, type LayerDigest } from './layer-digest.js';
import { DEFAULT_EXTENT_BYTES } from './manifest.js';

export interface ReadDigestOptions {
  extentBytes?: number;
  /** Reads in flight (default 4). */
  inFlight?: number;
  /** Bytes per read (default 8 MiB; rounded down to whole units). */
  chunkBytes?: number;
  /** A cancellation point, called between steps. */
  between?: () => void;
  /** Guest data bytes hashed so far, as they are (progress). */
  onData?: (bytes: number) => void;
}

type Step =
  | { t: 'status'; pos: number; len: number; kind: 'zero' | 'unallocated' }
  | { t: 'compressed'; pos: number; cc: NonNullable<Extent['compressed']>; from: number; len: number }
  | { t: 'read'; pos: number; len: number; buf: Buffer; done: Promise<void> };

const MAX_QUEUED = 4096;

export async function readLayerDigest(path: string, opts: ReadDigestOptions = {}): Promise<LayerDigest> {
  const img = await Qcow2Image.open(path);
  try {
    return await readImageDigest(img, opts);
  } finally {
    await img.close();
  }
}

export async function readImageDigest(img: Qcow2Image, opts: ReadDigestOptions = {}): Promise<LayerDigest> {
  const extentBytes = opts.extentBytes ?? DEFAULT_EXTENT_BYTES;
  if (extentBytes % img.clusterSize !== 0)
    throw new RangeError(`extent size ${extentBytes} is not a multiple of the cluster size ${img.clusterSize}`);
  const unit = img.subclusterSize;
  const dg = new LayerDigester({ virtualSize: img.virtualSize, unitBytes: unit, extentBytes });
  const chunkBytes = Math.max(unit, (opts.chunkBytes ?? 8 << 20) - ((opts.chunkBytes ?? 8 << 20) % unit));
  const inFlight = Math.max(1, opts.inFlight ?? 4);
  const free: Buffer[] = [];
  const queue: Step[] = [];
  let reads = 0;
  let pos = 0; // guest offset the status walk has reached
  let pendingData: { host: number; pos: number; left: number } | null = null; // a data run still to split into reads
  const size = img.virtualSize;

  const startRead = (host: number, at: number, len: number): void => {
    const buf = free.pop() ?? Buffer.allocUnsafe(chunkBytes);
    const done = img.readHost(buf, 0, len, host);
    done.catch(() => {}); // awaited in order below; a failure ahead of that must not go unhandled
    queue.push({ t: 'read', pos: at, len, buf, done });
    reads++;
  };
  /** Walk ahead: queue steps until `inFlight` reads are running (or the disk is done). */
  const fill = async (): Promise<void> => {
    while (reads < inFlight && queue.length < MAX_QUEUED) {
      if (pendingData) {
        const len = Math.min(chunkBytes, pendingData.left);
        startRead(pendingData.host, pendingData.pos, len);
        pendingData.host += len;
        pendingData.pos += len;
        pendingData.left -= len;
        if (pendingData.left === 0) pendingData = null;
        continue;
      }
      if (pos >= size) return;
      // Never across an extent end with one status: the layer's runs, as digestImage walks them.
      const e = await img.status(pos, size - pos);
      const len = Math.min(e.length, size - pos);
      if (e.kind === 'unallocated' || e.kind === 'zero') queue.push({ t: 'status', pos, len, kind: e.kind });
      else if (e.kind === 'compressed')
        queue.push({ t: 'compressed', pos, cc: e.compressed!, from: pos - e.compressed!.clusterStart, len });
      else pendingData = { host: e.host!, pos, left: len };
      pos += len;
    }
  };

  for (;;) {
    await fill();
    const s = queue.shift();
    if (!s) break;
    opts.between?.();
    if (s.t === 'status') dg.add(s.pos, s.len, s.kind);
    else if (s.t === 'compressed') {
      dg.add(s.pos, s.len, 'data', (await img.readCompressed(s.cc)).subarray(s.from, s.from + s.len));
      opts.onData?.(s.len);
    } else {
      await s.done;
      reads--;
      // Start the next read before hashing this one, so the disk keeps busy.
      await fill();
      dg.add(s.pos, s.len, 'data', s.buf.subarray(0, s.len));
      free.push(s.buf);
      opts.onData?.(s.len);
    }
  }
  return dg.finish();
}
