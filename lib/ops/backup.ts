// -o backup: the checked arguments it takes (lib/cli/validate.ts builds them), the VM's
// state, and the pieces both backup paths share: the work folder that becomes the backup only when
// it is complete, and byte sizes computed with stat (never from `ls` columns).
import { lstat, mkdir, readdir, rename, rm, open } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { NasbackupError } from '../errors.js';
import { describeFailure, succeeded } from '../exec.js';
import { ensureWithin, exists } from '../paths.js';
import { parseList, type VirshClient } from '../clients/virsh.js';
import type { AgentProfile } from '../protocol.js';
import type { NasTarget } from '../nas/session.js';
import type { BackupResult } from '../output.js';
import type { OpContext } from './context.js';

export type BackupMode = 'legacy' | 'full' | 'incremental';

export interface BackupArgs {
  nas: NasTarget;
  vm: string;
  /** Mount-relative `<instance>/<timestamp>`. */
  path: string;
  /** Its first component: the VM lock. */
  instance: string;
  quiesce: boolean;
  /** Source disks of a stopped VM (-d); empty for a running VM. */
  diskPaths: string[];
  mode: BackupMode;
  bitmapNew: string | null;
  bitmapParent: string | null;
  parentPaths: string[];
  profile: AgentProfile;
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

  static async create(mountPoint: string, relPath: string): Promise<WorkDir> {
    const final = await ensureWithin(mountPoint, relPath, { what: '-p', minDepth: 2 });
    const w = new WorkDir(final, `${final}.partial`);
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
    } catch (e) {
      throw new NasbackupError('NAS_WRITE_FAILED', `Failed to create backup directory ${final}`, { details: (e as Error).message });
    }
    w.created = true;
    return w;
  }

  file(name: string): string {
    return join(this.path, name);
  }

  /** Make it the backup: flush, rename into place, flush the rename. */
  async commit(): Promise<void> {
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

export async function backupOperation(ctx: OpContext, args: BackupArgs): Promise<BackupResult> {
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
      return runningBackup(ctx, args, virsh, state.kind === 'paused');
    }
    case 'absent': {
      if (args.diskPaths.length === 0) {
        throw new NasbackupError('NO_DISKS', `VM ${args.vm} is not running and no disk paths (-d) were given; nothing to back up`);
      }
      const { stoppedBackup } = await import('./backup-stopped.js');
      return stoppedBackup(ctx, args);
    }
    case 'other':
      throw new NasbackupError('VM_STATE_UNSUPPORTED', `VM ${args.vm} is ${state.state}; back it up when it is running or stopped`);
  }
}
