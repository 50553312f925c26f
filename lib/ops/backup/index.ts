// -o backup: argument checks (all before any side effect), the VM's state, and the
// choice between the running (running.ts) and the stopped (stopped.ts) path; the work
// folder both share is in workdir.ts.
import { NasbackupError } from '../../errors.js';
import { parseRelativePath } from '../../paths.js';
import type { VirshClient } from '../../clients/virsh.js';
import type { AgentProfile } from '../../agent-output.js';
import type { CliArgs } from '../../cli/args.js';
import type { NasTarget } from '../../nas/session.js';
import type { OpContext } from '../context.js';

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
  const row = (await virsh.list()).find((d) => d.name === vm);
  if (!row) return { kind: 'absent' };
  if (row.state === 'running') return { kind: 'running' };
  if (row.state === 'paused') return { kind: 'paused' };
  return { kind: 'other', state: row.state };
}

export async function backupOperation(ctx: OpContext, args: BackupArgs): Promise<void> {
  const { virsh } = ctx.clients;
  const state = await vmState(virsh, args.vm);
  ctx.logger.log(`Backup of ${args.vm}: state ${state.kind === 'other' ? state.state : state.kind}, mode ${args.mode}`);
  switch (state.kind) {
    case 'running':
    case 'paused': {
      // With -d the agent thought the VM stopped; running, it needs what an incremental needs.
      checkIncrementalArgs(args);
      const { runningBackup } = await import('./running.js');
      await runningBackup(ctx, args, virsh, state.kind === 'paused');
      return;
    }
    case 'absent': {
      if (args.diskPaths.length === 0) {
        throw new NasbackupError('NO_DISKS', `VM ${args.vm} is not running and no disk paths (-d) were given; nothing to back up`);
      }
      const { stoppedBackup } = await import('./stopped.js');
      await stoppedBackup(ctx, args);
      return;
    }
    case 'other':
      throw new NasbackupError('VM_STATE_UNSUPPORTED', `VM ${args.vm} is ${state.state}; back it up when it is running or stopped`);
  }
}
