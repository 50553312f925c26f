// Backup of a running (or paused) VM: libvirt push backup, with a checkpoint when the
// agent asks for one, incrementals that stay correct after a VM restart, a guest
// frozen only for the instant of backup-begin, and a clean undo on every failure.
import { stat, unlink, writeFile } from 'node:fs/promises';
import { join, relative } from 'node:path';
import { runningBackupText, stoppedBackupText, type BackupReport } from '../agent-output.js';
import { NasbackupError } from '../errors.js';
import { describeFailure, failureText, succeeded, type RunResult } from '../exec.js';
import { ensureWithin, exists, parseRelativePath } from '../paths.js';
import { readChain, readHeader } from '../qcow2/index.js';
import { chainRefusal, inspectChain } from '../chain/safety.js';
import { QemuImgClient } from '../clients/qemu-img.js';
import { parseDomblklistDetails, parseJobInfo, parseQueryBlock, type VirshClient } from '../clients/virsh.js';
import { backupFileName, matchParents, volumeId } from '../backup/disks.js';
import { waitForBackupJob } from '../backup/job.js';
import { createProgress } from '../backup/progress.js';
import { backupXml, checkpointXml, redefineCheckpointXml } from '../backup/xml.js';
import { apparentSize, WorkDir, type BackupArgs } from './backup.js';
import { syncAfter, type OpContext } from './context.js';

interface Disk {
  target: string;
  source: string;
  volId: string;
  file: string;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function virshError(code: 'VIRSH_FAILED', what: string, r: RunResult): NasbackupError {
  return new NasbackupError(code, `${what} failed (${describeFailure(r)})`, { details: failureText(r) });
}

async function listDisks(virsh: VirshClient, vm: string): Promise<Disk[]> {
  const r = await virsh.domblklistDetails(vm);
  if (!succeeded(r)) throw virshError('VIRSH_FAILED', `virsh domblklist ${vm}`, r);
  const rows = parseDomblklistDetails(r.stdout).filter((d) => d.device === 'disk' && d.source !== '-');
  if (rows.length === 0) throw new NasbackupError('NO_DISKS', `VM ${vm} has no disks to back up`);
  const disks = rows.map((d, i) => {
    const volId = volumeId(d.source);
    return { target: d.target, source: d.source, volId, file: backupFileName(i, volId) };
  });
  const seen = new Set<string>();
  for (const d of disks) {
    if (seen.has(d.volId)) throw new NasbackupError('INVALID_ARGUMENT', `Two disks of ${vm} share the volume id ${d.volId}; their backup files would collide`);
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
  const list = await virsh.checkpointList(a.vm);
  if (!succeeded(list)) throw virshError('VIRSH_FAILED', `virsh checkpoint-list ${a.vm}`, list);
  const names = list.stdout.split('\n').map((l) => l.trim()).filter(Boolean);
  if (names.includes(newCheckpoint) && newCheckpoint !== a.bitmapParent) {
    // Left by an earlier attempt of this same backup: it is ours to replace.
    ctx.logger.log(`Removing stale checkpoint ${newCheckpoint} of ${a.vm} left by an earlier attempt`);
    const d = await virsh.checkpointDelete(a.vm, newCheckpoint);
    if (!succeeded(d)) throw virshError('VIRSH_FAILED', `virsh checkpoint-delete ${a.vm} ${newCheckpoint}`, d);
  }
  if (a.mode === 'full') return { incrementalFrom: null, newCheckpoint, parents: [], fallbackReason: null };

  const parent = a.bitmapParent!;
  const parents = await matchParents(disks, a.parentPaths, async (rel) =>
    exists(await ensureWithin(mount, rel, { what: '--parent-paths', minDepth: 3 }), { follow: true }),
  );
  for (const rel of parents) {
    const abs = await ensureWithin(mount, rel, { what: '--parent-paths', minDepth: 3 });
    if (!(await stat(abs).then((s) => s.isFile(), () => false))) {
      throw new NasbackupError('FILE_NOT_FOUND', `Parent backup file does not exist on NAS: ${abs}`);
    }
    await readHeader(abs).catch((e: Error) => {
      throw new NasbackupError('NOT_QCOW2', `Parent backup file is not a usable qcow2 image: ${abs}`, { details: e.message });
    });
    // The new file will hang below it: its chain must be safe and sound (the chain safety
    // check, before anything follows it) and whole before backup-begin.
    const vmDir = parseRelativePath(rel, { what: '--parent-paths' })[0]!;
    const safety = await inspectChain(abs, join(mount, vmDir));
    if (safety.problem && safety.problem.kind !== 'broken') throw chainRefusal(safety.problem, `The chain of parent backup file ${abs}`, vmDir);
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
  const q = await virsh.queryBlock(a.vm);
  if (!succeeded(q)) return full(`cannot inspect the disks' bitmaps: ${failureText(q)}`);
  let entries;
  try {
    entries = parseQueryBlock(q.stdout);
  } catch (e) {
    return full(`cannot inspect the disks' bitmaps: ${(e as Error).message}`);
  }
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
  await writeFile(xml, redefineCheckpointXml(parent, epoch ? Number(epoch[1]) : Math.floor(Date.now() / 1000), disks.map((d) => d.target)));
  const r = await virsh.checkpointCreate(a.vm, xml, true);
  await unlink(xml).catch(() => {});
  if (!succeeded(r)) return full(`cannot register the existing checkpoint ${parent}: ${failureText(r)}`);
  ctx.logger.log(`Registered existing checkpoint ${parent} of ${a.vm} (bitmap present on every disk)`);
  return { incrementalFrom: parent, newCheckpoint, parents, fallbackReason: null, dropParent: null };
}

/** Freeze through the guest agent. Returns null on success, or why it failed. */
async function freeze(virsh: VirshClient, vm: string, timeoutSec: number): Promise<string | null> {
  const r = await virsh.agentCommand(vm, '{"execute":"guest-fsfreeze-freeze"}', timeoutSec);
  return succeeded(r) ? null : failureText(r);
}

/** Thaw, retried: a guest must never stay frozen because of us. */
async function thaw(ctx: OpContext, virsh: VirshClient, vm: string): Promise<string | null> {
  let last = '';
  for (let attempt = 1; attempt <= 3; attempt++) {
    const r = await virsh.agentCommand(vm, '{"execute":"guest-fsfreeze-thaw"}', ctx.config.quiesceTimeoutSec, false);
    if (succeeded(r)) return null;
    last = failureText(r);
    ctx.logger.log(`Thaw of ${vm} failed (attempt ${attempt}/3): ${last}`);
    if (attempt < 3) await sleep(500 * attempt);
  }
  return last;
}

/** Abort the job and wait (bounded) until libvirt no longer runs it. */
async function abortJob(ctx: OpContext, virsh: VirshClient, vm: string): Promise<void> {
  const r = await virsh.jobAbort(vm);
  if (!succeeded(r)) ctx.logger.log(`domjobabort ${vm}: ${failureText(r)}`);
  for (let i = 0; i < 50; i++) {
    const j = await virsh.jobInfo(vm);
    const t = parseJobInfo(j.stdout).get('Job type');
    if (!succeeded(j) || (t !== 'Unbounded' && t !== 'Bounded')) return;
    await sleep(200);
  }
  ctx.logger.log(`Warning: the backup job of ${vm} was still running 10 s after domjobabort`);
}

export async function runningBackup(ctx: OpContext, a: BackupArgs, virsh: VirshClient, paused: boolean): Promise<void> {
  const qemuImg = new QemuImgClient(ctx.runner, ctx.config.qemuImgBinary, ctx.config.qemuImgTimeoutMs);
  const nas = await ctx.openNas(a.nas);
  const disks = await listDisks(virsh, a.vm);
  await ctx.lockVm(nas.mountPoint, parseRelativePath(a.path, { what: '-p' })[0]!, 'backup');
  const work = await WorkDir.create(nas.mountPoint, a.path, { staleAfterMs: ctx.config.lockStaleAfterMs, log: (m) => ctx.logger.log(m) });

  let jobStarted = false;
  let jobDone = false;
  let frozen = false;
  let createdCheckpoint: string | null = null;
  const warnings: string[] = [];
  const progress = await createProgress(process.stdout.isTTY === true);
  try {
    const p = await plan(ctx, virsh, a, disks, nas.mountPoint, work);
    const targets = disks.map((d) => ({ name: d.target, file: work.file(d.file) }));
    const bxml = work.file('backup.xml');
    const cxml = work.file('checkpoint.xml');
    await writeFile(bxml, backupXml(targets, p.incrementalFrom));
    if (p.newCheckpoint) await writeFile(cxml, checkpointXml(p.newCheckpoint, disks.map((d) => d.target)));
    ctx.checkpoint();

    // Discard stale completed-job statistics so the poll cannot mistake them for ours
    // (before any freeze: the guest stays frozen only for backup-begin itself).
    await virsh.jobInfoCompleted(a.vm);
    if (a.quiesce && paused) {
      warnings.push(`Quiesce skipped: VM ${a.vm} is paused, its disks are already quiet`);
    } else if (a.quiesce) {
      const why = await freeze(virsh, a.vm, ctx.config.quiesceTimeoutSec);
      if (why === null) frozen = true;
      else {
        // A freeze whose reply was lost (agent timeout) may still have frozen the guest.
        await virsh.agentCommand(a.vm, '{"execute":"guest-fsfreeze-thaw"}', ctx.config.quiesceTimeoutSec, false);
        if (ctx.config.quiesceRequired) throw new NasbackupError('QUIESCE_FAILED', `Failed to freeze the filesystems of vm ${a.vm}`, { details: why });
        warnings.push(`Quiesce failed, backup is crash-consistent: ${why.split('\n')[0]}`);
      }
    }
    let begin: RunResult | undefined;
    let thawError: string | null = null;
    try {
      begin = await virsh.backupBegin(a.vm, bxml, p.newCheckpoint ? cxml : null);
    } finally {
      if (frozen) {
        thawError = await thaw(ctx, virsh, a.vm);
        if (thawError === null) frozen = false;
      }
    }
    if (succeeded(begin)) {
      jobStarted = true;
      createdCheckpoint = p.newCheckpoint;
    }
    if (thawError !== null) throw new NasbackupError('THAW_FAILED', `Failed to thaw the filesystem for vm ${a.vm}: ${thawError}`);
    if (!succeeded(begin)) {
      throw new NasbackupError('BACKUP_BEGIN_FAILED', `Failed to start the backup of ${a.vm}`, { details: begin ? failureText(begin) : 'no result' });
    }

    // What restore needs besides the disks.
    const side: Array<[string, (vm: string) => Promise<RunResult>]> = [
      ['domain-config.xml', (vm) => virsh.dumpxml(vm)],
      ['dominfo.xml', (vm) => virsh.dominfo(vm)],
      ['domiflist.xml', (vm) => virsh.domiflist(vm)],
      ['domblklist.xml', (vm) => virsh.domblklist(vm)],
    ];
    for (const [name, call] of side) {
      const r = await call(a.vm);
      if (!succeeded(r)) throw virshError('VIRSH_FAILED', `virsh ${name}`, r);
      await writeFile(work.file(name), r.stdout, { mode: 0o644 });
    }

    const block = await waitForBackupJob(virsh, a.vm, {
      deadlineMs: ctx.config.jobTimeoutMs,
      initialIntervalMs: ctx.config.jobPollInitialMs,
      maxIntervalMs: ctx.config.jobPollMaxMs,
      checkpoint: ctx.checkpoint,
      onProgress: (done, total) => progress.update(done, total),
    });
    jobDone = true;
    progress.stop();

    // Relink each incremental onto its parent backup: libvirt wrote the live disk there.
    for (const [i, d] of disks.entries()) {
      if (!p.incrementalFrom) break;
      const file = work.file(d.file);
      const parentAbs = await ensureWithin(nas.mountPoint, p.parents[i]!, { what: '--parent-paths', minDepth: 3 });
      const name = relative(work.final, parentAbs);
      const r = await qemuImg.rebase({ file, backing: name, backingFormat: 'qcow2', unsafe: true });
      if (!succeeded(r)) {
        throw new NasbackupError('QEMU_IMG_FAILED', `qemu-img rebase failed for ${file} onto ${name}`, { details: failureText(r) });
      }
    }
    for (const f of [bxml, cxml]) await unlink(f).catch(() => {});
    await syncAfter(ctx, 'backup');
    // Every new file must read as a chain ending in a full backup on the NAS, checked
    // before the commit (the work folder is a sibling of the final one, so relative
    // backing names resolve the same): a failed run never leaves a finished-looking backup.
    for (const d of disks) {
      await readChain(work.file(d.file)).catch((e: Error) => {
        throw new NasbackupError('CHAIN_BROKEN', `Backup file ${work.file(d.file)} does not read as a complete chain`, { details: e.message });
      });
    }
    ctx.checkpoint();
    await work.commit();
    if (p.incrementalFrom) {
      // The parent checkpoint is no longer needed: the next incremental starts from the new one.
      const r = await virsh.checkpointDelete(a.vm, p.incrementalFrom);
      if (!succeeded(r)) ctx.logger.log(`Warning: could not remove checkpoint ${p.incrementalFrom}: ${failureText(r)}`);
    }
    if (p.dropParent) {
      // Treated as missing: the new checkpoint replaces it, nothing may base on it again.
      const r = await virsh.checkpointDelete(a.vm, p.dropParent);
      if (succeeded(r)) ctx.logger.log(`Removed checkpoint ${p.dropParent} of ${a.vm}: its bitmap cannot be trusted`);
      else ctx.logger.log(`Warning: could not remove the untrusted checkpoint ${p.dropParent}: ${failureText(r)}`);
    }

    const final = await virsh.jobInfoCompleted(a.vm);
    const jobBlock = succeeded(final) && parseJobInfo(final.stdout).get('Job type') === 'Completed' ? final.stdout : block;
    const report: BackupReport = {
      profile: a.profile,
      fallbackReason: p.fallbackReason,
      bitmapCreated: p.newCheckpoint,
      warnings,
      totalBytes: await apparentSize(work.final),
    };
    for (const w of warnings) ctx.logger.log(`Warning: ${w}`);
    if (a.diskPaths.length > 0) {
      // The agent chose the stopped-VM format (-d given): one integer per line.
    const sizes = await Promise.all(disks.map(async (d) => ({ name: d.file, size: (await stat(`${work.final}/${d.file}`, { bigint: true })).size })));
      ctx.out.write(stoppedBackupText(report, sizes));
    } else {
      ctx.out.write(runningBackupText(report, jobBlock));
    }
    ctx.logger.log(`Backup of ${a.vm} to ${work.final} completed (${report.totalBytes} bytes)`);
  } catch (e) {
    progress.stop();
    if (frozen) await thaw(ctx, virsh, a.vm);
    // A job libvirt reported as failed (or gone) has nothing left to abort.
    const jobEnded = e instanceof NasbackupError && e.code === 'BACKUP_JOB_FAILED';
    if (jobStarted && !jobDone && !jobEnded) await abortJob(ctx, virsh, a.vm);
    if (createdCheckpoint) {
      const r = await virsh.checkpointDelete(a.vm, createdCheckpoint);
      if (!succeeded(r)) ctx.logger.log(`Warning: could not remove checkpoint ${createdCheckpoint} of the failed backup: ${failureText(r)}`);
    }
    await work.discard().catch((err: Error) => ctx.logger.log(`Warning: could not remove ${work.path}: ${err.message}`));
    throw e;
  } finally {
    if (!paused) await resumeIfPaused(ctx, virsh, a.vm);
  }
}

/** A VM that was running before us is never left paused (e.g. by an I/O error on a full NAS). */
async function resumeIfPaused(ctx: OpContext, virsh: VirshClient, vm: string): Promise<void> {
  const r = await virsh.domstate(vm);
  if (succeeded(r) && r.stdout.trim().startsWith('paused')) {
    ctx.logger.log(`VM ${vm} is paused after the backup; resuming it`);
    const res = await virsh.resume(vm);
    if (!succeeded(res)) ctx.logger.log(`Warning: could not resume ${vm}: ${failureText(res)}`);
  }
}
