// The checked arguments of -o backup (lib/cli/validate.ts builds them once) and the one
// check that depends on the VM's state: the incremental arguments, needed only when it runs.
import { NasbackupError } from '../../errors.js';
import type { AgentProfile } from '../../../compat/protocol.js';
import type { NasTarget } from '../../nas/session.js';

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
  /** --verify: prove the backup before publishing it (verify.ts); a failure fails the backup. */
  verify?: boolean;
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
