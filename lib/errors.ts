// One error class with a stable `code`; the exit code comes from one table.
// The agent only reads stdout and the exit code, so `message` is what an operator
// sees in CloudStack; `details` carries tool output (qemu-img/virsh/mount stderr)
// that the original script lost on stderr.

import { EXIT_CLEANUP_FAILED, EXIT_FAILURE, EXIT_OK } from '../compat/protocol.js';

export { EXIT_CLEANUP_FAILED, EXIT_FAILURE, EXIT_OK };

export const ERROR_CODES = {
  // command line
  USAGE: EXIT_FAILURE, // -h/--help: usage on stdout, exit 1 like the original
  INVALID_OPTION: EXIT_FAILURE,
  MISSING_OPTION_VALUE: EXIT_FAILURE,
  UNKNOWN_OPERATION: EXIT_FAILURE,
  MISSING_ARGUMENT: EXIT_FAILURE,
  INVALID_ARGUMENT: EXIT_FAILURE,
  ARGV_NOT_UTF8: EXIT_FAILURE,
  UNSUPPORTED_OPTION: EXIT_FAILURE,
  INVALID_SETTING: EXIT_FAILURE, // an environment setting (NASBACKUP_*) that is set but unusable
  NOT_CONFIRMED: EXIT_FAILURE, // an operator declined (or could not answer) a confirmation: nothing changed
  // host sanity
  LIBVIRT_UNAVAILABLE: EXIT_FAILURE,
  VERSION_UNPARSEABLE: EXIT_FAILURE,
  VERSION_UNSUPPORTED: EXIT_FAILURE,
  // NAS session
  NAS_MOUNT_FAILED: EXIT_FAILURE,
  NAS_MOUNT_TIMEOUT: EXIT_FAILURE,
  NAS_CLEANUP_FAILED: EXIT_CLEANUP_FAILED,
  NAS_UNRESPONSIVE: EXIT_FAILURE,
  LOCKED: EXIT_FAILURE,
  LOCK_FAILED: EXIT_FAILURE,
  // path safety
  PATH_EMPTY: EXIT_FAILURE,
  PATH_ABSOLUTE: EXIT_FAILURE,
  PATH_TRAVERSAL: EXIT_FAILURE,
  PATH_INVALID: EXIT_FAILURE,
  PATH_OUTSIDE_MOUNT: EXIT_FAILURE,
  PATH_TOO_SHALLOW: EXIT_FAILURE,
  PATH_TOO_LONG: EXIT_FAILURE,
  TMPDIR_UNUSABLE: EXIT_FAILURE,
  // images and chains
  FILE_NOT_FOUND: EXIT_FAILURE,
  NOT_QCOW2: EXIT_FAILURE,
  CHAIN_BROKEN: EXIT_FAILURE,
  CHAIN_UNSAFE: EXIT_FAILURE, // a layer outside the VM folder, not a regular file, a loop, an external data file
  CHAIN_CORRUPT: EXIT_FAILURE, // a layer marked corrupt or with tables/entries past its end
  QEMU_IMG_FAILED: EXIT_FAILURE,
  CHAIN_INVALID: EXIT_FAILURE,
  CHAIN_REFUSED: EXIT_FAILURE,
  CHAIN_WOULD_ORPHAN: EXIT_FAILURE, // plan-delete: the provider's plan would orphan a backup
  NATIVE_REBASE_FAILED: EXIT_FAILURE,
  // backup
  VM_STATE_UNSUPPORTED: EXIT_FAILURE,
  NO_DISKS: EXIT_FAILURE,
  VOLUME_ID_UNKNOWN: EXIT_FAILURE, // a /dev/drbdNNNN disk that no LINSTOR udev link names: no volume uuid for its file
  BACKUP_EXISTS: EXIT_FAILURE,
  NAS_WRITE_FAILED: EXIT_FAILURE,
  BACKUP_VERIFY_FAILED: EXIT_FAILURE, // --verify: the backup just written failed its checks; it was removed
  NAS_READ_ONLY: EXIT_FAILURE,
  NAS_FULL: EXIT_FAILURE,
  NAS_SPACE_SHORT: EXIT_FAILURE, // the free-space check: the backup's estimate (with the margin) exceeds the NAS's free space; nothing written
  IO_ERROR: EXIT_FAILURE,
  VIRSH_FAILED: EXIT_FAILURE,
  CHECKPOINT_FAILED: EXIT_FAILURE,
  QUIESCE_FAILED: EXIT_FAILURE,
  THAW_FAILED: EXIT_FAILURE,
  BACKUP_BEGIN_FAILED: EXIT_FAILURE,
  BACKUP_JOB_FAILED: EXIT_FAILURE,
  BACKUP_JOB_TIMEOUT: EXIT_FAILURE,
  CONVERT_FAILED: EXIT_FAILURE,
  // operations
  DELETE_FAILED: EXIT_FAILURE,
  STATS_FAILED: EXIT_FAILURE,
  // restore (operators only)
  BACKUP_NOT_FOUND: EXIT_FAILURE, // no such <instance>/<timestamp> on the NAS
  DISK_NOT_FOUND: EXIT_FAILURE, // the backup has no file for that volume id
  RESTORE_TARGET_EXISTS: EXIT_FAILURE, // --to exists and --force was not given: nothing written
  RESTORE_TARGET_INVALID: EXIT_FAILURE, // --to inside the NAS, its folder missing, not a file/device, a device too small
  BACKUP_DAMAGED: EXIT_FAILURE, // restore: a layer does not match its backup's manifest (digest per extent, size, backing) or the manifest is unusable
  COMMAND_FAILED: EXIT_FAILURE,
  COMMAND_TIMEOUT: EXIT_FAILURE,
  INTERRUPTED: EXIT_FAILURE,
  INTERNAL: EXIT_FAILURE,
  // mount/umount (file-level access; operators only)
  TOOL_MISSING: EXIT_FAILURE, // a program the command needs is not installed (the message names the Debian package)
  MOUNT_DIR_UNUSABLE: EXIT_FAILURE, // the mount folder is not an empty folder (or is mounted already)
  NOT_OUR_MOUNT: EXIT_FAILURE, // umount of a folder `nasbackup mount` did not set up
  MOUNT_FAILED: EXIT_FAILURE, // a step of exposing the backup failed (all undone)
  MOUNT_CLEANUP_FAILED: EXIT_CLEANUP_FAILED, // something could not be undone (left recorded for a retry)
  // install-agent-hook (operators only; a refusal changes nothing)
  NODE_MISSING: EXIT_FAILURE,
  NODE_TOO_OLD: EXIT_FAILURE,
  INSTALL_TARGET_MISSING: EXIT_FAILURE,
  INSTALL_CONFLICT: EXIT_FAILURE,
  INSTALL_FAILED: EXIT_FAILURE,
} as const satisfies Record<string, number>;

export type ErrorCode = keyof typeof ERROR_CODES;

export function exitCodeFor(code: ErrorCode): number {
  return ERROR_CODES[code];
}

/**
 * The one exit code of a run that failed in several ways (the operation, then cleanup):
 * a mount left behind (exit 20) outranks everything, since the agent must then clean up;
 * otherwise the first failure's code.
 */
export function exitCodeOf(errors: readonly NasbackupError[]): number {
  if (errors.some((e) => e.exitCode === EXIT_CLEANUP_FAILED)) return EXIT_CLEANUP_FAILED;
  return errors.find((e) => e.exitCode !== EXIT_OK)?.exitCode ?? EXIT_OK;
}

/** Things an operator should know that did not fail the run; stable codes like the errors'. */
export const WARNING_CODES = [
  'QUIESCE_SKIPPED', // -q true on a paused VM: its disks are already quiet
  'QUIESCE_UNAVAILABLE', // -q true but the guest could not be frozen: the backup is crash-consistent
  'IMAGE_DIRTY', // a layer's dirty bit: not closed cleanly, refcounts may be stale
  'METADATA_NOT_CHECKED', // a valid feature our reader does not scan (encryption, …)
  'CHECK_SKIPPED', // chain verify: no qemu-img check on a chain our reader rejected
  'LEAKED_CLUSTERS', // qemu-img check: leaked clusters (space only)
  'UNFINISHED_BACKUP', // a `.partial` folder of an interrupted run
  'NOT_LOCKED', // restore from a read-only NAS: read without the VM lock (nothing can change the chain through this mount)
  'NO_MANIFEST', // chain verify: a backup without manifest.json (older than manifests): structural checks only
  'CLEANUP_INCOMPLETE', // merged/newest agents: the NAS could not be unmounted after a complete backup (#13424): not a failure
] as const;
export type WarningCode = (typeof WARNING_CODES)[number];

export interface Warning {
  code: WarningCode;
  message: string;
}

export interface NasbackupErrorOptions {
  /** Extra lines for stdout after the message (e.g. a tool's stderr). */
  details?: string;
  cause?: unknown;
  /** What the operation had found or done before it failed (a report, a plan, removed files): rendered before the error. */
  result?: unknown;
}

export class NasbackupError extends Error {
  readonly code: ErrorCode;
  readonly details: string;
  readonly result: unknown;

  constructor(code: ErrorCode, message: string, opts: NasbackupErrorOptions = {}) {
    super(message, opts.cause === undefined ? undefined : { cause: opts.cause });
    this.name = 'NasbackupError';
    this.code = code;
    this.details = opts.details?.trimEnd() ?? '';
    this.result = opts.result;
  }

  get exitCode(): number {
    return exitCodeFor(this.code);
  }

  /** Text for the agent: message line, then the tool output that explains it. */
  toText(): string {
    return this.details ? `${this.message}\n${this.details}\n` : `${this.message}\n`;
  }

  toJSON(): { code: ErrorCode; message: string; details?: string; exitCode: number } {
    return {
      code: this.code,
      message: this.message,
      ...(this.details ? { details: this.details } : {}),
      exitCode: this.exitCode,
    };
  }
}

/** The same failure, carrying what the operation had done before it (rendered before the error). */
export function withResult(e: unknown, result: unknown): NasbackupError {
  const err = toNasbackupError(e);
  return new NasbackupError(err.code, err.message, { details: err.details, cause: err.cause ?? err, result });
}

export function isNasbackupError(e: unknown): e is NasbackupError {
  return e instanceof NasbackupError;
}

/** System errors a failing NAS or disk produces: a code of their own, not "Internal error". */
const ERRNO_CODES: Readonly<Record<string, [ErrorCode, string]>> = {
  EROFS: ['NAS_READ_ONLY', 'The file system is read-only'],
  ENOSPC: ['NAS_FULL', 'No space left on the device'],
  EDQUOT: ['NAS_FULL', 'Disk quota exceeded'],
  EIO: ['IO_ERROR', 'I/O error'],
  ENAMETOOLONG: ['PATH_TOO_LONG', 'A file name or path is too long'],
};

/** Wrap anything thrown into a NasbackupError so the CLI has one shape to render. */
export function toNasbackupError(e: unknown): NasbackupError {
  if (e instanceof NasbackupError) return e;
  const msg = e instanceof Error ? e.message : String(e);
  const errno = ERRNO_CODES[(e as NodeJS.ErrnoException | null)?.code ?? ''];
  if (errno) return new NasbackupError(errno[0], `${errno[1]}: ${msg}`, { cause: e });
  return new NasbackupError('INTERNAL', `Internal error: ${msg}`, { cause: e });
}
