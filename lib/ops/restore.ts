// Disaster recovery: one disk of one backup (any point of a chain) materialised outside the
// NAS, with nothing but the NAS reachable (no libvirt, no management server). The chain is
// flattened natively (flatten.ts): a raw target is a sparse file (only data is written), a
// qcow2 target a new image written by our writer (only clusters holding data), a block device
// is written whole. Each layer whose backup has a manifest is proven while it is read: a
// damaged backup fails the restore and leaves no target. A file target is written under a
// temporary name beside it and renamed into place once synced (unless --no-sync); a block device
// is written in place.
import { randomBytes } from 'node:crypto';
import { constants } from 'node:fs';
import { access, lstat, open, readdir, realpath, rename, stat, unlink, type FileHandle } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { NasbackupError, type Warning } from '../errors.js';
import { ensureWithin, exists, isWithin } from '../paths.js';
import { Ahead, ImageChain, NodeBlockFile, Qcow2Error, Qcow2Writer, type Qcow2Image } from '../qcow2/index.js';
import { assertChainSafe, refusalForQcow2 } from '../store/safety.js';
import { volumeIdOfBackupFile } from '../store/disks.js';
import type { NasTarget } from '../nas/session.js';
import { readManifestFile } from '../store/manifest-file.js';
import { layerPartBytes } from '../store/manifest.js';
import { flattenVerified, pieceBytesFor, type FlatExtent, type FlattenOptions, type LayerExpectation } from './flatten.js';
import type { OpContext } from './context.js';

export type RestoreFormat = 'raw' | 'qcow2';

/** Checked by lib/cli/validate.ts (validateRestoreArgs). */
export interface RestoreArgs {
  nas: NasTarget;
  /** The instance folder (one path component). */
  vm: string;
  /** The backup's folder (`<timestamp>`) below the instance. */
  backup: string;
  /** The volume id of the disk (as in `root.<vol>.qcow2` / `datadisk.<vol>.qcow2`). */
  disk: string;
  /** Absolute path of the target (a new file, or with force an existing file or a block device). */
  to: string;
  format: RestoreFormat;
  force: boolean;
  /**
   * Flush the target to the device before it is renamed into place (the default). Without
   * (`--no-sync`, qemu-img convert's own default) the restore ends once the page cache holds
   * it: faster where writes are slow, but a crash soon after may lose what the kernel had not
   * yet written.
   */
  sync?: boolean;
}

export type RestoreExtent = FlatExtent;

export interface RestoreOptions {
  /**
   * Called for every range of the disk in order of completion, before it is written; throwing
   * stops the restore (the target is then removed). For tests.
   */
  inspect?: (extent: RestoreExtent) => void | Promise<void>;
  /** Bytes of the virtual disk processed so far, and the total. */
  progress?: (done: number, total: number) => void;
}

export interface RestoreResult {
  vm: string;
  backup: string;
  disk: string;
  /** The disk's file (absolute; NAS-relative when rendered). */
  file: string;
  /** Layers of the chain read (1: a full backup). */
  layers: number;
  to: string;
  format: RestoreFormat;
  blockDevice: boolean;
  /** An existing target was replaced (--force). */
  replaced: boolean;
  /** Flushed to the device before it was renamed into place (false with --no-sync). */
  synced: boolean;
  virtualSize: number;
  /** Bytes written that hold data (zero and unallocated ranges are skipped on a file). */
  dataBytes: number;
  warnings: Warning[];
}

/** The target as it is before we write: where it goes, and what is there now. */
interface TargetPlan {
  path: string;
  blockDevice: boolean;
  existing: boolean;
}

async function checkTarget(a: RestoreArgs, mountPoint: string): Promise<TargetPlan> {
  const dir = dirname(a.to);
  const realDir = await realpath(dir).catch(() => null);
  if (realDir === null) throw new NasbackupError('RESTORE_TARGET_INVALID', `The folder of --to does not exist: ${dir}`);
  // The NAS is the source: a restore must never write into it — through our mount, through the
  // local folder a bind mount exports, or through another mount of the same share (same file system).
  const bind = a.nas.options.split(',').some((o) => o === 'bind' || o === 'rbind');
  const roots = [mountPoint, ...(bind ? [a.nas.address] : [])];
  for (const root of roots) {
    const realRoot = await realpath(root).catch(() => null);
    if (realRoot !== null && isWithin(realRoot, realDir, { strict: false }))
      throw new NasbackupError('RESTORE_TARGET_INVALID', `--to must be outside the NAS: ${a.to}`);
  }
  if (!bind && (await stat(realDir)).dev === (await stat(mountPoint)).dev)
    throw new NasbackupError('RESTORE_TARGET_INVALID', `--to must be outside the NAS (it is on the NAS's file system): ${a.to}`);
  const st = await stat(a.to).catch((e: NodeJS.ErrnoException) => {
    if (e.code === 'ENOENT') return null;
    throw e;
  });
  if (st === null) return { path: a.to, blockDevice: false, existing: false };
  if (!st.isFile() && !st.isBlockDevice())
    throw new NasbackupError('RESTORE_TARGET_INVALID', `--to must be a file or a block device: ${a.to}`);
  if (!a.force) {
    throw new NasbackupError(
      'RESTORE_TARGET_EXISTS',
      `${a.to} already exists, refusing to overwrite it (--force replaces it${st.isBlockDevice() ? ', writing the device in place' : ''})`,
    );
  }
  if (st.isBlockDevice() && a.format !== 'raw')
    throw new NasbackupError('RESTORE_TARGET_INVALID', `A block device is restored as raw only (--format raw): ${a.to}`);
  return { path: a.to, blockDevice: st.isBlockDevice(), existing: true };
}

/** The disk's file in the backup folder, by volume id. */
async function findDisk(backupDir: string, disk: string, what: string): Promise<string> {
  const names = (await readdir(backupDir)).filter((n) => volumeIdOfBackupFile(n) !== null).sort();
  const name = names.find((n) => volumeIdOfBackupFile(n) === disk);
  if (name === undefined) {
    const vols = names.map((n) => volumeIdOfBackupFile(n)).join(', ');
    throw new NasbackupError('DISK_NOT_FOUND', `${what} has no disk with volume ${disk} (disks: ${vols || 'none'})`);
  }
  return join(backupDir, name);
}

async function writeAll(fh: FileHandle, buf: Buffer, position: number): Promise<void> {
  let at = 0;
  while (at < buf.length) {
    const { bytesWritten } = await fh.write(buf, at, buf.length - at, position + at);
    at += bytesWritten;
  }
}

async function syncFolder(dir: string): Promise<void> {
  const fh = await open(dir, constants.O_RDONLY);
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/**
 * Writeback while the restore goes on: every FLUSH_EVERY bytes written, an fdatasync of the
 * target starts in the background (one at a time), so the final sync before the rename finds
 * little left to write instead of the whole disk — the disk writes while the chain is read.
 * Without a descriptor (--no-sync) it never flushes.
 */
const FLUSH_EVERY = 256 << 20;
class FlushBehind {
  private pending = 0;
  private running: Promise<void> | null = null;
  private failure: Error | null = null;
  constructor(
    private readonly fh: FileHandle | null,
    private readonly owned = false,
  ) {}
  /** Count written bytes; a failed flush is reported by settle() (the final sync would fail the same way). */
  wrote(n: number): void {
    this.pending += n;
    if (!this.fh || this.pending < FLUSH_EVERY || this.running || this.failure) return;
    this.pending = 0;
    this.running = this.fh.datasync().then(
      () => void (this.running = null),
      (e: unknown) => {
        this.failure = e instanceof Error ? e : new Error(String(e));
        this.running = null;
      },
    );
  }
  async settle(): Promise<void> {
    await this.running;
    if (this.failure) throw this.failure;
  }
  async close(): Promise<void> {
    await this.running?.catch(() => {});
    if (this.owned) await this.fh?.close();
  }
}

/** A failure of the target (full, I/O error), told apart from one of the chain being read. */
const writeFailed = (to: string, e: unknown): NasbackupError =>
  new NasbackupError('IO_ERROR', `Writing ${to} failed: ${e instanceof Error ? e.message : String(e)}`);

const tempName = (target: string, tag: string): string =>
  join(dirname(target), `.${basename(target)}.restore-${randomBytes(4).toString('hex')}.${tag}`);

export async function restore(ctx: OpContext, a: RestoreArgs, opts: RestoreOptions = {}): Promise<RestoreResult> {
  const nas = await ctx.openNas(a.nas);
  const where = `${a.vm}/${a.backup}`;
  const instanceDir = await ensureWithin(nas.mountPoint, a.vm, { what: '--backup' });
  const backupDir = await ensureWithin(nas.mountPoint, where, { what: '--backup', minDepth: 2 });
  const target = await checkTarget(a, nas.mountPoint);
  if (!(await exists(instanceDir))) throw new NasbackupError('BACKUP_NOT_FOUND', `No backups of ${a.vm} on this NAS`);
  // No delete or rebase may change the chain while it is read.
  const unlocked = await lockUnlessReadOnly(ctx, nas.mountPoint, a.vm, instanceDir);
  const st = await lstat(backupDir).catch(() => null);
  if (!st?.isDirectory()) throw new NasbackupError('BACKUP_NOT_FOUND', `No backup ${where} on this NAS`);
  const file = await findDisk(backupDir, a.disk, `Backup ${where}`);
  const warnings = [...unlocked, ...(await assertChainSafe(file, instanceDir, `The chain of ${basename(file)} in ${where}`, a.vm))];

  let chain: ImageChain;
  try {
    // Read front to back: a table or two per layer suffice (two is the least a cache holds), and
    // a small L2 cache keeps memory flat with depth and size (512 KiB each measured 1.5 MiB more
    // peak RSS on a 5-layer 100 GiB chain, 2 MiB each 9 MiB more).
    // Data past the page cache where the NAS is a local disk (lib/qcow2/io.ts): the chain is read
    // once, and the host's page cache (its VMs' memory) is not flooded with it.
    chain = await ImageChain.open(file, { l2CacheBytes: 128 << 10, directReads: true });
  } catch (e) {
    if (e instanceof Qcow2Error) throw refusalForQcow2(e, `The chain of ${basename(file)} in ${where}`, a.vm) ?? e;
    throw e;
  }
  // What each layer must hold, from its backup's manifest: proven while it is read.
  let expect: Array<LayerExpectation | null>;
  try {
    const e = await expectations(chain.images, a.vm);
    expect = e.expect;
    warnings.push(...e.warnings);
  } catch (e) {
    await chain.close();
    throw e;
  }
  const flatten = (target: FlattenOptions['target'], write: (buf: Buffer, at: number) => Promise<void>) =>
    flattenVerified(chain, {
      expect,
      target,
      write,
      checkpoint: () => ctx.checkpoint(),
      // NASBACKUP_HASH_WORKERS: unset or 0 hashes on this thread (memory), n on n workers (speed on many cores).
      hashWorkers: ctx.config.hashWorkers ?? 0,
      ...(opts.inspect ? { inspect: opts.inspect } : {}),
      ...(opts.progress ? { progress: opts.progress } : {}),
    });
  const sync = a.sync !== false;
  const result: RestoreResult = {
    vm: a.vm,
    backup: a.backup,
    disk: a.disk,
    file,
    layers: chain.images.length,
    to: a.to,
    format: a.format,
    blockDevice: target.blockDevice,
    replaced: target.existing,
    synced: sync,
    virtualSize: chain.virtualSize,
    dataBytes: 0,
    warnings,
  };
  const temps: string[] = [];
  try {
    if (target.blockDevice) {
      // O_EXCL on a block device: refused while it is in use (mounted, or held by a VM or device mapper).
      const fh = await open(target.path, constants.O_WRONLY | constants.O_EXCL).catch((e: NodeJS.ErrnoException) => {
        if (e.code === 'EBUSY') throw new NasbackupError('RESTORE_TARGET_INVALID', `${a.to} is in use (mounted?), refusing to write it`);
        throw e;
      });
      try {
        const devSize = (await fh.stat()).size || Number(await blockDeviceSize(fh));
        if (devSize < chain.virtualSize)
          throw new NasbackupError(
            'RESTORE_TARGET_INVALID',
            `${a.to} holds ${devSize} bytes, the disk needs ${chain.virtualSize}: refusing to write a truncated disk`,
          );
        result.dataBytes = (await flatten({ kind: 'device' }, (buf, at) => writeAll(fh, buf, at))).dataBytes;
        if (sync) await fh.sync();
        ctx.committed(); // the device holds the disk: a signal from here on no longer fails the run
      } finally {
        await fh.close();
      }
    } else {
      const final = tempName(target.path, 'tmp');
      temps.push(final);
      if (a.format === 'raw') {
        const fh = await open(final, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL, 0o600);
        // Without sync nothing is flushed before the end either.
        const behind = new FlushBehind(sync ? fh : null);
        try {
          await fh.truncate(chain.virtualSize);
          const write = (buf: Buffer, at: number): Promise<void> =>
            writeAll(fh, buf, at).then(
              () => behind.wrote(buf.length),
              (e: unknown) => Promise.reject(writeFailed(a.to, e)),
            );
          result.dataBytes = (await flatten({ kind: 'sparse' }, write)).dataBytes;
          await behind.settle().catch((e: unknown) => Promise.reject(writeFailed(a.to, e)));
          if (sync) await fh.sync().catch((e: unknown) => Promise.reject(writeFailed(a.to, e)));
        } finally {
          await behind.settle().catch(() => {});
          await fh.close();
        }
      } else {
        // A new image written front to back by our writer: only clusters holding data, synced by finish().
        const clusterBits = Math.min(16, Math.log2(pieceBytesFor(chain.images, expect)));
        const w = await Qcow2Writer.create(final, { virtualSize: chain.virtualSize, clusterBits, mode: 0o600 }).catch((e: unknown) => {
          throw writeFailed(a.to, e);
        });
        // The writer's data reaches the disk while the chain is still read (any descriptor of the file flushes it).
        const behind = new FlushBehind(sync ? await open(final, constants.O_RDONLY) : null, true);
        try {
          const writeData = (buf: Buffer, at: number): Promise<void> =>
            w.writeData(at, buf).then(
              () => behind.wrote(buf.length),
              (e: unknown) => Promise.reject(writeFailed(a.to, e)),
            );
          result.dataBytes = (await flatten({ kind: 'units', unit: w.unit }, writeData)).dataBytes;
          await behind.settle().catch((e: unknown) => Promise.reject(writeFailed(a.to, e)));
          await w.finish({ sync }).catch((e: unknown) => Promise.reject(writeFailed(a.to, e)));
        } catch (e) {
          await behind.settle().catch(() => {});
          await w.abort().catch(() => {});
          throw e;
        } finally {
          await behind.close();
        }
      }
      // The commit point: once renamed, the restore stands whatever signal comes.
      await ctx.commit(() => rename(final, target.path));
      temps.splice(temps.indexOf(final), 1);
      if (sync) await syncFolder(dirname(target.path));
    }
  } catch (e) {
    for (const t of temps)
      await unlink(t).catch((err: NodeJS.ErrnoException) => {
        if (err.code !== 'ENOENT') ctx.leftover(`Could not remove ${t}`); // ENOENT: never made, or removed by the writer's abort
      });
    // A layer that turns out damaged while read is refused like the pre-flight would; a failed read is an I/O error.
    if (e instanceof Qcow2Error)
      throw (
        refusalForQcow2(e, `The chain of ${basename(file)} in ${where}`, a.vm) ??
        new NasbackupError('IO_ERROR', `Reading the chain of ${basename(file)} in ${where} failed: ${e.message}`)
      );
    throw e;
  } finally {
    await chain.close();
  }
  const direct = chain.images.reduce((n, img) => n + (img.file instanceof NodeBlockFile ? img.file.bytesRead.direct : 0), 0);
  ctx.logger.log(
    `Restored ${where}/${basename(file)} (${result.layers} layer(s), ${result.virtualSize} bytes, ${result.dataBytes} of data; ` +
      `${direct} bytes of the chain read past the page cache) to ${a.to} as ${a.format}`,
  );
  return result;
}

/** Manifests read at once by expectations(). */
const MANIFESTS_AHEAD = 8;

/**
 * Per layer (0 = top), what its backup's manifest says it holds; null for a backup without a
 * manifest (older than manifests: structural checks only, with a NO_MANIFEST warning). A
 * manifest that is unusable, of another backup, or that does not describe the layer as it is
 * (not listed, another size, backing or cluster layout) fails the restore before anything is written.
 */
async function expectations(images: Qcow2Image[], vm: string): Promise<{ expect: Array<LayerExpectation | null>; warnings: Warning[] }> {
  const warnings: Warning[] = [];
  const expect: Array<LayerExpectation | null> = [];
  const unproven: string[] = [];
  // The next few folders' manifests are read while this one is judged; judged in chain order
  // all the same, so the first problem is the one reported.
  const dirs = [...new Set(images.map((img) => dirname(img.path)))];
  const reading = new Ahead(dirs.length, MANIFESTS_AHEAD, (i) => readManifestFile(dirs[i]!));
  try {
    for (const img of images) {
      const dir = dirname(img.path);
      const backup = `${vm}/${basename(dir)}`;
      const file = basename(img.path);
      const damaged = (why: string): NasbackupError =>
        new NasbackupError('BACKUP_DAMAGED', `Backup ${backup} is damaged: disk ${file}: ${why}`);
      const m = await reading.take(dirs.indexOf(dir));
      if (m === null) {
        if (!unproven.includes(backup)) unproven.push(backup);
        expect.push(null);
        continue;
      }
      if ('error' in m) throw new NasbackupError('BACKUP_DAMAGED', `Backup ${backup} is damaged: ${m.error}`);
      if (m.path !== backup)
        throw new NasbackupError('BACKUP_DAMAGED', `Backup ${backup} is damaged: its manifest is of another backup (${m.path})`);
      const d = m.disks.find((x) => x.file === file);
      if (!d) throw damaged('not listed in the manifest');
      if (d.virtualSize !== img.virtualSize) throw damaged(`virtual size ${img.virtualSize}, the manifest says ${d.virtualSize}`);
      if (d.backing !== img.header.backingFile)
        throw damaged(`backing ${img.header.backingFile ?? 'none'}, the manifest says ${d.backing ?? 'none'}`);
      if (d.unitBytes !== img.subclusterSize || m.digest.extentBytes % img.clusterSize !== 0)
        throw damaged(
          `cluster layout (${img.subclusterSize}-byte units) does not match the manifest's (${d.unitBytes}, extents of ${m.digest.extentBytes})`,
        );
      const { extentBytes, algorithm, partBytes } = m.digest;
      expect.push({
        backup,
        file,
        extentBytes,
        algorithm,
        digests: new Map(d.extents.map((x) => [x.index, x])),
        // Version 3: proven part by part (the manifest's reader checked every extent's parts).
        ...(partBytes !== undefined ? { partBytes: layerPartBytes(partBytes, d.unitBytes) } : {}),
      });
    }
  } finally {
    // Nothing of ours is left reading the NAS when this returns (a refusal unmounts it next).
    await reading.settle();
  }
  // One line for the chain (a chain of old backups has no manifest anywhere).
  if (unproven.length > 0)
    warnings.push({
      code: 'NO_MANIFEST',
      message: `No manifest in ${unproven.join(', ')}: ${unproven.length === 1 ? 'its' : 'their'} content was not verified (structural checks only)`,
    });
  return { expect, warnings };
}

/**
 * The VM lock; on a read-only NAS (it cannot hold a lock, and nothing can change the chain
 * through this mount) the restore goes on without it, with a warning.
 */
async function lockUnlessReadOnly(ctx: OpContext, mountPoint: string, vm: string, instanceDir: string): Promise<Warning[]> {
  try {
    await ctx.lockVm(mountPoint, vm, 'restore');
    return [];
  } catch (e) {
    if (!(e instanceof NasbackupError && e.code === 'LOCK_FAILED')) throw e;
    const readOnly = await access(instanceDir, constants.W_OK).then(
      () => false,
      (err: NodeJS.ErrnoException) => err.code === 'EROFS',
    );
    if (!readOnly) throw e;
    ctx.logger.log(`The NAS is read-only: restoring ${vm} without the VM lock`);
    return [{ code: 'NOT_LOCKED', message: `The NAS is read-only: ${vm}'s backups were read without the VM lock` }];
  }
}

/** A block device's size: fstat says 0, its end does not (seek is not exposed; read the sysfs size). */
async function blockDeviceSize(fh: FileHandle): Promise<bigint> {
  const st = await fh.stat({ bigint: true });
  // glibc's dev_t layout (gnu_dev_major / gnu_dev_minor).
  const major = ((st.rdev >> 8n) & 0xfffn) | ((st.rdev >> 32n) & ~0xfffn);
  const minor = (st.rdev & 0xffn) | ((st.rdev >> 12n) & ~0xffn);
  const fd = await open(`/sys/dev/block/${major}:${minor}/size`, constants.O_RDONLY).catch(() => null);
  if (fd === null) return 0n;
  try {
    return BigInt((await fd.readFile('utf8')).trim()) * 512n;
  } finally {
    await fd.close();
  }
}
