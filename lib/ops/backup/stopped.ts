// Backup of a stopped VM: a copy of each -d disk (with -M incremental, when the parent bitmap
// can be trusted, only what it marks dirty: stopped-incremental.ts). A qcow2 source is copied natively through
// the copy engine (lib/qcow2) into a new qcow2, its manifest digests computed on the way; a
// raw, RBD or block-device source, and a qcow2 the native reader refuses or a QEMU process
// holds, goes through `qemu-img convert` (which then words any error as it always did).
// Stops at the first failure (the original carried on into a deleted folder); bitmaps are
// added to the sources only once every copy succeeded, so the next running backup can be
// incremental. No global sync: each file is flushed by its writer, and the commit fsyncs
// the files and the folder.
import { constants } from 'node:fs';
import { open, stat } from 'node:fs/promises';
import { allocatedBytes, checkSpace, total } from './space.js';
import { copyDeadline, deadlinePolicy, fmtSeconds, Heartbeat } from './deadline.js';
import { NO_SPACE } from './job.js';
import { STOPPED_FALLBACK_REASON, type BackupReport } from '../../agent-output.js';
import { NasbackupError, toNasbackupError } from '../../errors.js';
import { exists } from '../../paths.js';
import { ImageChain, Qcow2Error, readHeader } from '../../qcow2/index.js';
import { softly, ToolError } from '../../clients/failure.js';
import type { QemuImgClient } from '../../clients/qemu-img.js';
import { ProcLocksProbe } from '../../engine/locks.js';
import { backupFileName, resolveVolumeId } from '../../store/disks.js';
import type { LayerDigest } from '../../store/layer-digest.js';
import { formatBandwidth, type BackupArgs } from './args.js';
import { reportedSizes, tolerantApparentSize, WorkDir } from './workdir.js';
import { writeManifest } from './manifest.js';
import { backingReference, planOffline, retireBitmap, writeOfflineIncremental } from './stopped-incremental.js';
import { copyDiskToQcow2, copyHashPool } from './copy-disk.js';
import type { HashPool } from '../../store/hash-pool.js';
import { createProgress } from './progress.js';
import type { OpContext } from '../context.js';
import { verifyBackup } from './verify.js';
import type { BackupResult } from '../results.js';

/**
 * Source format, stated explicitly rather than probed: RBD and block devices are raw.
 * A file with the qcow2 magic is qcow2 even when its header is damaged: qemu-img
 * must refuse it, not copy its bytes as a "raw" disk.
 */
async function sourceFormat(src: string): Promise<'qcow2' | 'raw'> {
  if (src.startsWith('rbd:') || src.startsWith('/dev/')) return 'raw';
  return readHeader(src).then(
    () => 'qcow2' as const,
    (e: unknown) => (e instanceof Qcow2Error && (e.code === 'QCOW2_BAD_MAGIC' || e.code === 'QCOW2_IO') ? 'raw' : 'qcow2'),
  );
}

export async function stoppedBackup(ctx: OpContext, a: BackupArgs): Promise<BackupResult> {
  const { qemuImg } = ctx.clients;
  const disks: Array<{ src: string; volId: string; file: string }> = [];
  for (const [i, src] of a.diskPaths.entries()) {
    const volId = await resolveVolumeId(src);
    disks.push({ src, volId, file: backupFileName(i, volId) });
  }
  if (new Set(disks.map((d) => d.volId)).size !== disks.length) {
    throw new NasbackupError('INVALID_ARGUMENT', `Two disks share a volume id; their backup files would collide: ${a.diskPaths.join(',')}`);
  }
  for (const d of disks) {
    if (!d.src.startsWith('rbd:') && !(await exists(d.src, { follow: true }))) {
      throw new NasbackupError('FILE_NOT_FOUND', `Source disk does not exist: ${d.src}`);
    }
  }
  const asked = [
    ...(a.compress ? ['compressed clusters'] : []),
    ...(a.bandwidth !== null ? [`rate limit ${formatBandwidth(a.bandwidth)}`] : []),
  ];
  if (asked.length > 0) ctx.logger.log(`Stopped-VM copy of ${a.vm}: ${asked.join(', ')}`);
  const nas = await ctx.openNas(a.nas);
  const estimates = [];
  for (const d of disks) estimates.push(await allocatedBytes(d.src));
  await checkSpace(ctx, a.vm, nas.mountPoint, estimates);
  await ctx.lockVm(nas.mountPoint, a.instance, 'backup');
  const work = await WorkDir.create(nas.mountPoint, a.path, { staleAfterMs: ctx.config.lockStaleAfterMs, log: (m) => ctx.logger.log(m) });
  try {
    const formats: Array<'qcow2' | 'raw'> = [];
    for (const d of disks) formats.push(await sourceFormat(d.src));
    // -M incremental: only the clusters the parent bitmap marks dirty, when it can be trusted.
    const plan = a.mode === 'incremental' ? await planOffline(ctx, a, disks, formats, nas.mountPoint) : null;
    if (plan?.kind === 'full') ctx.logger.log(`Offline incremental of ${a.vm} not possible (${plan.reason}): taking a full copy instead`);
    const incremental = plan?.kind === 'incremental' ? plan : null;
    const digests: Array<LayerDigest | undefined> = [];
    // One deadline for all the copies, following the data (started once, like the agent's own wait).
    const deadline = copyDeadline(total(estimates), deadlinePolicy(ctx.config, a.bandwidth));
    const end = Date.now() + deadline.ms;
    ctx.logger.log(`Backup of stopped VM ${a.vm}: deadline ${fmtSeconds(deadline.ms)} (${deadline.why})`);
    // The native copies hash in one pool for every disk: on this thread, overlapped with the
    // I/O (copyHashPool), unless NASBACKUP_HASH_WORKERS asks for worker threads.
    const hashOnPool = !ctx.config.benchSkipManifest;
    const workers = ctx.config.hashWorkers ?? 0;
    let pool: HashPool | undefined;
    const poolFor = (): HashPool | undefined => (hashOnPool ? (pool ??= copyHashPool(workers)) : undefined);
    try {
      for (const [i, d] of disks.entries()) {
        ctx.checkpoint();
        const off = incremental?.disks[i];
        const dst = work.file(d.file);
        const beat = new CopyHeartbeat(ctx, `Copy of ${d.src}`, dst, estimates[i]!.bytes);
        try {
          digests.push(
            off
              ? await writeOfflineIncremental(ctx, off, dst, backingReference(work.final, off.parentAbs), poolFor())
              : await copyDisk(ctx, a, d.src, formats[i]!, dst, `disk ${i + 1}/${disks.length}`, end, poolFor, beat),
          );
        } catch (e) {
          const text = e instanceof ToolError ? e.details : e instanceof Error ? e.message : '';
          if (NO_SPACE.test(text)) {
            ctx.logger.log(`Copy of ${d.src}: ${text}`);
            throw new NasbackupError('NAS_FULL', nasFullText(a.vm, 'No space left on device'));
          }
          throw e;
        } finally {
          beat.stop();
        }
      }
    } finally {
      await pool?.close();
    }
    const manifest = await writeManifest(ctx, a, work, {
      kind: incremental ? 'incremental' : 'full',
      checkpoint: a.bitmapNew,
      incrementalFrom: incremental ? a.bitmapParent : null,
      parent: incremental ? incremental.parentDir : null,
      disks: disks.map((d, i) => ({ file: d.file, volId: d.volId, ...(digests[i] ? { digest: digests[i] } : {}) })),
    });
    if (a.verify) await verifyBackup(ctx, work, manifest);
    await ctx.commit(() => work.commit());

    // Seed the bitmap the next (running) incremental starts from. Only qcow2 files can
    // carry one; a disk without it makes that incremental fall back to a full, safely.
    // BITMAP_CREATED= is printed only when every disk has it empty and recording.
    let bitmapCreated: string | null = null;
    if (a.bitmapNew) {
      let all = true;
      for (const [i, d] of disks.entries()) {
        if (formats[i] !== 'qcow2') {
          all = false;
          ctx.logger.log(`No bitmap on ${d.src}: only qcow2 files can carry one`);
          continue;
        }
        if (!(await seedBitmap(ctx, qemuImg, d.src, a.bitmapNew))) all = false;
      }
      bitmapCreated = all ? a.bitmapNew : null;
      // The next incremental may only start from a bitmap that records on every disk.
      if (!all)
        ctx.logger.log(`Not reporting BITMAP_CREATED=${a.bitmapNew}: it is not an empty, recording bitmap on every disk (see above)`);
    }

    // The parent bitmap is consumed: the next incremental starts from --bitmap-new. (After a
    // fallback full too, where the disk had it: nothing may base on it any more.)
    const retire = incremental ? incremental.disks.map((d) => d.src) : plan?.kind === 'full' ? plan.seen : [];
    if (a.bitmapParent && a.bitmapParent !== a.bitmapNew) for (const src of retire) await retireBitmap(ctx, qemuImg, src, a.bitmapParent);

    const sizes = await reportedSizes(
      work.final,
      disks.map((d) => d.file),
      (m) => ctx.logger.log(m),
    );
    const report: BackupReport = {
      profile: a.profile,
      fallbackReason: a.mode === 'incremental' && !incremental ? STOPPED_FALLBACK_REASON : null,
      bitmapCreated,
      warnings: [],
      totalBytes: await tolerantApparentSize(work.final, (m) => ctx.logger.log(m)),
    };
    ctx.logger.log(
      `${incremental ? `Offline incremental (from ${a.bitmapParent})` : 'Backup'} of stopped VM ${a.vm} to ${work.final} completed (${report.totalBytes} bytes)`,
    );
    return { vm: a.vm, path: a.path, mode: a.mode, format: 'stopped', report, warnings: [], jobBlock: '', files: sizes };
  } catch (e) {
    const removed = await work.discard().then(
      () => true,
      (err: Error) => {
        ctx.leftover(`Could not remove the unfinished backup ${work.path}: ${err.message}`);
        return false;
      },
    );
    const err = toNasbackupError(e);
    if (err.code === 'NAS_FULL') {
      const head = e instanceof NasbackupError ? e.message : nasFullText(a.vm, err.message.split(':')[0]!);
      throw new NasbackupError(err.code, `${head}: ${removed ? 'partial files removed' : 'partial files NOT all removed'}`, { cause: e });
    }
    throw e;
  }
}

/** The one wording of a stopped backup's NAS_FULL (`why`: the system's reason, e.g. "No space left on device"). */
function nasFullText(vm: string, why: string): string {
  return `The NAS ran out of space during the backup of stopped VM ${vm} (${why})`;
}

/**
 * Heartbeats of one copy, every NASBACKUP_HEARTBEAT_INTERVAL. A native copy reports its own
 * progress (guest bytes done of the disk, as its progress bar shows): the timer then only
 * repeats the last reading (a stall shows as 0 B/s) and never touches the NAS. A copy that
 * does not (qemu-img convert, the offline incremental) is followed by the bytes its target
 * holds, one `stat` at a time: a stat stuck on a dead NAS holds no more than one thread, and
 * the copy's own deadline ends the backup.
 */
class CopyHeartbeat {
  private readonly beat: Heartbeat;
  private readonly timer: NodeJS.Timeout;
  private fed = false;
  private polling = false;

  constructor(
    ctx: OpContext,
    label: string,
    private readonly dst: string,
    private readonly totalBytes: number | null,
  ) {
    this.beat = new Heartbeat(label, ctx.config.heartbeatMs, (l) => ctx.logger.log(l));
    this.timer = setInterval(() => this.poll(), ctx.config.heartbeatMs);
    this.timer.unref();
  }

  /** The copy's own reading: from now on the target is not polled. */
  progress(done: number, total: number): void {
    this.fed = true;
    this.beat.update(done, total);
  }

  stop(): void {
    clearInterval(this.timer);
  }

  private poll(): void {
    if (this.fed) return this.beat.tick();
    if (this.polling) return;
    this.polling = true;
    void stat(this.dst)
      .then(
        (st) => {
          if (!this.fed) this.beat.update(st.blocks * 512, this.totalBytes);
        },
        () => {},
      )
      .finally(() => {
        this.polling = false;
      });
  }
}

/**
 * Copy one disk into `dst`; returns its digests when they were computed on the way (native
 * copy), else undefined (the manifest step reads the file). Logs the throughput either way.
 */
async function copyDisk(
  ctx: OpContext,
  a: BackupArgs,
  src: string,
  fmt: 'qcow2' | 'raw',
  dst: string,
  label: string,
  end: number,
  poolFor: () => HashPool | undefined,
  beat: CopyHeartbeat,
): Promise<LayerDigest | undefined> {
  const started = Date.now();
  // What is left of the backup's deadline (it follows the data: lib/ops/backup/deadline.ts).
  const limitMs = Math.max(1000, end - started);
  const chain = fmt === 'qcow2' ? await openNative(ctx, src) : null;
  if (chain === null) {
    // Parallel options: see QemuImgClient.convert.
    await ctx.clients.qemuImg.convert(src, fmt, dst, {
      parallel: true,
      compress: a.compress,
      rateBytesPerSec: a.bandwidth,
      timeoutMs: limitMs,
    });
    await flushFile(ctx, dst);
    const size = (await stat(dst)).size;
    logThroughput(ctx, `Copied ${src} to ${dst} with qemu-img convert`, `${size} bytes written`, size, Date.now() - started);
    return undefined;
  }
  // From here the heartbeats follow the engine (the whole disk, in guest bytes), not the NAS file.
  beat.progress(0, chain.virtualSize);
  const progress = await createProgress(process.stdout.isTTY === true && process.stderr.isTTY === true, `${a.vm} ${label}`);
  // The deadline, checked between requests and around the whole copy (a write or flush stuck
  // on a dead NAS); once it passed, the next checkpoint stops the engine.
  let expired = false;
  try {
    const r = await withDeadline(
      copyDiskToQcow2(chain, dst, {
        compress: a.compress,
        digest: !ctx.config.benchSkipManifest,
        pool: poolFor(),
        algorithm: ctx.config.digestAlgorithm,
        ...(a.bandwidth !== null ? { rateBytesPerSec: a.bandwidth } : {}),
        onProgress: (done, total) => {
          progress.update(done, total);
          beat.progress(done, total);
        },
        checkpoint: () => {
          ctx.checkpoint();
          if (expired || Date.now() - started > limitMs)
            throw new NasbackupError('COMMAND_TIMEOUT', `Copying ${src} did not finish within ${Math.round(limitMs / 1000)} s`);
        },
      }),
      limitMs,
      `Copying ${src}`,
    ).catch((e: unknown) => {
      expired = true;
      throw e;
    });
    logThroughput(
      ctx,
      `Copied ${src} to ${dst}`,
      `${chain.virtualSize} bytes virtual, ${r.stats.readBytes} bytes of data read, ${r.fileBytes} bytes written`,
      r.stats.readBytes,
      Date.now() - started,
    );
    return r.digest;
  } catch (e) {
    if (e instanceof Qcow2Error)
      throw new NasbackupError('CONVERT_FAILED', `Failed to copy ${src} to ${dst}: ${e.message}`, { details: e.code });
    throw e;
  } finally {
    progress.stop();
    await chain.close();
  }
}

/**
 * The source's chain, opened natively; null (qemu-img convert does the copy, and words any
 * refusal as before) when the reader refuses it or a QEMU process holds one of its files.
 */
async function openNative(ctx: OpContext, src: string): Promise<ImageChain | null> {
  let chain: ImageChain;
  try {
    // A front-to-back copy needs a table or two per layer: a small L2 cache keeps memory flat.
    chain = await ImageChain.open(src, { l2CacheBytes: 512 << 10 });
  } catch (e) {
    if (!(e instanceof Qcow2Error)) throw e;
    ctx.logger.log(`Copying ${src} with qemu-img convert: the native reader refuses it (${e.message})`);
    return null;
  }
  const held = await new ProcLocksProbe().held(chain.images.map((i) => i.path));
  if (held && held.length > 0) {
    await chain.close();
    ctx.logger.log(`Copying ${src} with qemu-img convert: ${held.join(', ')} is held by a QEMU process`);
    return null;
  }
  return chain;
}

/**
 * fdatasync of a file qemu-img wrote (qemu-img does not flush its output), under the deadline
 * the global sync had: a flush that fails or does not return in time is logged, not fatal
 * (the commit fsyncs the file again), as a failed sync was.
 */
async function flushFile(ctx: OpContext, path: string): Promise<void> {
  const fh = await open(path, constants.O_RDONLY);
  try {
    await withDeadline(fh.datasync(), ctx.config.commandTimeoutMs, `fdatasync of ${path}`);
  } catch (e) {
    ctx.logger.log(`Warning: flushing ${path} failed: ${(e as Error).message}`);
  } finally {
    await fh.close();
  }
}

/** `p`, or a COMMAND_TIMEOUT once `ms` passed (a syscall stuck on a dead NAS cannot be stopped). */
async function withDeadline<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new NasbackupError('COMMAND_TIMEOUT', `${what} did not finish within ${Math.round(ms / 1000)} s`)), ms);
  });
  try {
    return await Promise.race([p, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** The per-disk line: what was moved, how long it took, the rate of the data moved. */
function logThroughput(ctx: OpContext, what: string, facts: string, moved: number, ms: number): void {
  const rate = ms > 0 ? moved / 1048576 / (ms / 1000) : 0;
  ctx.logger.log(`${what}: ${facts} in ${(ms / 1000).toFixed(2)} s (${rate.toFixed(1)} MiB/s)`);
}

/**
 * Add the bitmap: it must end up recording, persistent and empty, or it is not reported.
 * One that already exists (an earlier attempt of this backup, or a crash) cannot be
 * trusted as it is: a disabled one records nothing even when cleared, an in-use one
 * cannot be cleared at all. So it is replaced (removed and added in one qemu-img run)
 * and then read back.
 */
async function seedBitmap(ctx: OpContext, qemuImg: QemuImgClient, src: string, name: string): Promise<boolean> {
  const added = await qemuImg.addBitmap(src, name).catch((e: unknown) => toolText(e));
  if (added === true) return true;
  if (typeof added === 'string') {
    ctx.logger.log(`Warning: could not add bitmap ${name} to ${src}: ${added}`);
    return false;
  }
  const refused = await softly(qemuImg.replaceBitmap(src, name));
  if (refused !== null) {
    ctx.logger.log(`Warning: bitmap ${name} already exists on ${src} and could not be replaced: ${refused}`);
    return false;
  }
  let flags: string[] | undefined;
  try {
    flags = (await qemuImg.bitmaps(src)).find((b) => b.name === name)?.flags;
  } catch (e) {
    ctx.logger.log(`Warning: cannot read back bitmap ${name} on ${src}: ${toolText(e)}`);
    return false;
  }
  if (!flags?.includes('auto') || flags.includes('in-use')) {
    ctx.logger.log(
      `Warning: bitmap ${name} on ${src} is not recording after it was replaced (${flags ? `flags: ${flags.join(',') || 'none'}` : 'missing'})`,
    );
    return false;
  }
  ctx.logger.log(`Replaced the existing bitmap ${name} on ${src} with an empty, recording one`);
  return true;
}

/** A tool failure's own text; anything else propagates. */
function toolText(e: unknown): string {
  if (e instanceof ToolError) return e.details;
  throw e;
}
