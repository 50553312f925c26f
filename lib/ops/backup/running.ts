// Backup of a running (or paused) VM: libvirt push backup, with a checkpoint when the
// agent asks for one, incrementals that stay correct after a VM restart, a guest
// frozen only for the instant of backup-begin, and a clean undo on every failure.
import { stat, statfs, unlink, writeFile } from 'node:fs/promises';
import { dirname, join, relative } from 'node:path';
import type { BackupReport } from '../../agent-output.js';
import { NasbackupError, toNasbackupError, type Warning } from '../../errors.js';
import { ensureWithin, exists, parseRelativePath } from '../../paths.js';
import { readChain, readHeader } from '../../qcow2/index.js';
import { chainRefusal, inspectChain } from '../../store/safety.js';
import type { QemuImgClient } from '../../clients/qemu-img.js';
import { softly } from '../../clients/failure.js';
import { RESTORE_FILE_NAMES, type QueryBlockEntry, type VirshClient } from '../../clients/virsh.js';
import { backupFileName, matchParents, resolveVolumeId } from '../../store/disks.js';
import { jobHasEnded, waitForBackupJob } from './job.js';
import { copyDeadline, deadlinePolicy, fmtBytes, fmtSeconds, Heartbeat } from './deadline.js';
import { checkSpace, runningEstimate, total, type DiskEstimate } from './space.js';
import { createProgress } from './progress.js';
import { backupXml, checkpointXml, redefineCheckpointXml } from './xml.js';
import type { BackupArgs } from './args.js';
import { reportedSizes, tolerantApparentSize, WorkDir } from './workdir.js';
import { digestNewLayers, startHashPool, writeManifest } from './manifest.js';
import { limitBackupRate, type RateLimiter } from './throttle.js';
import { verifyBackup } from './verify.js';
import { syncAfter, type OpContext } from '../context.js';
import { UndoStack } from '../undo.js';
import type { BackupResult } from '../results.js';

interface Disk {
  target: string;
  source: string;
  volId: string;
  file: string;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function listDisks(virsh: VirshClient, vm: string): Promise<Disk[]> {
  const rows = (await virsh.blockDevices(vm)).filter((d) => d.device === 'disk' && d.source !== '-');
  if (rows.length === 0) throw new NasbackupError('NO_DISKS', `VM ${vm} has no disks to back up`);
  const disks: Disk[] = [];
  for (const [i, d] of rows.entries()) {
    const volId = await resolveVolumeId(d.source);
    disks.push({ target: d.target, source: d.source, volId, file: backupFileName(i, volId) });
  }
  const seen = new Set<string>();
  for (const d of disks) {
    if (seen.has(d.volId))
      throw new NasbackupError('INVALID_ARGUMENT', `Two disks of ${vm} share the volume id ${d.volId}; their backup files would collide`);
    seen.add(d.volId);
  }
  return disks;
}

interface Plan {
  /** Checkpoint the backup is taken against (incremental), or null for a full. */
  incrementalFrom: string | null;
  /** Checkpoint created with the backup, or null (legacy). */
  newCheckpoint: string | null;
  /** Mount-relative parent file per disk (incremental only). */
  parents: string[];
  fallbackReason: string | null;
  /** A registered parent checkpoint whose bitmap cannot be trusted: removed once the full succeeded. */
  dropParent?: string | null;
}

/**
 * Decide full or incremental. An incremental needs the parent's bitmap on every disk,
 * recording and consistent (QMP query-block), and the parent checkpoint registered in
 * libvirt; a transient domain forgets it on restart while the bitmap stays in every
 * qcow2, so it is then redefined. Otherwise: a full backup, reported as a fallback, and
 * a registered parent with an untrusted bitmap is removed after it. Never a fresh
 * bitmap under the parent's name (that incremental would silently miss every write
 * since the parent).
 */
async function plan(ctx: OpContext, virsh: VirshClient, a: BackupArgs, disks: Disk[], mount: string, work: WorkDir): Promise<Plan> {
  if (a.mode === 'legacy') return { incrementalFrom: null, newCheckpoint: null, parents: [], fallbackReason: null };
  const newCheckpoint = a.bitmapNew!;
  const names = await virsh.checkpoints(a.vm);
  if (names.includes(newCheckpoint) && newCheckpoint !== a.bitmapParent) {
    // Left by an earlier attempt of this same backup: it is ours to replace.
    ctx.logger.log(`Removing stale checkpoint ${newCheckpoint} of ${a.vm} left by an earlier attempt`);
    await virsh.checkpointDelete(a.vm, newCheckpoint);
  }
  if (a.mode === 'full') return { incrementalFrom: null, newCheckpoint, parents: [], fallbackReason: null };

  const parent = a.bitmapParent!;
  const parents = await matchParents(disks, a.parentPaths, async (rel) =>
    exists(await ensureWithin(mount, rel, { what: '--parent-paths', minDepth: 3 }), { follow: true }),
  );
  for (const rel of parents) {
    const abs = await ensureWithin(mount, rel, { what: '--parent-paths', minDepth: 3 });
    if (
      !(await stat(abs).then(
        (s) => s.isFile(),
        () => false,
      ))
    ) {
      throw new NasbackupError('FILE_NOT_FOUND', `Parent backup file does not exist on NAS: ${abs}`);
    }
    await readHeader(abs).catch((e: Error) => {
      throw new NasbackupError('NOT_QCOW2', `Parent backup file is not a usable qcow2 image: ${abs}`, { details: e.message });
    });
    // The new file will hang below it: its chain must be safe and sound (the chain safety
    // check, before anything follows it) and whole before backup-begin.
    const vmDir = parseRelativePath(rel, { what: '--parent-paths' })[0]!;
    const safety = await inspectChain(abs, join(mount, vmDir));
    if (safety.problem && safety.problem.kind !== 'broken')
      throw chainRefusal(safety.problem, `The chain of parent backup file ${abs}`, vmDir);
    await readChain(abs).catch((e: Error) => {
      throw new NasbackupError('CHAIN_BROKEN', `Parent backup file does not read as a complete chain: ${abs}`, { details: e.message });
    });
  }
  const full = (reason: string): Plan => {
    ctx.logger.log(`Incremental backup of ${a.vm} not possible (${reason}): taking a full backup instead`);
    return { incrementalFrom: null, newCheckpoint, parents: [], fallbackReason: reason };
  };
  // Registered or not, the parent is a base only if its bitmap records on every disk:
  // a disabled one (or one left in-use by a crash) lacks writes since the parent.
  // libvirt 9 refuses it at backup-begin, which would fail the backup, not fall back.
  const registered = names.includes(parent);
  const untrusted = (reason: string): Plan => ({ ...full(reason), dropParent: registered && parent !== newCheckpoint ? parent : null });
  let entries: QueryBlockEntry[] = [];
  const unreadable = await softly(virsh.queryBlock(a.vm).then((q) => (entries = q)));
  if (unreadable !== null) return full(`cannot inspect the disks' bitmaps: ${unreadable}`);
  for (const d of disks) {
    const entry = entries.find((e) => e.file === d.source);
    const bm = entry?.bitmaps.find((b) => b.name === parent);
    if (!bm) return untrusted(`parent bitmap ${parent} missing on disk ${d.target}`);
    const why = bm.inconsistent ? 'inconsistent' : bm.recording === false ? 'disabled' : bm.persistent === false ? 'not persistent' : null;
    if (why) return untrusted(`parent bitmap ${parent} on disk ${d.target} is not usable (${why})`);
  }
  if (registered) return { incrementalFrom: parent, newCheckpoint, parents, fallbackReason: null, dropParent: null };

  const xml = work.file('redefine-checkpoint.xml');
  const epoch = /(\d{9,})$/.exec(parent);
  await writeFile(
    xml,
    redefineCheckpointXml(
      parent,
      epoch ? Number(epoch[1]) : Math.floor(Date.now() / 1000),
      disks.map((d) => d.target),
    ),
  );
  const refused = await softly(virsh.checkpointCreate(a.vm, xml, true));
  await unlink(xml).catch(() => {});
  if (refused !== null) return full(`cannot register the existing checkpoint ${parent}: ${refused}`);
  ctx.logger.log(`Registered existing checkpoint ${parent} of ${a.vm} (bitmap present on every disk)`);
  return { incrementalFrom: parent, newCheckpoint, parents, fallbackReason: null, dropParent: null };
}

/** Freeze through the guest agent. Returns null on success, or why it failed. */
async function freeze(virsh: VirshClient, vm: string, timeoutSec: number): Promise<string | null> {
  return softly(virsh.guestFreeze(vm, timeoutSec));
}

/** Thaw, retried: a guest must never stay frozen because of us. */
async function thaw(ctx: OpContext, virsh: VirshClient, vm: string): Promise<string | null> {
  let last = '';
  for (let attempt = 1; attempt <= 3; attempt++) {
    const failed = await softly(virsh.guestThaw(vm, ctx.config.quiesceTimeoutSec));
    if (failed === null) return null;
    last = failed;
    ctx.logger.log(`Thaw of ${vm} failed (attempt ${attempt}/3): ${last}`);
    if (attempt < 3) await sleep(500 * attempt);
  }
  return last;
}

/** Abort the job and wait (bounded) until libvirt no longer runs it. */
async function abortJob(ctx: OpContext, virsh: VirshClient, vm: string): Promise<void> {
  const refused = await softly(virsh.jobAbort(vm));
  if (refused !== null) ctx.logger.log(`domjobabort ${vm}: ${refused}`);
  for (let i = 0; i < 50; i++) {
    const t = await virsh.jobInfo(vm).then(
      (j) => j.type,
      () => null,
    );
    if (t !== 'Unbounded' && t !== 'Bounded') return;
    await sleep(200);
  }
  ctx.logger.log(`Warning: the backup job of ${vm} was still running 10 s after domjobabort`);
}

export async function runningBackup(ctx: OpContext, a: BackupArgs, virsh: VirshClient, paused: boolean): Promise<BackupResult> {
  const { qemuImg } = ctx.clients;
  const nas = await ctx.openNas(a.nas);
  const disks = await listDisks(virsh, a.vm);
  const estimates = await estimate(ctx, virsh, a, disks);
  await checkSpace(ctx, a.vm, nas.mountPoint, estimates);
  await ctx.lockVm(nas.mountPoint, a.instance, 'backup');
  const work = await WorkDir.create(nas.mountPoint, a.path, { staleAfterMs: ctx.config.lockStaleAfterMs, log: (m) => ctx.logger.log(m) });

  const undo = new UndoStack(ctx.logger);
  undo.defer('remove the work folder', () =>
    work.discard().catch((err: Error) => ctx.leftover(`Could not remove the unfinished backup ${work.path}: ${err.message}`)),
  );
  const warnings: Warning[] = [];
  const progress = await createProgress(process.stdout.isTTY === true);
  let limiter: RateLimiter | null = null;
  let failed = false;
  try {
    const p = await plan(ctx, virsh, a, disks, nas.mountPoint, work);
    const targets = disks.map((d) => ({ name: d.target, file: work.file(d.file) }));
    const bxml = work.file('backup.xml');
    const cxml = work.file('checkpoint.xml');
    await writeFile(bxml, backupXml(targets, p.incrementalFrom));
    if (p.newCheckpoint)
      await writeFile(
        cxml,
        checkpointXml(
          p.newCheckpoint,
          disks.map((d) => d.target),
        ),
      );
    ctx.checkpoint();

    // Discard stale completed-job statistics so the poll cannot mistake them for ours
    // (before any freeze: the guest stays frozen only for backup-begin itself).
    await softly(virsh.jobInfoCompleted(a.vm));
    const releaseJob = await beginBackup(
      ctx,
      virsh,
      a,
      paused,
      undo,
      warnings,
      bxml,
      p.newCheckpoint ? { name: p.newCheckpoint, xml: cxml } : null,
      disks.map((d) => d.target),
    );
    // -b: shared by the disks still copying, as they finish.
    if (a.bandwidth !== null) limiter = await limitBackupRate(virsh, a.vm, a.bandwidth, (m) => ctx.logger.log(m));
    // The digests' workers start while QEMU copies, not after it.
    const pool = startHashPool(ctx, total(estimates));
    if (pool) undo.defer('stop the hash workers', () => pool.close());
    await captureRestoreFiles(virsh, a.vm, work);

    // The deadline follows the data to move (never a fixed wait a large disk outgrows).
    const policy = deadlinePolicy(ctx.config, a.bandwidth);
    const toMove = total(estimates);
    const deadline = copyDeadline(toMove, policy);
    ctx.logger.log(`Backup job of ${a.vm}: deadline ${fmtSeconds(deadline.ms)} (${deadline.why})`);
    const beat = new Heartbeat(`Backup of ${a.vm}`, ctx.config.heartbeatMs, (l) => ctx.logger.log(l));
    const block = await waitForBackupJob(virsh, a.vm, {
      deadlineMs: deadline.ms,
      ...(toMove === null ? { deadlineFromTotal: (t: number) => copyDeadline(t, policy).ms } : {}),
      initialIntervalMs: ctx.config.jobPollInitialMs,
      maxIntervalMs: ctx.config.jobPollMaxMs,
      checkpoint: () => ctx.checkpoint(),
      onProgress: (done, total) => {
        progress.update(done, total);
        beat.update(done, total);
      },
      onPoll: () => beat.tick(),
      watch: () => (paused ? Promise.resolve(null) : pausedOnIoError(virsh, a.vm, nas.mountPoint)),
      nasFull: async () => (await nasLooksFull(nas.mountPoint)).full,
      log: (l) => ctx.logger.log(l),
    });
    releaseJob();
    progress.stop();
    await limiter?.stop();

    if (p.incrementalFrom) await relinkOntoParents(qemuImg, disks, p.parents, nas.mountPoint, work);
    // The files are complete: digest them now, from the page cache, while the NAS is flushed.
    const digests = digestNewLayers(
      ctx,
      work,
      disks.map((d) => d.file),
      pool,
    );
    // The job's final statistics (virsh) are read while the layers are digested.
    const finalStats = virsh.jobInfoCompleted(a.vm).catch(() => null);
    undo.defer('stop the digests', () => digests.cancel());
    for (const f of [bxml, cxml]) await unlink(f).catch(() => {});
    await syncAfter(ctx, 'backup');
    await checkNewChains(disks, work);
    const manifest = await writeManifest(
      ctx,
      a,
      work,
      {
        kind: p.incrementalFrom ? 'incremental' : 'full',
        checkpoint: p.newCheckpoint,
        incrementalFrom: p.incrementalFrom,
        parent: p.incrementalFrom && p.parents[0] ? dirname(p.parents[0]) : null,
        disks: disks.map((d) => ({ file: d.file, volId: d.volId })),
      },
      digests,
    );
    if (a.verify) await verifyBackup(ctx, work, manifest);
    await ctx.commit(() => work.commit());
    await dropOldCheckpoints(ctx, virsh, a.vm, p);

    const final = await finalStats;
    const jobBlock = final?.type === 'Completed' ? final.text : block;
    const report: BackupReport = {
      profile: a.profile,
      fallbackReason: p.fallbackReason,
      bitmapCreated: p.newCheckpoint,
      warnings: warnings.map((w) => w.message),
      totalBytes: await tolerantApparentSize(work.final, (m) => ctx.logger.log(m)),
    };
    for (const w of warnings) ctx.logger.log(`Warning: ${w.message}`);
    // The agent chose the format: -d given means the stopped-VM one (one integer per line).
    const files = await reportedSizes(
      work.final,
      disks.map((d) => d.file),
      (m) => ctx.logger.log(m),
    );
    ctx.logger.log(`Backup of ${a.vm} to ${work.final} completed (${report.totalBytes} bytes)`);
    return {
      vm: a.vm,
      path: a.path,
      mode: a.mode,
      format: a.diskPaths.length > 0 ? 'stopped' : 'running',
      report,
      warnings,
      jobBlock,
      files,
    };
  } catch (e) {
    failed = true;
    progress.stop();
    await limiter?.stop();
    await undo.unwind(e);
    const resumed = paused ? false : await resumeIfOurs(ctx, virsh, a.vm, nas.mountPoint, e);
    throw await outcome(e, a.vm, work, resumed);
  } finally {
    // After a success too: a VM that an I/O error of ours paused does not stay paused.
    if (!paused && !failed) await resumeIfOurs(ctx, virsh, a.vm, nas.mountPoint, null);
  }
}

/**
 * backup-begin, with the guest frozen only for that instant when asked to. Once the job
 * runs, its undos are registered: abort it (released by the caller once it finished) and
 * delete the checkpoint it created; a guest that could not be thawed is thawed first.
 */
async function beginBackup(
  ctx: OpContext,
  virsh: VirshClient,
  a: BackupArgs,
  paused: boolean,
  undo: UndoStack,
  warnings: Warning[],
  bxml: string,
  checkpoint: { name: string; xml: string } | null,
  targets: string[],
): Promise<() => void> {
  let frozen = false;
  if (a.quiesce && paused) {
    warnings.push({ code: 'QUIESCE_SKIPPED', message: `Quiesce skipped: VM ${a.vm} is paused, its disks are already quiet` });
  } else if (a.quiesce) {
    const why = await freeze(virsh, a.vm, ctx.config.quiesceTimeoutSec);
    if (why === null) frozen = true;
    else {
      // A freeze whose reply was lost (agent timeout) may still have frozen the guest.
      await softly(virsh.guestThaw(a.vm, ctx.config.quiesceTimeoutSec));
      if (ctx.config.quiesceRequired)
        throw new NasbackupError('QUIESCE_FAILED', `Failed to freeze the filesystems of vm ${a.vm}`, { details: why });
      warnings.push({ code: 'QUIESCE_UNAVAILABLE', message: `Quiesce failed, backup is crash-consistent: ${why.split('\n')[0]}` });
    }
  }
  let refused: unknown = null;
  let thawError: string | null = null;
  try {
    // -b: the limit goes on the jobs the moment they exist (shared by the disks; moved later by the limiter).
    const limits = a.bandwidth === null ? [] : targets.map((target) => ({ target, bytesPerSec: a.bandwidth! / targets.length }));
    for (const failed of await virsh.backupBegin(a.vm, bxml, checkpoint?.xml ?? null, limits))
      // QEMU copies at full speed until the limit lands; a small disk can be done by then.
      ctx.logger.log(
        /in state 'concluded'/.test(failed)
          ? `A backup job of ${a.vm} finished before its rate limit was set`
          : `Warning: cannot limit the rate of a backup job of ${a.vm}: ${failed}`,
      );
  } catch (e) {
    refused = e;
  } finally {
    if (frozen) thawError = await thaw(ctx, virsh, a.vm);
  }
  let releaseJob = () => {};
  if (refused === null) {
    if (checkpoint) {
      const { name } = checkpoint;
      undo.defer('delete the new checkpoint', async () => {
        const r = await softly(virsh.checkpointDelete(a.vm, name));
        if (r !== null) ctx.logger.log(`Warning: could not remove checkpoint ${name} of the failed backup: ${r}`);
      });
    }
    releaseJob = undo.defer('abort the backup job', async (failure) => {
      // A job libvirt reported as failed (or gone) has nothing left to abort.
      if (!jobHasEnded(failure)) await abortJob(ctx, virsh, a.vm);
    });
  }
  if (thawError !== null) {
    undo.defer('thaw the guest', async () => {
      await thaw(ctx, virsh, a.vm);
    });
    throw new NasbackupError('THAW_FAILED', `Failed to thaw the filesystem for vm ${a.vm}: ${thawError}`);
  }
  // What backup-begin threw (a coded ToolError), rethrown once its undos are registered.
  // eslint-disable-next-line @typescript-eslint/only-throw-error -- a caught value, rethrown as is
  if (refused !== null) throw refused;
  return releaseJob;
}

/** What restore needs besides the disks. */
async function captureRestoreFiles(virsh: VirshClient, vm: string, work: WorkDir): Promise<void> {
  for (const name of RESTORE_FILE_NAMES) {
    await writeFile(work.file(name), await virsh.restoreFile(vm, name), { mode: 0o644 });
  }
}

/** Relink each incremental onto its parent backup: libvirt wrote the live disk there. */
async function relinkOntoParents(qemuImg: QemuImgClient, disks: Disk[], parents: string[], mount: string, work: WorkDir): Promise<void> {
  for (const [i, d] of disks.entries()) {
    const file = work.file(d.file);
    const parentAbs = await ensureWithin(mount, parents[i]!, { what: '--parent-paths', minDepth: 3 });
    const name = relative(work.final, parentAbs);
    await qemuImg.rebase({ file, backing: name, backingFormat: 'qcow2', unsafe: true });
  }
}

/**
 * Every new file must read as a chain ending in a full backup on the NAS, checked
 * before the commit (the work folder is a sibling of the final one, so relative
 * backing names resolve the same): a failed run never leaves a finished-looking backup.
 */
async function checkNewChains(disks: Disk[], work: WorkDir): Promise<void> {
  for (const d of disks) {
    await readChain(work.file(d.file)).catch((e: Error) => {
      throw new NasbackupError('CHAIN_BROKEN', `Backup file ${work.file(d.file)} does not read as a complete chain`, {
        details: e.message,
      });
    });
  }
}

/** After the commit: the checkpoints no later backup may start from. */
async function dropOldCheckpoints(ctx: OpContext, virsh: VirshClient, vm: string, p: Plan): Promise<void> {
  if (p.incrementalFrom) {
    // The parent checkpoint is no longer needed: the next incremental starts from the new one.
    const r = await softly(virsh.checkpointDelete(vm, p.incrementalFrom));
    if (r !== null) ctx.logger.log(`Warning: could not remove checkpoint ${p.incrementalFrom}: ${r}`);
  }
  if (p.dropParent) {
    // Treated as missing: the new checkpoint replaces it, nothing may base on it again.
    const r = await softly(virsh.checkpointDelete(vm, p.dropParent));
    if (r === null) ctx.logger.log(`Removed checkpoint ${p.dropParent} of ${vm}: its bitmap cannot be trusted`);
    else ctx.logger.log(`Warning: could not remove the untrusted checkpoint ${p.dropParent}: ${r}`);
  }
}

/** Estimates of the bytes the backup writes, per disk (see space.ts). */
async function estimate(ctx: OpContext, virsh: VirshClient, a: BackupArgs, disks: Disk[]): Promise<DiskEstimate[]> {
  let entries: QueryBlockEntry[] = [];
  const unreadable = await softly(virsh.queryBlock(a.vm).then((q) => (entries = q)));
  if (unreadable !== null) ctx.logger.log(`Cannot read the disks' allocation from QEMU (${unreadable}); reading the disk files`);
  const parent = a.mode === 'incremental' ? a.bitmapParent : null;
  // An incremental copies the parent bitmap's dirty bytes only when every disk has it (else it falls back to a full).
  const usable = parent !== null && disks.every((x) => entries.find((e) => e.file === x.source)?.bitmaps.some((b) => b.name === parent));
  const out: DiskEstimate[] = [];
  for (const d of disks) {
    const entry = entries.find((e) => e.file === d.source);
    out.push({ ...(await runningEstimate(d.source, entry, usable ? parent : null)), disk: d.target });
  }
  return out;
}

/** libvirt's reason for a pause on a failed write (`virsh domstate --reason`: "I/O error"). */
const IO_ERROR_REASON = /i\/o error|ioerror/i;

/**
 * The NAS has (about) no space left: what a write of ours that failed with ENOSPC leaves.
 * Free space under 2% of the file system, and under 64 MiB.
 */
async function nasLooksFull(mountPoint: string): Promise<{ full: boolean; free: number | null }> {
  const s = await statfs(mountPoint).catch(() => null);
  if (!s) return { full: false, free: null };
  const free = s.bavail * s.bsize;
  return { full: free < Math.min(64 * 1024 * 1024, s.blocks * s.bsize * 0.02), free };
}

/**
 * While the job runs: the VM paused on an I/O error. A full NAS means our push target
 * failed the guest's write (copy-before-write): NAS_FULL; otherwise IO_ERROR. Either way
 * the job is stopped (the caller's undo aborts it).
 */
async function pausedOnIoError(virsh: VirshClient, vm: string, mountPoint: string): Promise<NasbackupError | null> {
  const s = await virsh.stateReason(vm).catch(() => null);
  if (s?.state !== 'paused' || !IO_ERROR_REASON.test(s.reason)) return null;
  const nas = await nasLooksFull(mountPoint);
  if (nas.full) return new NasbackupError('NAS_FULL', `The NAS ran out of space during the backup of ${vm} (VM paused on an I/O error)`);
  const free = nas.free === null ? 'unknown' : fmtBytes(nas.free);
  return new NasbackupError('IO_ERROR', `VM ${vm} paused on an I/O error during the backup (the NAS is not full: ${free} free)`);
}

/** What to do with a VM found paused after our run (it was running when we started). */
export function pauseDecision(p: { state: string; reason: string; failure: string | null; nasFull: boolean }): 'none' | 'resume' | 'leave' {
  if (p.state !== 'paused') return 'none';
  // Paused by someone else while we ran (virsh suspend: "user", a migration, …): not ours.
  if (p.reason !== '' && !IO_ERROR_REASON.test(p.reason)) return 'leave';
  // An I/O error (or no reason given): ours when our target filled up.
  return p.failure === 'NAS_FULL' || p.nasFull ? 'resume' : 'leave';
}

/**
 * A VM that was running before us is resumed when our run (a full NAS) paused it, and only
 * then: one paused by an operator, or by an I/O error that is not ours, is left as it is.
 * Returns whether it was resumed.
 */
async function resumeIfOurs(ctx: OpContext, virsh: VirshClient, vm: string, mountPoint: string, failure: unknown): Promise<boolean> {
  const s = await virsh.stateReason(vm).catch(() => null);
  if (s?.state !== 'paused') return false;
  const code = failure === null ? null : toNasbackupError(failure).code;
  const nas = code === 'NAS_FULL' ? { full: true } : await nasLooksFull(mountPoint);
  const what = pauseDecision({ state: s.state, reason: s.reason, failure: code, nasFull: nas.full });
  const why = s.reason || 'no reason given';
  if (what !== 'resume') {
    ctx.logger.log(`Warning: VM ${vm} is paused (${why}), not by this backup; leaving it paused`);
    return false;
  }
  ctx.logger.log(`VM ${vm} is paused (${why}) by the backup's full NAS; resuming it`);
  const refused = await softly(virsh.resume(vm));
  if (refused !== null) {
    ctx.logger.log(`Warning: could not resume ${vm}: ${refused}`);
    return false;
  }
  return true;
}

/** A full NAS in one line (whichever write found it): what happened and what was undone. Other failures as they are. */
async function outcome(e: unknown, vm: string, work: WorkDir, resumed: boolean): Promise<unknown> {
  const err = toNasbackupError(e);
  if (err.code !== 'NAS_FULL') return e;
  // A write of ours that failed (a side file, the manifest): the system's words, without the call.
  const head =
    e instanceof NasbackupError ? err.message : `The NAS ran out of space during the backup of ${vm} (${err.message.split(':')[0]})`;
  const removed = !(await exists(work.path));
  const parts = ['backup stopped', removed ? 'partial files removed' : 'partial files NOT all removed'];
  if (resumed) parts.push('VM resumed');
  return new NasbackupError(err.code, `${head}: ${parts.join(', ')}`, { details: err.details, cause: e });
}
