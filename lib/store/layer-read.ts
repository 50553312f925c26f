// Re-read one layer at disk speed and digest it (chain verify): the same canonical stream as
// digestLayer() — it feeds the same LayerDigester — but with several large reads in flight
// across extent boundaries, so the disk never waits for the hash and the hash never waits for
// one read. Metadata (block status) is walked ahead of the reads; memory stays at
// `inFlight + 1` read buffers whatever the disk size.
import { pageAlignedBuffers, Qcow2Image, type BlockFile, type Extent } from '../qcow2/index.js';
import type { DigestAlgorithm } from './digest/index.js';
import type { HashPool, Slot } from './hash-pool.js';
import { LayerDigester, type LayerDigest } from './layer-digest.js';
import { DEFAULT_EXTENT_BYTES } from './manifest.js';

export interface ReadDigestOptions {
  extentBytes?: number;
  /** The manifest's part size (version 3). */
  partBytes?: number;
  /** The manifest's digest algorithm (default: the one new manifests use). */
  algorithm?: DigestAlgorithm;
  /** Reads in flight (default 4). */
  inFlight?: number;
  /** Bytes per read (default 8 MiB; rounded down to whole units). */
  chunkBytes?: number;
  /** A cancellation point, called between steps. */
  between?: () => void;
  /** Guest data bytes hashed so far, as they are (progress). */
  onData?: (bytes: number) => void;
  /** Hash on these worker threads (reads land in its shared slots); else on this thread. */
  pool?: HashPool;
  /** The layer, already open (readLayerDigest leaves it open). */
  file?: BlockFile;
  /**
   * Read buffers shared by the layers of one run (without a pool): taken from here, given back
   * at the end, so a chain of small layers allocates a few buffers, not a big one per layer.
   */
  spare?: Buffer[];
}

type Step =
  | { t: 'status'; pos: number; len: number; kind: 'zero' | 'unallocated' }
  | { t: 'compressed'; pos: number; cc: NonNullable<Extent['compressed']>; from: number; len: number }
  | { t: 'read'; pos: number; len: number; slot: Slot; done: Promise<void> };

const MAX_QUEUED = 4096;

export async function readLayerDigest(path: string, opts: ReadDigestOptions = {}): Promise<LayerDigest> {
  const img = await Qcow2Image.open(path, opts.file ? { file: opts.file } : {});
  try {
    return await readImageDigest(img, opts);
  } finally {
    if (!opts.file) await img.close();
  }
}

export async function readImageDigest(img: Qcow2Image, opts: ReadDigestOptions = {}): Promise<LayerDigest> {
  const extentBytes = opts.extentBytes ?? DEFAULT_EXTENT_BYTES;
  if (extentBytes % img.clusterSize !== 0)
    throw new RangeError(`extent size ${extentBytes} is not a multiple of the cluster size ${img.clusterSize}`);
  const unit = img.subclusterSize;
  const pool = opts.pool;
  const dg = new LayerDigester({
    virtualSize: img.virtualSize,
    unitBytes: unit,
    extentBytes,
    ...(opts.partBytes !== undefined ? { partBytes: opts.partBytes } : {}),
    ...(opts.algorithm ? { algorithm: opts.algorithm } : {}),
    ...(pool ? { sink: (a) => pool.sink(a) } : {}),
  });
  const want = pool ? pool.slotBytes : (opts.chunkBytes ?? 8 << 20);
  // A pool's slots may be smaller than a unit: the digester takes data in any pieces.
  const chunkBytes = pool ? pool.slotBytes : Math.max(unit, want - (want % unit));
  const inFlight = Math.max(1, opts.inFlight ?? 4);
  const own: Slot[] = [];
  let owned = 0;
  const release = (slot: Slot): void => (pool ? pool.done(slot) : void own.push(slot));
  const queue: Step[] = [];
  let reads = 0;
  let pos = 0; // guest offset the status walk has reached
  let pendingData: { host: number; pos: number; left: number } | null = null; // a data run still to split into reads
  const size = img.virtualSize;

  /** A read buffer: a pool slot (waiting only when no read of ours is ahead), or one of ours. */
  const slotFor = async (): Promise<Slot | null> => {
    if (pool) return reads === 0 ? pool.acquire() : pool.tryAcquire();
    const mine = own.pop();
    if (mine) return mine;
    const i = opts.spare?.findIndex((b) => b.length >= chunkBytes) ?? -1;
    // Page-aligned: the kernel copies into it faster (lib/qcow2/io.ts).
    return { id: owned++, buf: i >= 0 ? opts.spare!.splice(i, 1)[0]! : pageAlignedBuffers(1, chunkBytes)[0]! };
  };
  const startRead = (slot: Slot, host: number, at: number, len: number): void => {
    const done = img.readHost(slot.buf, 0, len, host);
    done.catch(() => {}); // awaited in order below; a failure ahead of that must not go unhandled
    queue.push({ t: 'read', pos: at, len, slot, done });
    reads++;
  };
  /** Walk ahead: queue steps until `inFlight` reads are running (or the disk is done). */
  const fill = async (): Promise<void> => {
    while (reads < inFlight && queue.length < MAX_QUEUED) {
      if (pendingData) {
        const slot = await slotFor();
        if (!slot) return; // every pool slot busy: hash what is queued first
        const len = Math.min(chunkBytes, pendingData.left);
        startRead(slot, pendingData.host, pendingData.pos, len);
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

  try {
    for (;;) {
      await fill();
      const st = queue.shift();
      if (!st) break;
      opts.between?.();
      if (st.t === 'status') dg.add(st.pos, st.len, st.kind);
      else if (st.t === 'compressed') {
        dg.add(st.pos, st.len, 'data', (await img.readCompressed(st.cc)).subarray(st.from, st.from + st.len));
        opts.onData?.(st.len);
      } else {
        try {
          await st.done;
          reads--;
          dg.add(st.pos, st.len, 'data', st.slot.buf.subarray(0, st.len));
        } finally {
          // Sent to the workers first: a message that carries the slot holds it until hashed.
          pool?.flush();
          release(st.slot);
        }
        opts.onData?.(st.len);
      }
      pool?.flush();
    }
  } finally {
    // On a failure, the reads still running finish before their buffers go back.
    for (const st of queue.splice(0))
      if (st.t === 'read') {
        await st.done.catch(() => {});
        release(st.slot);
      }
    if (opts.spare) for (const s of own) opts.spare.push(s.buf);
  }
  return pool ? dg.settle() : dg.finish();
}
