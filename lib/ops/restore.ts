// Disaster recovery: one disk of one backup (any point of a chain) materialised outside the
// NAS, with nothing but the NAS reachable (no libvirt, no management server). The chain is
// flattened natively (lib/qcow2) into a sparse raw file: only extents holding data are written.
// A qcow2 target is that raw file converted by qemu-img. A file target is written under a
// temporary name beside it and renamed into place once synced; a block device is written in place.
import { randomBytes } from 'node:crypto';
import { constants } from 'node:fs';
import { access, chmod, lstat, open, readdir, realpath, rename, stat, unlink, type FileHandle } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { NasbackupError, type Warning } from '../errors.js';
import { ensureWithin, exists, isWithin } from '../paths.js';
import { ImageChain, Qcow2Error } from '../qcow2/index.js';
import { assertChainSafe, refusalForQcow2 } from '../store/safety.js';
import { volumeIdOfBackupFile } from '../store/disks.js';
import type { NasTarget } from '../nas/session.js';
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
}

/** One piece of the guest disk as it is read: `data` is null for a piece that reads as zeros without being read. */
export interface RestoreExtent {
  offset: number;
  length: number;
  data: Buffer | null;
}

export interface RestoreOptions {
  /**
   * Called for every piece of the disk in order of completion, before it is written; throwing
   * stops the restore (the target is then removed). The extension point for checking content
   * against a backup's digests.
   */
  verify?: (extent: RestoreExtent) => void | Promise<void>;
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
  virtualSize: number;
  /** Bytes written that hold data (zero and unallocated ranges are skipped on a file). */
  dataBytes: number;
  warnings: Warning[];
}

/** Piece size and how many are read at once: memory stays at PIECE × IN_FLIGHT. */
const PIECE = 4 << 20;
const IN_FLIGHT = 4;
const ZEROS = Buffer.alloc(PIECE);

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

const isAllZero = (b: Buffer): boolean => b.equals(ZEROS.subarray(0, b.length));

/**
 * Flatten the chain into `fh` (already the virtual size for a file): a pool of IN_FLIGHT
 * readers, each with its own buffer, takes the next PIECE of the disk and reads the extents
 * that hold data. Zeros are skipped on a file (a hole reads as zeros; data that is all zeros
 * too) and written on a device (it holds old data).
 */
async function flatten(
  ctx: OpContext,
  chain: ImageChain,
  fh: FileHandle,
  sparse: boolean,
  opts: RestoreOptions,
): Promise<{ dataBytes: number }> {
  const size = chain.virtualSize;
  let next = 0;
  let done = 0;
  let dataBytes = 0;
  let failed = false;
  const worker = async (): Promise<void> => {
    const buf = Buffer.allocUnsafe(PIECE);
    for (;;) {
      ctx.checkpoint();
      if (failed || next >= size) return;
      const start = next; // claimed before any await: no two readers take the same piece
      const end = Math.min(start + PIECE, size);
      next = end;
      for (let offset = start; offset < end;) {
        const s = await chain.status(offset, end - offset);
        let data: Buffer | null = null;
        if (s.kind === 'data' || s.kind === 'compressed') {
          data = buf.subarray(offset - start, offset - start + s.length);
          await chain.readInto(data, 0, offset, s.length);
        }
        await opts.verify?.({ offset, length: s.length, data });
        if (data !== null && !(sparse && isAllZero(data))) {
          await writeAll(fh, data, offset);
          dataBytes += s.length;
        } else if (!sparse) {
          await writeAll(fh, ZEROS.subarray(0, s.length), offset);
        }
        offset += s.length;
      }
      done += end - start;
      opts.progress?.(done, size);
    }
  };
  // On a failure the other readers stop at their next piece; the file is closed only once all have.
  const settled = await Promise.allSettled(
    Array.from({ length: IN_FLIGHT }, () =>
      worker().catch((e: unknown) => {
        failed = true;
        throw e;
      }),
    ),
  );
  const first = settled.find((r): r is PromiseRejectedResult => r.status === 'rejected');
  if (first) throw first.reason;
  return { dataBytes };
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
    chain = await ImageChain.open(file);
  } catch (e) {
    if (e instanceof Qcow2Error) throw refusalForQcow2(e, `The chain of ${basename(file)} in ${where}`, a.vm) ?? e;
    throw e;
  }
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
        result.dataBytes = (await flatten(ctx, chain, fh, false, opts)).dataBytes;
        await fh.sync();
        ctx.committed(); // the device holds the disk: a signal from here on no longer fails the run
      } finally {
        await fh.close();
      }
    } else {
      const raw = tempName(target.path, a.format === 'raw' ? 'tmp' : 'raw');
      temps.push(raw);
      const fh = await open(raw, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL, 0o600);
      try {
        await fh.truncate(chain.virtualSize);
        result.dataBytes = (await flatten(ctx, chain, fh, true, opts)).dataBytes;
        // The raw intermediate of a qcow2 target is read back and removed: only what is renamed into place is synced.
        if (a.format === 'raw') await fh.sync();
      } finally {
        await fh.close();
      }
      let final = raw;
      if (a.format === 'qcow2') {
        final = tempName(target.path, 'tmp');
        temps.push(final);
        ctx.checkpoint();
        await ctx.clients.qemuImg.convert(raw, 'raw', final);
        await chmod(final, 0o600); // a disk's content: as private as the raw one
        const q = await open(final, constants.O_RDONLY);
        await q.sync().finally(() => q.close());
      }
      // The commit point: once renamed, the restore stands whatever signal comes.
      await ctx.commit(() => rename(final, target.path));
      temps.splice(temps.indexOf(final), 1);
      await syncFolder(dirname(target.path));
    }
  } catch (e) {
    for (const t of temps)
      await unlink(t).catch((err: NodeJS.ErrnoException) => {
        if (err.code !== 'ENOENT') ctx.leftover(`Could not remove ${t}`); // ENOENT: never made (qemu-img had not started it)
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
    // The raw intermediate of a qcow2 target, once the qcow2 is in place.
    for (const t of temps) await unlink(t).catch(() => {});
  }
  ctx.logger.log(
    `Restored ${where}/${basename(file)} (${result.layers} layer(s), ${result.virtualSize} bytes, ${result.dataBytes} of data) to ${a.to} as ${a.format}`,
  );
  return result;
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
