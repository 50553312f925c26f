// Will the backup fit? An estimate of the bytes it writes, compared with the NAS's free
// space (statfs of the mount) plus a margin, before anything is written: a NAS that
// fills up mid-backup is what leaves VMs paused for hours (apache/cloudstack#12821).
// Estimates: a stopped disk's allocated data (qcow2 read natively, the whole chain
// qemu-img flattens; raw: the blocks the file holds), a running disk's allocation (the
// host bytes of its chain from QMP query-block), an incremental's dirty bytes (the parent
// bitmap's count).
import { stat, statfs } from 'node:fs/promises';
import { NasbackupError } from '../../errors.js';
import { ImageChain, Qcow2Error, readHeader } from '../../qcow2/index.js';
import type { QueryBlockEntry } from '../../clients/virsh.js';
import type { OpContext } from '../context.js';
import { fmtBytes } from './deadline.js';

/** qcow2 metadata, side files and the manifest on top of the data: a floor under the margin. */
const HEADROOM_BYTES = 16 * 1024 * 1024;

export interface DiskEstimate {
  disk: string;
  /** Bytes the backup writes for it, or null when it cannot be told (an RBD or block device source). */
  bytes: number | null;
  how: string;
}

/** Allocated data of a disk file, as a copy of it writes it (the flattened chain of a qcow2). */
export async function allocatedBytes(path: string): Promise<DiskEstimate> {
  if (path.startsWith('rbd:')) return { disk: path, bytes: null, how: 'RBD: size unknown' };
  const st = await stat(path).catch(() => null);
  if (!st?.isFile()) return { disk: path, bytes: null, how: 'not a regular file: size unknown' };
  const isQcow2 = await readHeader(path).then(
    () => true,
    (e: unknown) => !(e instanceof Qcow2Error && (e.code === 'QCOW2_BAD_MAGIC' || e.code === 'QCOW2_IO')),
  );
  if (!isQcow2) return { disk: path, bytes: st.blocks * 512, how: 'raw: allocated blocks' };
  try {
    const chain = await ImageChain.open(path);
    try {
      let data = 0;
      for await (const e of chain.mapEntries()) if (e.data) data += e.length;
      return { disk: path, bytes: data, how: `qcow2: data of a ${chain.images.length}-layer chain` };
    } finally {
      await chain.close();
    }
  } catch (e) {
    // A chain our reader does not take (a raw backing, a feature it refuses): the file's own blocks.
    return { disk: path, bytes: st.blocks * 512, how: `allocated blocks (${(e as Error).message})` };
  }
}

/**
 * A running disk: its parent bitmap's dirty bytes for an incremental (when the bitmap is on
 * the disk), else the host bytes of its chain (capped at the virtual size); from the
 * disk file itself when QEMU does not say.
 */
export async function runningEstimate(
  source: string,
  entry: QueryBlockEntry | undefined,
  parentBitmap: string | null,
): Promise<DiskEstimate> {
  const bm = parentBitmap ? entry?.bitmaps.find((b) => b.name === parentBitmap) : undefined;
  if (bm && typeof bm.count === 'number') return { disk: source, bytes: bm.count, how: `dirty bytes of bitmap ${parentBitmap}` };
  const img = entry?.image;
  if (img && img.actualSizes.length > 0) {
    const sum = img.actualSizes.reduce((a, b) => a + b, 0);
    return { disk: source, bytes: Math.min(sum, img.virtualSize), how: `allocation of a ${img.actualSizes.length}-image chain` };
  }
  return allocatedBytes(source);
}

/** The NAS's free space for us (unprivileged: f_bavail). */
export async function freeBytes(mountPoint: string): Promise<number> {
  const s = await statfs(mountPoint);
  return s.bavail * s.bsize;
}

/** Sum, or null when any disk is unknown. */
export function total(estimates: DiskEstimate[]): number | null {
  let sum = 0;
  for (const e of estimates) {
    if (e.bytes === null) return null;
    sum += e.bytes;
  }
  return sum;
}

/** Bytes needed for `estimate` with the margin. */
export function needed(estimate: number, marginPct: number): number {
  return Math.ceil((estimate * (100 + marginPct)) / 100) + HEADROOM_BYTES;
}

/**
 * Refuse (NAS_SPACE_SHORT, before anything is written) when the estimate with its margin
 * exceeds the free space. An unknown estimate is logged and let through.
 */
export async function checkSpace(ctx: OpContext, vm: string, mountPoint: string, estimates: DiskEstimate[]): Promise<void> {
  for (const e of estimates) ctx.logger.log(`Estimate for ${e.disk}: ${e.bytes === null ? 'unknown' : fmtBytes(e.bytes)} (${e.how})`);
  if (!ctx.config.spaceCheck) {
    ctx.logger.log('Free-space check skipped (NASBACKUP_SPACE_CHECK=off)');
    return;
  }
  const estimate = total(estimates);
  if (estimate === null) {
    ctx.logger.log(`Free-space check skipped: the size of a disk of ${vm} is unknown`);
    return;
  }
  const need = needed(estimate, ctx.config.spaceMarginPct);
  const free = await freeBytes(mountPoint).catch((e: Error) => {
    ctx.logger.log(`Free-space check skipped: statfs ${mountPoint} failed: ${e.message}`);
    return null;
  });
  if (free === null) return;
  ctx.logger.log(`Free space on the NAS: ${fmtBytes(free)}; the backup of ${vm} needs about ${fmtBytes(need)}`);
  if (free < need) {
    throw new NasbackupError(
      'NAS_SPACE_SHORT',
      `Not enough free space on the NAS for the backup of ${vm}: about ${fmtBytes(need)} needed ` +
        `(${fmtBytes(estimate)} estimated + ${ctx.config.spaceMarginPct}% margin), ${fmtBytes(free)} free; nothing was written`,
    );
  }
}
