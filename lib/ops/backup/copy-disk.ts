// One disk of a stopped VM copied natively: its qcow2 chain read through the copy engine into
// a new qcow2 (what `qemu-img convert -O qcow2` makes: flattened, 64 KiB clusters, no
// backing), with the manifest's digests computed from the same bytes as they are written, so
// the file is never read back for them.
import { copyImage, Qcow2Writer, type CopyOptions, type CopySource, type CopyStats } from '../../qcow2/index.js';
import { LayerDigester, type LayerDigest } from '../../store/layer-digest.js';
import { DEFAULT_EXTENT_BYTES } from '../../store/manifest.js';

/** qemu-img convert's default cluster size for a new qcow2. */
export const BACKUP_CLUSTER_BITS = 16;
/**
 * 2 MiB requests, 4 in flight (what qemu-img convert moves per request): 8 MiB of buffers, so
 * the whole run stays within 32 MiB of the program's idle RSS (issue 18) at near the same speed
 * as larger requests on a local disk or an NFS mount (1 MiB wsize).
 */
export const BACKUP_REQUEST_BYTES = 2 << 20;
export const BACKUP_BUFFERS = 4;

export interface DiskCopyOptions extends Pick<CopyOptions, 'onProgress' | 'checkpoint' | 'rateBytesPerSec' | 'requestBytes' | 'buffers'> {
  extentBytes?: number;
  compress?: boolean;
  /** Digest while copying (default); false only for measurements without the manifest (bench-manifest). */
  digest?: boolean;
}

export interface DiskCopyResult {
  digest: LayerDigest | undefined;
  stats: CopyStats;
  /** The new file's size and the guest bytes stored in it. */
  fileBytes: number;
  dataBytes: number;
}

/** Copy `src` (every byte the guest sees) into a new qcow2 at `dst`; on failure `dst` is removed. */
export async function copyDiskToQcow2(src: CopySource, dst: string, opts: DiskCopyOptions = {}): Promise<DiskCopyResult> {
  const w = await Qcow2Writer.create(dst, {
    virtualSize: src.virtualSize,
    clusterBits: BACKUP_CLUSTER_BITS,
    compress: opts.compress ?? false,
  });
  // The new layer has no backing: a zero run is left unallocated in it, and so digested.
  const { digest = true, ...copyOpts } = opts;
  const dg = new LayerDigester({
    virtualSize: src.virtualSize,
    unitBytes: w.clusterSize,
    extentBytes: opts.extentBytes ?? DEFAULT_EXTENT_BYTES,
  });
  try {
    const stats = await copyImage(src, w, {
      requestBytes: BACKUP_REQUEST_BYTES,
      buffers: BACKUP_BUFFERS,
      ...copyOpts,
      onRun: (run) => {
        if (digest && run.kind === 'data') dg.add(run.offset, run.length, 'data', run.data);
      },
    });
    const r = await w.finish();
    return { digest: digest ? dg.finish() : undefined, stats, fileBytes: r.fileBytes, dataBytes: r.dataBytes };
  } catch (e) {
    await w.abort();
    throw e;
  }
}
