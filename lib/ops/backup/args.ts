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
  /** -b: the copy rate limit in bytes per second (both paths), or null. */
  bandwidth: number | null;
  /** -c: compressed qcow2 clusters (stopped path only; refused on the running path). */
  compress: boolean;
  /** --verify: prove the backup before publishing it (verify.ts); a failure fails the backup. */
  verify?: boolean;
}

const MiB = 1024 * 1024;
/** Above this a "limit" limits nothing (1 TiB/s); also keeps the byte count exact. */
const MAX_BANDWIDTH_MIB = 1024 * 1024;

/**
 * -b/--bandwidth <MiB/s> (contract §4.1, #12898): a positive number of MiB per second,
 * fractions allowed; returned in bytes per second. Anything else is refused, not ignored.
 */
export function parseBandwidth(raw: string): number {
  const n = Number(raw);
  if (!/^\d+(\.\d+)?$/.test(raw) || !(n > 0) || n > MAX_BANDWIDTH_MIB || Math.round(n * MiB) < 1) {
    throw new NasbackupError(
      'INVALID_ARGUMENT',
      `Invalid -b/--bandwidth: ${JSON.stringify(raw)} (expected a positive number of MiB/s, at most ${MAX_BANDWIDTH_MIB})`,
    );
  }
  return Math.round(n * MiB);
}

/** The bytes-per-second figure as operators give it. */
export const formatBandwidth = (bytesPerSec: number): string => `${+(bytesPerSec / MiB).toFixed(3)} MiB/s`;

/**
 * -c on a running (or paused) VM: libvirt's push backup has QEMU write the target
 * itself, and QEMU's backup job writes plain clusters (a compressed qcow2 cluster
 * cannot be rewritten in place, which the job does); compressing afterwards would
 * copy every byte a second time, and an incremental would lose its thin chain.
 */
export const COMPRESS_RUNNING_REFUSAL =
  "Option -c/--compress is not supported by this nasbackup for a running VM: libvirt's push backup has QEMU write the backup file, and it cannot write compressed clusters (stopped-VM backups can be compressed)";

export function refuseCompressWhileRunning(a: BackupArgs): void {
  if (a.compress) throw new NasbackupError('UNSUPPORTED_OPTION', COMPRESS_RUNNING_REFUSAL);
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
