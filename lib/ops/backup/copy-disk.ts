// One disk of a stopped VM copied natively: its qcow2 chain read through the copy engine into
// a new qcow2 (what `qemu-img convert -O qcow2` makes: flattened, 64 KiB clusters, no
// backing), with the manifest's digests computed from the same bytes as they are written, so
// the file is never read back for them. With a HashPool, the engine reads into the pool's
// shared slots and the pool hashes them (on this thread after the write started, or on
// workers) while the reads and writes go on (a slot is read into again once both its write
// and its hash are done).
import { copyImage, Qcow2Writer, type CopyBufferPool, type CopyOptions, type CopySource, type CopyStats } from '../../qcow2/index.js';
import { DEFAULT_DIGEST_ALGORITHM, type DigestAlgorithm } from '../../store/digest/index.js';
import { HashPool } from '../../store/hash-pool.js';
import { LayerDigester, type LayerDigest } from '../../store/layer-digest.js';
import { newDigestSpec } from '../../store/manifest.js';

/** qemu-img convert's default cluster size for a new qcow2. */
export const BACKUP_CLUSTER_BITS = 16;
/**
 * 2 MiB requests, 4 in flight (what qemu-img convert moves per request): 8 MiB of buffers, so
 * the whole run stays within 32 MiB of the program's idle RSS (issue 18) at near the same speed
 * as larger requests on a local disk or an NFS mount (1 MiB wsize).
 */
export const BACKUP_REQUEST_BYTES = 2 << 20;
export const BACKUP_BUFFERS = 4;
/** A background fdatasync of the new file every this many bytes: writeback overlaps the reads. */
export const BACKUP_FLUSH_BYTES = 64 << 20;
/**
 * Slots beyond the engine's reads and writes in flight, for a worker still hashing a written
 * one. The inline hasher needs none: it hashes a slot on the next turn after its write
 * started, mostly before that write ends (each slot is 2 MiB of RSS; the sparse 100 GiB
 * shape peaked at idle + 29 MiB with 4 slots, + 33 with 6).
 */
const HASH_SLACK = 2;

/**
 * The pool the copies of one backup hash on (its slots are the engine's read buffers). By
 * default no worker thread: the hashing runs on this thread after each slot's write was
 * started, so it overlaps that write and the next reads (done by the libuv threads). XXH64
 * (~6 GB/s a core) and even SHA-256 with SHA-NI (1.4-1.8 GB/s) keep up with the copy, and a
 * worker's isolate would cost ~12 MiB (over the +32 MiB of issue 18) for no measured gain on
 * 2 cores. For SHA-256, NASBACKUP_HASH_WORKERS=n asks for n workers (a NAS that outruns one core).
 */
export function copyHashPool(workers = 0): HashPool {
  return new HashPool({ workers, slotBytes: BACKUP_REQUEST_BYTES, slots: BACKUP_BUFFERS + (workers > 0 ? HASH_SLACK : 0) });
}

export interface DiskCopyOptions extends Pick<CopyOptions, 'onProgress' | 'checkpoint' | 'rateBytesPerSec' | 'requestBytes' | 'buffers'> {
  /** Digests per extent of this size, with parts of `partBytes` if given (default: what new manifests record). */
  extentBytes?: number;
  partBytes?: number;
  /** The manifest's digest algorithm (default: the one new manifests use). */
  algorithm?: DigestAlgorithm;
  compress?: boolean;
  /** Digest while copying (default); false only for measurements without the manifest (bench-manifest). */
  digest?: boolean;
  /** Hash on these workers, reading into their slots (else on this thread). */
  pool?: HashPool;
}

export interface DiskCopyResult {
  digest: LayerDigest | undefined;
  stats: CopyStats;
  /** The new file's size and the guest bytes stored in it. */
  fileBytes: number;
  dataBytes: number;
}

/** The pool's slots as the engine's buffers. */
export function slotBuffers(pool: HashPool): CopyBufferPool {
  return {
    size: pool.slotBytes,
    get available() {
      return pool.available;
    },
    take: async () => (await pool.acquire()).buf,
    give: (b) => {
      const id = pool.slotOf(b);
      if (id === null) throw new Error('a buffer given back is not a slot of the hash pool');
      pool.done({ id, buf: b });
    },
  };
}

/** Copy `src` (every byte the guest sees) into a new qcow2 at `dst`; on failure `dst` is removed. */
export async function copyDiskToQcow2(src: CopySource, dst: string, opts: DiskCopyOptions = {}): Promise<DiskCopyResult> {
  const w = await Qcow2Writer.create(dst, {
    virtualSize: src.virtualSize,
    clusterBits: BACKUP_CLUSTER_BITS,
    compress: opts.compress ?? false,
    flushEveryBytes: BACKUP_FLUSH_BYTES,
  });
  // The new layer has no backing: a zero run is left unallocated in it, and so digested.
  const { digest = true, pool: given, algorithm, ...copyOpts } = opts;
  const pool = digest ? given : undefined;
  const dg = new LayerDigester({
    virtualSize: src.virtualSize,
    unitBytes: w.clusterSize,
    ...(opts.extentBytes
      ? { algorithm: algorithm ?? DEFAULT_DIGEST_ALGORITHM, extentBytes: opts.extentBytes, partBytes: opts.partBytes }
      : newDigestSpec(algorithm ?? DEFAULT_DIGEST_ALGORITHM)),
    ...(pool ? { sink: (a) => pool.sink(a) } : {}),
  });
  try {
    const stats = await copyImage(src, w, {
      requestBytes: BACKUP_REQUEST_BYTES,
      buffers: BACKUP_BUFFERS,
      ...copyOpts,
      ...(pool ? { bufferPool: slotBuffers(pool) } : {}),
      onRun: (run) => {
        if (!digest || run.kind !== 'data') return;
        dg.add(run.offset, run.length, 'data', run.data);
        // Sent now: the slot is held by the message until a worker hashed it.
        pool?.flush();
      },
    });
    // The workers finish hashing while the writer flushes.
    const [r, d] = await Promise.allSettled([w.finish(), digest ? dg.settle() : undefined]);
    if (r.status === 'rejected') throw r.reason;
    if (d.status === 'rejected') throw d.reason;
    return { digest: d.value, stats, fileBytes: r.value.fileBytes, dataBytes: r.value.dataBytes };
  } catch (e) {
    pool?.abandon();
    await w.abort();
    throw e;
  }
}
