// -o backup: the checked arguments it takes (lib/cli/validate.ts builds them), the VM's
// state, and the choice between the running (running.ts) and the stopped (stopped.ts)
// path; the work folder both share is in workdir.ts.
import { NasbackupError } from '../../errors.js';
import type { VirshClient } from '../../clients/virsh.js';
import type { BackupResult } from '../results.js';
import type { OpContext } from '../context.js';
import { checkIncrementalArgs, refuseCompressWhileRunning, type BackupArgs } from './args.js';

export { checkIncrementalArgs, parseBandwidth, refuseCompressWhileRunning, type BackupArgs, type BackupMode } from './args.js';

export type VmState = { kind: 'running' } | { kind: 'paused' } | { kind: 'absent' } | { kind: 'other'; state: string };

/** Running or not, from `virsh -c qemu:///system list` (active domains only), as the original decides. */
export async function vmState(virsh: VirshClient, vm: string): Promise<VmState> {
  const row = (await virsh.list()).find((d) => d.name === vm);
  if (!row) return { kind: 'absent' };
  if (row.state === 'running') return { kind: 'running' };
  if (row.state === 'paused') return { kind: 'paused' };
  return { kind: 'other', state: row.state };
}

export async function backupOperation(ctx: OpContext, args: BackupArgs): Promise<BackupResult> {
  const { virsh } = ctx.clients;
  const state = await vmState(virsh, args.vm);
  ctx.logger.log(`Backup of ${args.vm}: state ${state.kind === 'other' ? state.state : state.kind}, mode ${args.mode}`);
  switch (state.kind) {
    case 'running':
    case 'paused': {
      // With -d the agent thought the VM stopped; running, it needs what an incremental needs.
      checkIncrementalArgs(args);
      refuseCompressWhileRunning(args);
      const { runningBackup } = await import('./running.js');
      return runningBackup(ctx, args, virsh, state.kind === 'paused');
    }
    case 'absent': {
      if (args.diskPaths.length === 0) {
        throw new NasbackupError('NO_DISKS', `VM ${args.vm} is not running and no disk paths (-d) were given; nothing to back up`);
      }
      const { stoppedBackup } = await import('./stopped.js');
      return stoppedBackup(ctx, args);
    }
    case 'other':
      throw new NasbackupError('VM_STATE_UNSUPPORTED', `VM ${args.vm} is ${state.state}; back it up when it is running or stopped`);
  }
}
