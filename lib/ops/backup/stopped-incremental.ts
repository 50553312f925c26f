// Offline incremental of a stopped VM: its qcow2 disks hold the persistent dirty bitmap of
// the last backup (QEMU writes it out when the VM stops; the stopped path seeds it), so only
// the clusters that bitmap marks dirty are copied, into a new qcow2 backed by the parent
// backup file. Taken only when every disk's bitmap can be trusted and every parent is the
// backup that bitmap belongs to; anything else is today's full copy, reported as a fallback,
// with the reason in the log.
import { rm, stat } from 'node:fs/promises';
import { basename, join, posix, relative } from 'node:path';
import { NasbackupError } from '../../errors.js';
import { ensureWithin, exists, parseRelativePath } from '../../paths.js';
import {
  copyImage,
  dirtyRanges,
  ImageChain,
  Qcow2Image,
  Qcow2Writer,
  readBitmapDirectory,
  readChain,
  readHeader,
  type CopyRange,
  type CopyStats,
  type DirtyBitmap,
} from '../../qcow2/index.js';
import { LayerDigester, type LayerDigest } from '../../store/layer-digest.js';
import type { HashPool } from '../../store/hash-pool.js';
import { DEFAULT_DIGEST_ALGORITHM, type DigestAlgorithm } from '../../store/digest/index.js';
import { slotBuffers } from './copy-disk.js';
import { softly } from '../../clients/failure.js';
import type { QemuImgClient } from '../../clients/qemu-img.js';
import { readManifestFile } from '../../store/manifest-file.js';
import { newDigestSpec } from '../../store/manifest.js';
import { inspectChain } from '../../store/safety.js';
import { matchParents } from '../../store/disks.js';
import type { BackupArgs } from './args.js';
import type { OpContext } from '../context.js';

export interface StoppedDisk {
  src: string;
  volId: string;
  /** Backup file name (`root.<vol>.qcow2`, …). */
  file: string;
}

export interface OfflineDisk extends StoppedDisk {
  /** Mount-relative and absolute path of the parent backup file. */
  parentRel: string;
  parentAbs: string;
  bitmap: DirtyBitmap;
  virtualSize: number;
  parentSize: number;
}

export type OfflinePlan =
  | { kind: 'incremental'; disks: OfflineDisk[]; parentDir: string }
  /** `seen`: sources that hold the parent bitmap (retired after the full, no later backup may start from it). */
  | { kind: 'full'; reason: string; seen: string[] };

/**
 * Decide: incremental when, on every disk, the parent bitmap is there and trustworthy (read
 * natively AND as qemu-img reports it) and the parent file is the backup it belongs to.
 * Never throws for what it finds: every doubt is a full copy with its reason.
 */
export async function planOffline(
  ctx: OpContext,
  a: BackupArgs,
  disks: StoppedDisk[],
  formats: Array<'qcow2' | 'raw'>,
  mountPoint: string,
): Promise<OfflinePlan> {
  const seen: string[] = [];
  const full = (reason: string): OfflinePlan => ({ kind: 'full', reason, seen });
  const parentBitmap = a.bitmapParent;
  if (!parentBitmap || !a.bitmapNew || a.parentPaths.length === 0)
    return full('an offline incremental needs --bitmap-parent, --bitmap-new and --parent-paths');
  if (parentBitmap === a.bitmapNew) return full('--bitmap-new and --bitmap-parent are the same bitmap');

  // 1. The bitmap on every disk: present, recording, saved cleanly.
  const bitmaps: DirtyBitmap[] = [];
  const sizes: number[] = [];
  for (const [i, d] of disks.entries()) {
    if (formats[i] !== 'qcow2')
      return full(`disk ${d.src} is raw (${d.src.startsWith('rbd:') ? 'rbd' : 'not qcow2'}): it carries no bitmap`);
    let img: Qcow2Image;
    try {
      img = await Qcow2Image.open(d.src);
    } catch (e) {
      return full(`cannot open disk ${d.src}: ${(e as Error).message}`);
    }
    try {
      const dir = await readBitmapDirectory(img);
      if (dir.state === 'stale') return full(`the bitmaps of disk ${d.src} are stale (a program without bitmap support wrote to it)`);
      const bm = dir.bitmaps.find((b) => b.name === parentBitmap);
      if (!bm) return full(`parent bitmap ${parentBitmap} missing on disk ${d.src}`);
      seen.push(d.src);
      if (bm.inUse) return full(`parent bitmap ${parentBitmap} on disk ${d.src} is in-use (not saved cleanly)`);
      if (!bm.auto) return full(`parent bitmap ${parentBitmap} on disk ${d.src} is disabled`);
      bitmaps.push(bm);
      sizes.push(img.virtualSize);
    } catch (e) {
      return full(`cannot read the bitmaps of disk ${d.src}: ${(e as Error).message}`);
    } finally {
      await img.close();
    }
    // The same answer from QEMU itself: a second reader, so a misread never goes unnoticed.
    const q = await ctx.clients.qemuImg.bitmaps(d.src).catch((e: unknown) => e as Error);
    if (q instanceof Error) return full(`qemu-img info cannot read the bitmaps of ${d.src}: ${q.message}`);
    const qb = q.find((b) => b.name === parentBitmap);
    const bm = bitmaps[i]!;
    const flags = [...(bm.inUse ? ['in-use'] : []), ...(bm.auto ? ['auto'] : [])];
    if (!qb || qb.granularity !== bm.granularity || [...qb.flags].sort().join(',') !== [...flags].sort().join(','))
      return full(
        `qemu-img info disagrees on bitmap ${parentBitmap} of ${d.src} (${qb ? `flags ${qb.flags.join(',') || 'none'}, granularity ${qb.granularity}` : 'missing'}; read natively: flags ${flags.join(',') || 'none'}, granularity ${bm.granularity})`,
      );
    // The chain the copy reads through must open natively.
    const chain = await ImageChain.open(d.src).catch((e: unknown) => e as Error);
    if (chain instanceof Error) return full(`cannot read the backing chain of ${d.src}: ${chain.message}`);
    await chain.close();
  }

  // 2. The parents: where the arguments say, in one backup folder, and that backup's manifest
  // names this bitmap as the checkpoint it was taken at.
  let parents: string[];
  try {
    parents = await matchParents(disks, a.parentPaths, async (rel) =>
      exists(await ensureWithin(mountPoint, rel, { what: '--parent-paths', minDepth: 3 }), { follow: true }),
    );
  } catch (e) {
    if (e instanceof NasbackupError) return full(`the parent paths do not fit the disks: ${e.message}`);
    throw e;
  }
  const dirs = new Set(parents.map((p) => posix.dirname(p)));
  if (dirs.size !== 1) return full(`the parent files are in ${dirs.size} backup folders, not one`);
  const parentDir = [...dirs][0]!;
  let folder: string;
  try {
    folder = await ensureWithin(mountPoint, parentDir, { what: '--parent-paths', minDepth: 2 });
  } catch (e) {
    if (e instanceof NasbackupError) return full(e.message);
    throw e;
  }
  const manifest = await readManifestFile(folder);
  if (manifest === null) return full(`parent backup ${parentDir} has no manifest: nothing proves it was taken at bitmap ${parentBitmap}`);
  if ('error' in manifest) return full(`parent backup ${parentDir}: ${manifest.error}`);
  if (manifest.checkpoint !== parentBitmap)
    return full(`parent backup ${parentDir} was taken at checkpoint ${manifest.checkpoint ?? '(none)'}, not at bitmap ${parentBitmap}`);
  if (manifest.vm !== a.vm || manifest.path !== parentDir)
    return full(`the manifest of parent backup ${parentDir} describes ${manifest.vm} ${manifest.path}`);
  const out: OfflineDisk[] = [];
  for (const [i, d] of disks.entries()) {
    const rel = parents[i]!;
    let abs: string;
    try {
      abs = await ensureWithin(mountPoint, rel, { what: '--parent-paths', minDepth: 3 });
    } catch (e) {
      if (e instanceof NasbackupError) return full(e.message);
      throw e;
    }
    const st = await stat(abs).catch(() => null);
    if (!st?.isFile()) return full(`parent backup file ${abs} does not exist`);
    const h = await readHeader(abs).catch((e: Error) => e);
    if (h instanceof Error) return full(`parent backup file ${abs} is not a usable qcow2 image: ${h.message}`);
    const vmDir = parseRelativePath(rel, { what: '--parent-paths' })[0]!;
    const safety = await inspectChain(abs, join(mountPoint, vmDir));
    if (safety.problem) return full(`the chain of parent backup file ${abs} is not sound: ${safety.problem.message}`);
    const ok = await readChain(abs).then(
      () => null,
      (e: Error) => e.message,
    );
    if (ok !== null) return full(`parent backup file ${abs} does not read as a complete chain: ${ok}`);
    const md = manifest.disks.find((m) => m.file === basename(rel));
    if (!md || md.volumeId !== d.volId)
      return full(`the manifest of parent backup ${parentDir} does not list ${basename(rel)} for volume ${d.volId}`);
    const parentSize = Number(h.size);
    if (md.virtualSize !== parentSize || md.fileBytes !== st.size)
      return full(`parent backup file ${abs} is not the file its manifest describes (size or virtual size changed)`);
    const virtualSize = sizes[i]!;
    // A disk that grew: the grown tail is copied too. One that shrank: a full copy.
    if (virtualSize < parentSize) return full(`disk ${d.src} shrank since the parent backup (${virtualSize} < ${parentSize} bytes)`);
    out.push({ ...d, parentRel: rel, parentAbs: abs, bitmap: bitmaps[i]!, virtualSize, parentSize });
  }
  return { kind: 'incremental', disks: out, parentDir };
}

/** The backing reference the new file stores: relative to its folder (the work folder is a sibling of the final one). */
export function backingReference(finalDir: string, parentAbs: string): string {
  return relative(finalDir, parentAbs);
}

/** Retire the bitmap an offline incremental consumed: no later backup may start from it. */
export async function retireBitmap(ctx: OpContext, qemuImg: QemuImgClient, src: string, name: string): Promise<void> {
  const refused = await softly(qemuImg.removeBitmap(src, name));
  if (refused === null) ctx.logger.log(`Removed bitmap ${name} from ${src}: the backup taken from it is done`);
  else ctx.logger.log(`Warning: could not remove bitmap ${name} from ${src}: ${refused}`);
}

/** Ranges handed to one copyImage call: bounds memory on a bitmap fragmented at fine granularity. */
const RANGES_PER_BATCH = 16384;

export interface DirtyCopy {
  /** Source disk (its whole backing chain is read). */
  src: string;
  bitmap: DirtyBitmap;
  virtualSize: number;
  /** Virtual size of the parent backup file: a grown tail beyond it is copied whole. */
  parentSize: number;
  dst: string;
  /** Backing reference stored in the new file (relative to its folder). */
  backing: string;
  checkpoint?: () => void;
  onProgress?: (done: number) => void;
  /** Hash on these workers, the engine reading into their slots (as the full copy does). */
  pool?: HashPool;
  /** The manifest's digest algorithm (default: the one new manifests use). */
  algorithm?: DigestAlgorithm;
}

export interface DirtyCopyResult {
  stats: CopyStats;
  /** Guest bytes the bitmap marks dirty (before widening to the new file's clusters). */
  dirtyBytes: number;
  digest: LayerDigest;
  fileBytes: number;
}

/** The bitmap's dirty ranges below the parent's size, then the grown tail, widened to `unit` and merged (guest order). */
async function* rangesToCopy(img: Qcow2Image, c: DirtyCopy, unit: number, counted: { dirty: number }): AsyncGenerator<CopyRange> {
  let cur: { start: number; end: number } | null = null;
  const widen = function* (offset: number, end: number): Generator<CopyRange> {
    const s = Math.floor(offset / unit) * unit;
    const e = Math.min(c.virtualSize, Math.ceil(end / unit) * unit);
    if (cur && s <= cur.end) cur.end = Math.max(cur.end, e);
    else {
      if (cur) yield { offset: cur.start, length: cur.end - cur.start };
      cur = { start: s, end: e };
    }
  };
  for await (const r of dirtyRanges(img, c.bitmap)) {
    counted.dirty += r.length;
    const end = Math.min(r.offset + r.length, c.parentSize);
    if (r.offset < end) yield* widen(r.offset, end);
  }
  if (c.virtualSize > c.parentSize) yield* widen(c.parentSize, c.virtualSize);
  const last = cur as { start: number; end: number } | null;
  if (last) yield { offset: last.start, length: last.end - last.start };
}

/**
 * Write a new qcow2 at `dst` backed by the parent backup, holding every cluster the bitmap
 * marks dirty as the source reads now (through its whole chain): data where it has data, a
 * zero cluster where it reads as zeros (the parent may hold data there). Digests are computed
 * as the clusters are written. On failure the new file is removed.
 */
export async function copyDirty(c: DirtyCopy): Promise<DirtyCopyResult> {
  const img = await Qcow2Image.open(c.src);
  let chain: ImageChain | null = null;
  let writer: Qcow2Writer | null = null;
  try {
    // Read front to back (dirty ranges in order): a small L2 cache keeps memory flat, as the full copy's does.
    chain = await ImageChain.open(c.src, { l2CacheBytes: 512 << 10 });
    writer = await Qcow2Writer.create(c.dst, { virtualSize: c.virtualSize, backing: { name: c.backing, format: 'qcow2' } });
    const w = writer;
    const pool = c.pool;
    const digester = new LayerDigester({
      virtualSize: c.virtualSize,
      unitBytes: w.unit,
      ...newDigestSpec(c.algorithm ?? DEFAULT_DIGEST_ALGORITHM),
      ...(pool ? { sink: (a) => pool.sink(a) } : {}),
    });
    const total: CopyStats = { totalBytes: 0, readBytes: 0, dataBytes: 0, zeroBytes: 0, elapsedMs: 0 };
    const counted = { dirty: 0 };
    let batch: CopyRange[] = [];
    const flush = async (): Promise<void> => {
      if (batch.length === 0) return;
      const done = total.totalBytes;
      const st = await copyImage(chain!, w, {
        ranges: batch,
        ...(pool ? { bufferPool: slotBuffers(pool) } : {}),
        onRun: (run) => {
          digester.add(run.offset, run.length, run.kind, run.data);
          // Sent now: the slot is held by the message until a worker hashed it.
          pool?.flush();
        },
        ...(c.checkpoint ? { checkpoint: c.checkpoint } : {}),
        ...(c.onProgress ? { onProgress: (d: number) => c.onProgress!(done + d) } : {}),
      });
      total.totalBytes += st.totalBytes;
      total.readBytes += st.readBytes;
      total.dataBytes += st.dataBytes;
      total.zeroBytes += st.zeroBytes;
      total.elapsedMs += st.elapsedMs;
      batch = [];
    };
    for await (const r of rangesToCopy(img, c, w.unit, counted)) {
      batch.push(r);
      if (batch.length >= RANGES_PER_BATCH) await flush();
    }
    await flush();
    // The workers finish hashing while the writer flushes.
    const [res, digest] = await Promise.allSettled([w.finish(), digester.settle()]);
    if (res.status === 'rejected') throw res.reason;
    writer = null;
    if (digest.status === 'rejected') {
      await rm(c.dst, { force: true }).catch(() => {});
      throw digest.reason;
    }
    return { stats: total, dirtyBytes: counted.dirty, digest: digest.value, fileBytes: res.value.fileBytes };
  } catch (e) {
    c.pool?.abandon();
    await writer?.abort().catch(() => {});
    throw e;
  } finally {
    await chain?.close();
    await img.close();
  }
}

/** The offline incremental of one disk; failures are worded as the full copy's are. */
export async function writeOfflineIncremental(
  ctx: OpContext,
  d: OfflineDisk,
  dst: string,
  backing: string,
  pool?: HashPool,
): Promise<LayerDigest> {
  const started = Date.now();
  let r: DirtyCopyResult;
  try {
    r = await copyDirty({
      src: d.src,
      bitmap: d.bitmap,
      virtualSize: d.virtualSize,
      parentSize: d.parentSize,
      dst,
      backing,
      checkpoint: () => ctx.checkpoint(),
      algorithm: ctx.config.digestAlgorithm,
      ...(pool ? { pool } : {}),
    });
    // A VM started meanwhile would have set in-use on the bitmap: the copy may be torn.
    const img = await Qcow2Image.open(d.src);
    try {
      const now = (await readBitmapDirectory(img)).bitmaps.find((b) => b.name === d.bitmap.name);
      if (!now || now.inUse || now.tableOffset !== d.bitmap.tableOffset)
        throw new Error(
          `disk ${d.src} changed during the backup (bitmap ${d.bitmap.name} ${now ? 'rewritten' : 'gone'}: was the VM started?)`,
        );
    } finally {
      await img.close();
    }
  } catch (e) {
    if (e instanceof NasbackupError) throw e;
    await rm(dst, { force: true }).catch(() => {});
    const msg = (e as Error).message;
    throw new NasbackupError(/ENOSPC/.test(msg) ? 'NAS_FULL' : 'CONVERT_FAILED', `Offline incremental copy failed for ${d.src} ${dst}`, {
      details: msg,
    });
  }
  const secs = Math.max(0.001, (Date.now() - started) / 1000);
  ctx.logger.log(
    `Offline incremental of ${d.src}: ${r.dirtyBytes} dirty bytes in bitmap ${d.bitmap.name} (granularity ${d.bitmap.granularity}), ` +
      `${r.stats.readBytes} bytes read, ${r.stats.dataBytes} written as data and ${r.stats.zeroBytes} as zero clusters, ` +
      `file ${r.fileBytes} bytes, ${secs.toFixed(2)} s (${(r.stats.readBytes / secs / 1048576).toFixed(1)} MiB/s)`,
  );
  return r.digest;
}
