// -o backup: argument checks (all before any side effect), the VM's state, and the
// pieces both backup paths share: the work folder that becomes the backup only when
// it is complete, and byte sizes computed with stat (never from `ls` columns).
import { lstat, mkdir, readdir, rename, rm, open, unlink, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { NasbackupError } from '../errors.js';
import { describeFailure, succeeded } from '../exec.js';
import { ensureWithin, exists, parseRelativePath } from '../paths.js';
import { parseList, type VirshClient } from '../clients/virsh.js';
import type { AgentProfile } from '../agent-output.js';
import type { CliArgs } from '../cli/args.js';
import type { NasTarget } from '../nas/session.js';
import { ownerInfo, readOwner, staleReason } from '../nas/lock.js';
import type { OpContext } from './context.js';

export type BackupMode = 'legacy' | 'full' | 'incremental';

export interface BackupArgs {
  nas: NasTarget;
  vm: string;
  /** Mount-relative `<instance>/<timestamp>`. */
  path: string;
  quiesce: boolean;
  /** Source disks of a stopped VM (-d); empty for a running VM. */
  diskPaths: string[];
  mode: BackupMode;
  bitmapNew: string | null;
  bitmapParent: string | null;
  parentPaths: string[];
  profile: AgentProfile;
}

/** The backup flags as parsed from the command line. */
export type RawBackupArgs = Pick<CliArgs, 'vm' | 'path' | 'quiesce' | 'diskpaths' | 'mode' | 'bitmapNew' | 'bitmapParent' | 'parentPaths'>;

// Checkpoint/bitmap names go into libvirt XML, qemu-img argv and qcow2 headers.
const NAME = /^[A-Za-z0-9][A-Za-z0-9._:+-]{0,254}$/;

function checkName(v: string, what: string): string {
  if (!NAME.test(v)) throw new NasbackupError('INVALID_ARGUMENT', `Invalid ${what}: ${JSON.stringify(v)}`);
  return v;
}

/**
 * Everything about -o backup that can be checked without touching anything. Refused
 * on every path: a missing -v/-p, a bad name or path, an unknown mode, full without
 * --bitmap-new. The incremental arguments are only needed by a running VM (a stopped
 * one falls back to a full copy, as the original did, whatever parents were sent), so
 * they are checked here only with `-d ""`, where the running path is the only one that
 * can succeed; with -d they are checked once the VM is found running (checkIncrementalArgs).
 */
export function validateBackupArgs(a: RawBackupArgs, nas: NasTarget, profile: AgentProfile): BackupArgs {
  if (!a.vm) throw new NasbackupError('MISSING_ARGUMENT', 'backup requires -v <domain name>');
  if (a.path === undefined) throw new NasbackupError('MISSING_ARGUMENT', 'backup requires -p <backup path>');
  parseRelativePath(a.path, { what: '-p', minDepth: 2 });
  const raw = a.mode ?? '';
  let mode: BackupMode;
  if (raw === '' || raw === 'legacy-full') mode = 'legacy';
  else if (raw === 'full' || raw === 'incremental') mode = raw;
  else throw new NasbackupError('INVALID_ARGUMENT', `Unknown mode: ${raw}`);
  const bitmapNew = a.bitmapNew ? checkName(a.bitmapNew, '--bitmap-new') : null;
  const bitmapParent = a.bitmapParent ? checkName(a.bitmapParent, '--bitmap-parent') : null;
  const parentPaths = (a.parentPaths ?? '').split(',').filter((p) => p !== '');
  if (mode === 'full' && !bitmapNew) {
    throw new NasbackupError('MISSING_ARGUMENT', 'full mode requires --bitmap-new (the bitmap to create for the next incremental)');
  }
  for (const p of parentPaths) parseRelativePath(p, { what: '--parent-paths', minDepth: 3 });
  const diskPaths = (a.diskpaths ?? '').split(',').filter((d) => d !== '');
  for (const d of diskPaths) {
    if (!d.startsWith('/') && !d.startsWith('rbd:')) {
      throw new NasbackupError('INVALID_ARGUMENT', `Disk path must be absolute or an rbd: URI: ${d}`);
    }
  }
  const args: BackupArgs = {
    nas,
    vm: a.vm,
    path: a.path,
    quiesce: a.quiesce === 'true',
    diskPaths,
    mode,
    bitmapNew: mode === 'legacy' ? null : bitmapNew,
    bitmapParent: mode === 'incremental' ? bitmapParent : null,
    parentPaths: mode === 'incremental' ? parentPaths : [],
    profile,
  };
  if (diskPaths.length === 0) checkIncrementalArgs(args);
  return args;
}

/** What an incremental of a running VM needs: both bitmaps (distinct) and the parents. */
export function checkIncrementalArgs(a: BackupArgs): void {
  if (a.mode !== 'incremental') return;
  if (!a.bitmapNew || !a.bitmapParent || a.parentPaths.length === 0) {
    throw new NasbackupError('MISSING_ARGUMENT', 'incremental mode requires --bitmap-parent, --bitmap-new, and --parent-paths');
  }
  if (a.bitmapNew === a.bitmapParent) {
    throw new NasbackupError('INVALID_ARGUMENT', '--bitmap-new and --bitmap-parent must differ');
  }
}

export type VmState = { kind: 'running' } | { kind: 'paused' } | { kind: 'absent' } | { kind: 'other'; state: string };

/** Running or not, from `virsh -c qemu:///system list` (active domains only), as the original decides. */
export async function vmState(virsh: VirshClient, vm: string): Promise<VmState> {
  const r = await virsh.list();
  if (!succeeded(r)) {
    throw new NasbackupError('LIBVIRT_UNAVAILABLE', `Cannot list domains (${describeFailure(r)})`, { details: r.stderr || r.stdout });
  }
  const row = parseList(r.stdout).find((d) => d.name === vm);
  if (!row) return { kind: 'absent' };
  if (row.state === 'running') return { kind: 'running' };
  if (row.state === 'paused') return { kind: 'paused' };
  return { kind: 'other', state: row.state };
}

/**
 * The backup is written into `<timestamp>.partial` and renamed into place only when it
 * is complete, so an interrupted run never leaves something that looks finished.
 */
export class WorkDir {
  private created = false;
  private done = false;

  private constructor(
    readonly final: string,
    readonly path: string,
  ) {}

  /**
   * Call with the VM's lock held: unfinished folders that a dead run of this VM left
   * (its owner marker proves it) are removed first.
   */
  static async create(mountPoint: string, relPath: string, sweep?: { staleAfterMs: number; log: (m: string) => void }): Promise<WorkDir> {
    const final = await ensureWithin(mountPoint, relPath, { what: '-p', minDepth: 2 });
    const w = new WorkDir(final, `${final}.partial`);
    if (sweep) await removeDeadPartials(dirname(final), sweep.staleAfterMs, sweep.log);
    for (const p of [final, w.path]) {
      if (await exists(p)) {
        throw new NasbackupError(
          'BACKUP_EXISTS',
          p === final
            ? `Backup directory already exists: ${final}; refusing to overwrite it`
            : `An unfinished backup from an interrupted run exists: ${w.path}; delete it first`,
        );
      }
    }
    try {
      await mkdir(dirname(final), { recursive: true, mode: 0o755 });
      await mkdir(w.path, { mode: 0o755 });
      w.created = true;
      await writeFile(join(w.path, OWNER_MARKER), JSON.stringify(await ownerInfo('backup')) + '\n');
    } catch (e) {
      await w.discard().catch(() => {});
      throw new NasbackupError('NAS_WRITE_FAILED', `Failed to create backup directory ${final}`, { details: (e as Error).message });
    }
    return w;
  }

  file(name: string): string {
    return join(this.path, name);
  }

  /** Make it the backup: flush, rename into place, flush the rename. */
  async commit(): Promise<void> {
    await unlink(join(this.path, OWNER_MARKER)).catch(() => {});
    for (const name of await readdir(this.path)) await fsyncPath(join(this.path, name));
    await fsyncPath(this.path);
    await rename(this.path, this.final);
    await fsyncPath(dirname(this.final));
    this.done = true;
  }

  /** Remove what this run wrote (only ever our own work folder). */
  async discard(): Promise<void> {
    if (this.created && !this.done) await rm(this.path, { recursive: true, force: true });
  }
}

/** Inside a work folder while it is written: who writes it (so a later run can tell it is dead). */
export const OWNER_MARKER = '.nasbackup-owner';

/** `*.partial` folders whose marker names a writer that is gone (never one without a marker). */
export async function removeDeadPartials(instanceDir: string, staleAfterMs: number, log: (m: string) => void): Promise<void> {
  const names = await readdir(instanceDir).catch(() => [] as string[]);
  for (const name of names) {
    if (!name.endsWith('.partial')) continue;
    const p = join(instanceDir, name);
    const st = await lstat(p).catch(() => null);
    if (!st?.isDirectory()) continue;
    const owner = await readOwner(join(p, OWNER_MARKER));
    if (!owner) continue;
    const why = await staleReason(owner.info, owner.ageMs, staleAfterMs);
    if (why === null) continue;
    log(
      `Removing ${p}, the unfinished backup of a dead run (${owner.info.operation} by pid ${owner.info.pid} on ${owner.info.host}): ${why}`,
    );
    await rm(p, { recursive: true, force: true });
  }
}

async function fsyncPath(p: string): Promise<void> {
  const fh = await open(p, 'r').catch(() => null);
  if (!fh) return;
  try {
    await fh.sync();
  } catch {
    // Some filesystems refuse fsync on directories; the data files were synced.
  } finally {
    await fh.close();
  }
}

/** `du -sb` of a folder: the sizes of the folder itself and everything below it. */
export async function apparentSize(path: string): Promise<bigint> {
  const st = await lstat(path, { bigint: true });
  let total = st.size;
  if (st.isDirectory()) for (const name of await readdir(path)) total += await apparentSize(join(path, name));
  return total;
}

export async function backupOperation(ctx: OpContext, args: BackupArgs): Promise<void> {
  const { VirshClient: Virsh } = await import('../clients/virsh.js');
  const virsh = new Virsh(ctx.runner, ctx.config.virshBinary, ctx.config.commandTimeoutMs);
  const state = await vmState(virsh, args.vm);
  ctx.logger.log(`Backup of ${args.vm}: state ${state.kind === 'other' ? state.state : state.kind}, mode ${args.mode}`);
  switch (state.kind) {
    case 'running':
    case 'paused': {
      // With -d the agent thought the VM stopped; running, it needs what an incremental needs.
      checkIncrementalArgs(args);
      const { runningBackup } = await import('./backup-running.js');
      await runningBackup(ctx, args, virsh, state.kind === 'paused');
      return;
    }
    case 'absent': {
      if (args.diskPaths.length === 0) {
        throw new NasbackupError('NO_DISKS', `VM ${args.vm} is not running and no disk paths (-d) were given; nothing to back up`);
      }
      const { stoppedBackup } = await import('./backup-stopped.js');
      await stoppedBackup(ctx, args);
      return;
    }
    case 'other':
      throw new NasbackupError('VM_STATE_UNSUPPORTED', `VM ${args.vm} is ${state.state}; back it up when it is running or stopped`);
  }
}
