// One error class with a stable `code`; the exit code comes from one table.
// The agent only reads stdout and the exit code, so `message` is what an operator
// sees in CloudStack; `details` carries tool output (qemu-img/virsh/mount stderr)
// that the original script lost on stderr.

export const EXIT_OK = 0;
export const EXIT_FAILURE = 1;
/** The original's EXIT_CLEANUP_FAILED: the agent marks the backup as Error (needs cleanup). */
export const EXIT_CLEANUP_FAILED = 20;

export const ERROR_CODES = {
  // command line
  USAGE: EXIT_FAILURE, // -h/--help: usage on stdout, exit 1 like the original
  INVALID_OPTION: EXIT_FAILURE,
  MISSING_OPTION_VALUE: EXIT_FAILURE,
  UNKNOWN_OPERATION: EXIT_FAILURE,
  MISSING_ARGUMENT: EXIT_FAILURE,
  INVALID_ARGUMENT: EXIT_FAILURE,
  UNSUPPORTED_OPTION: EXIT_FAILURE,
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
  BACKUP_EXISTS: EXIT_FAILURE,
  NAS_WRITE_FAILED: EXIT_FAILURE,
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
  COMMAND_FAILED: EXIT_FAILURE,
  COMMAND_TIMEOUT: EXIT_FAILURE,
  INTERRUPTED: EXIT_FAILURE,
  INTERNAL: EXIT_FAILURE,
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

export interface NasbackupErrorOptions {
  /** Extra lines for stdout after the message (e.g. a tool's stderr). */
  details?: string;
  cause?: unknown;
  /** JSON output already carries this outcome (a report or plan): do not print it again. */
  reported?: boolean;
}

export class NasbackupError extends Error {
  readonly code: ErrorCode;
  readonly details: string;
  readonly reported: boolean;

  constructor(code: ErrorCode, message: string, opts: NasbackupErrorOptions = {}) {
    super(message, opts.cause === undefined ? undefined : { cause: opts.cause });
    this.name = 'NasbackupError';
    this.code = code;
    this.details = opts.details?.trimEnd() ?? '';
    this.reported = opts.reported ?? false;
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

export function isNasbackupError(e: unknown): e is NasbackupError {
  return e instanceof NasbackupError;
}

/** Wrap anything thrown into a NasbackupError so the CLI has one shape to render. */
export function toNasbackupError(e: unknown): NasbackupError {
  if (e instanceof NasbackupError) return e;
  const msg = e instanceof Error ? e.message : String(e);
  return new NasbackupError('INTERNAL', `Internal error: ${msg}`, { cause: e });
}
