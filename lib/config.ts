// Deadlines and knobs, all from the environment (the agent passes no config flags).
// Every wait in the program is bounded by one of these.
import { NasbackupError } from './errors.js';
import { logFileFromEnv } from './log.js';
import { DEFAULT_DIGEST_ALGORITHM, DIGEST_ALGORITHMS, type DigestAlgorithm } from './store/digest/index.js';
import { AGENT_PROFILES, DEFAULT_AGENT_PROFILE, PROFILE_ENV, type AgentProfile } from '../compat/protocol.js';

/** --engine / NASBACKUP_ENGINE: which engine does a safe rebase (lib/engine/select.ts). */
export const ENGINE_MODES = ['auto', 'native', 'qemu-img'] as const;
export type EngineMode = (typeof ENGINE_MODES)[number];

export interface Config {
  logFile: string;
  /** `mount` must finish within this; an unreachable NAS must not hang the agent. */
  mountTimeoutMs: number;
  /** One `umount` attempt. */
  umountTimeoutMs: number;
  /** Attempts for a busy unmount (CIFS "target is busy") before a lazy unmount. */
  umountAttempts: number;
  umountRetryDelayMs: number;
  /**
   * The NAS must answer a probe (statfs of the mount, in a child) within this; else the
   * operation is abandoned as NAS_UNRESPONSIVE (a hung NFS/CIFS/FUSE server).
   */
  nasTimeoutMs: number;
  /** How often the mounted NAS is probed. */
  nasProbeIntervalMs: number;
  /** Short host commands: virsh queries, df, sync. */
  commandTimeoutMs: number;
  /** Long qemu-img work (rebase, convert); default matches the agent's cmds.timeout. */
  qemuImgTimeoutMs: number;
  /** Which operations run the QEMU/libvirt version check: all (like the original), backup, off. */
  versionCheck: 'all' | 'backup' | 'off';
  /**
   * A fixed cap on a libvirt backup job, only when the operator sets one
   * (NASBACKUP_JOB_TIMEOUT); otherwise the deadline follows the data (see lib/ops/backup/deadline.ts).
   */
  jobTimeoutMs: number | null;
  /** The slowest copy rate still accepted (bytes/s): the data to move at this rate, plus the base, is the deadline. */
  jobMinRateBytesPerSec: number;
  /** Fixed part of a data-following deadline (setup, flush, the NAS's first writes). */
  jobBaseMs: number;
  /** The agent's own timeout for the command, when the operator tells it (it is not passed): no deadline goes past it. */
  agentTimeoutMs: number | null;
  /** How often a long copy logs a heartbeat (bytes done, rate, ETA). */
  heartbeatMs: number;
  /** Refuse a backup whose estimated size does not fit the NAS's free space. */
  spaceCheck: boolean;
  /** Margin on the estimate, percent. */
  spaceMarginPct: number;
  /** Job poll: first interval, growing by half per poll up to the max (ms). */
  jobPollInitialMs: number;
  jobPollMaxMs: number;
  /** Guest-agent freeze/thaw timeout, seconds (W4 agents pass --quiesce-timeout). */
  quiesceTimeoutSec: number;
  /** Fail the backup when -q true cannot freeze the guest (default: proceed crash-consistent, say so). */
  quiesceRequired: boolean;
  /** Per-VM lock: how long to wait for it, when another host's lock is stale, and the override. */
  lockWaitMs: number;
  lockStaleAfterMs: number;
  breakLock: boolean;
  virshBinary: string;
  qemuImgBinary: string;
  /** Rebase engine (`--engine` overrides NASBACKUP_ENGINE). */
  engine: EngineMode;
  /** Which agent generation reads our stdout: the `agent` command's choice, else NASBACKUP_AGENT_PROFILE. */
  agentProfile: AgentProfile;
  /** Measurement only (scripts/bench-manifest.ts): back up without a manifest, as before manifests existed. */
  benchSkipManifest: boolean;
  /** Worker threads hashing the manifest digests (null: the running path one per core, the stopped path none; 0: on the main thread). */
  hashWorkers: number | null;
  /** NASBACKUP_DIGEST: the digest algorithm of the manifests new backups write (reading follows each manifest). */
  digestAlgorithm: DigestAlgorithm;
}

/** Settings given on the command line; they override the environment's. Raw strings, checked here. */
export interface ConfigFlags {
  /** -w/--mount-timeout, seconds. */
  mountTimeout?: string;
  /** --quiesce-timeout, whole seconds. */
  quiesceTimeout?: string;
  /** --engine. */
  engine?: string;
  /** Chosen by `nasbackup agent` (already checked there). */
  agentProfile?: AgentProfile;
}

// A setting that is set but unusable is an error: silently running with the default
// (a 60 s mount deadline instead of the 600 s asked for) would surprise later.
function bad(name: string, raw: string, want: string): NasbackupError {
  return new NasbackupError('INVALID_SETTING', `Invalid ${name}: ${raw} (expected ${want})`);
}

function given(env: NodeJS.ProcessEnv, name: string): string | undefined {
  const raw = env[name];
  return raw === undefined || raw === '' ? undefined : raw;
}

function seconds(env: NodeJS.ProcessEnv, name: string, dflt: number): number {
  const raw = given(env, name);
  if (raw === undefined) return dflt * 1000;
  const n = Number(raw);
  if (!Number.isFinite(n) || n <= 0) throw bad(name, raw, 'a positive number of seconds');
  return Math.round(n * 1000);
}

function positive(env: NodeJS.ProcessEnv, name: string, dflt: number, want: string): number {
  const n = nonNegative(env, name, dflt, want);
  if (n === 0) throw bad(name, given(env, name)!, want);
  return n;
}

function int(env: NodeJS.ProcessEnv, name: string, dflt: number): number {
  const raw = given(env, name);
  if (raw === undefined) return dflt;
  const n = Number(raw);
  if (!/^\d+$/.test(raw) || !Number.isSafeInteger(n) || n <= 0) throw bad(name, raw, 'a positive whole number');
  return n;
}

/** NASBACKUP_HASH_WORKERS: 0 to 4 (unset: the running path one per core, the stopped path inline). */
function hashWorkers(env: NodeJS.ProcessEnv): number | null {
  const raw = given(env, 'NASBACKUP_HASH_WORKERS');
  if (raw === undefined) return null;
  if (!/^[0-4]$/.test(raw)) throw bad('NASBACKUP_HASH_WORKERS', raw, 'a whole number from 0 to 4');
  return Number(raw);
}

function optionalSeconds(env: NodeJS.ProcessEnv, name: string): number | null {
  return given(env, name) === undefined ? null : seconds(env, name, 0);
}

/** A number >= 0 (fractions allowed), e.g. a percentage. */
function nonNegative(env: NodeJS.ProcessEnv, name: string, dflt: number, want: string): number {
  const raw = given(env, name);
  if (raw === undefined) return dflt;
  const n = Number(raw);
  if (raw.trim() === '' || !Number.isFinite(n) || n < 0) throw bad(name, raw, want);
  return n;
}

function flag(env: NodeJS.ProcessEnv, name: string, dflt = false): boolean {
  const raw = given(env, name);
  if (raw === undefined) return dflt;
  if (raw === '0' || raw === 'false') return false;
  if (raw === '1' || raw === 'true') return true;
  throw bad(name, raw, '1, true, 0 or false');
}

function oneOf<T extends string>(env: NodeJS.ProcessEnv, name: string, allowed: readonly T[], dflt: T): T {
  const raw = given(env, name);
  if (raw === undefined) return dflt;
  if (!(allowed as readonly string[]).includes(raw)) throw bad(name, raw, `${allowed.slice(0, -1).join(', ')} or ${allowed.at(-1)}`);
  return raw as T;
}

/**
 * The effective configuration, built once per run from the environment and the command
 * line's settings, then never changed. Throws INVALID_SETTING (environment) or
 * INVALID_ARGUMENT (flag) for a value it cannot use.
 */
export function loadConfig(env: NodeJS.ProcessEnv = process.env, flags: ConfigFlags = {}): Readonly<Config> {
  let mountTimeoutMs = seconds(env, 'NASBACKUP_MOUNT_TIMEOUT', 60);
  if (flags.mountTimeout !== undefined) {
    const n = Number(flags.mountTimeout);
    if (flags.mountTimeout.trim() === '' || !Number.isFinite(n) || n <= 0)
      throw new NasbackupError('INVALID_ARGUMENT', `Invalid mount timeout: ${flags.mountTimeout}`);
    mountTimeoutMs = Math.round(n * 1000);
  }
  let quiesceTimeoutSec = int(env, 'NASBACKUP_QUIESCE_TIMEOUT', 60);
  if (flags.quiesceTimeout !== undefined) {
    if (!/^\d+$/.test(flags.quiesceTimeout) || Number(flags.quiesceTimeout) === 0)
      throw new NasbackupError('INVALID_ARGUMENT', `Invalid quiesce timeout: ${flags.quiesceTimeout}`);
    quiesceTimeoutSec = Number(flags.quiesceTimeout);
  }
  let engine: EngineMode;
  if (flags.engine !== undefined) {
    if (!(ENGINE_MODES as readonly string[]).includes(flags.engine))
      throw new NasbackupError('INVALID_ARGUMENT', `Invalid --engine: ${flags.engine} (expected ${ENGINE_MODES.join(', ')})`);
    engine = flags.engine as EngineMode;
  } else {
    engine = oneOf(env, 'NASBACKUP_ENGINE', ENGINE_MODES, 'auto');
  }
  return Object.freeze({
    logFile: logFileFromEnv(env),
    mountTimeoutMs,
    umountTimeoutMs: seconds(env, 'NASBACKUP_UMOUNT_TIMEOUT', 30),
    umountAttempts: int(env, 'NASBACKUP_UMOUNT_ATTEMPTS', 5),
    umountRetryDelayMs: seconds(env, 'NASBACKUP_UMOUNT_RETRY_DELAY', 1),
    nasTimeoutMs: seconds(env, 'NASBACKUP_NAS_TIMEOUT', 120),
    nasProbeIntervalMs: seconds(env, 'NASBACKUP_NAS_PROBE_INTERVAL', 5),
    commandTimeoutMs: seconds(env, 'NASBACKUP_COMMAND_TIMEOUT', 300),
    qemuImgTimeoutMs: seconds(env, 'NASBACKUP_QEMU_IMG_TIMEOUT', 7200),
    versionCheck: oneOf(env, 'NASBACKUP_VERSION_CHECK', ['all', 'backup', 'off'] as const, 'all'),
    jobTimeoutMs: optionalSeconds(env, 'NASBACKUP_JOB_TIMEOUT'),
    jobMinRateBytesPerSec: Math.round(positive(env, 'NASBACKUP_JOB_MIN_RATE', 10, 'a positive number of MiB/s') * 1024 * 1024),
    jobBaseMs: seconds(env, 'NASBACKUP_JOB_BASE', 600),
    agentTimeoutMs: optionalSeconds(env, 'NASBACKUP_AGENT_TIMEOUT'),
    heartbeatMs: seconds(env, 'NASBACKUP_HEARTBEAT_INTERVAL', 60),
    spaceCheck: flag(env, 'NASBACKUP_SPACE_CHECK', true),
    spaceMarginPct: nonNegative(env, 'NASBACKUP_SPACE_MARGIN', 10, 'a percentage, 0 or more'),
    jobPollInitialMs: seconds(env, 'NASBACKUP_JOB_POLL_INITIAL', 0.1),
    jobPollMaxMs: seconds(env, 'NASBACKUP_JOB_POLL_MAX', 1),
    quiesceTimeoutSec,
    quiesceRequired: flag(env, 'NASBACKUP_QUIESCE_REQUIRED'),
    lockWaitMs: seconds(env, 'NASBACKUP_LOCK_WAIT', 60),
    lockStaleAfterMs: seconds(env, 'NASBACKUP_LOCK_STALE_AFTER', 4 * 3600),
    breakLock: flag(env, 'NASBACKUP_BREAK_LOCK'),
    virshBinary: env.NASBACKUP_VIRSH || 'virsh',
    qemuImgBinary: env.NASBACKUP_QEMU_IMG || 'qemu-img',
    engine,
    agentProfile: flags.agentProfile ?? oneOf(env, PROFILE_ENV, AGENT_PROFILES, DEFAULT_AGENT_PROFILE),
    benchSkipManifest: flag(env, 'NASBACKUP_BENCH_SKIP_MANIFEST'),
    hashWorkers: hashWorkers(env),
    digestAlgorithm: oneOf(env, 'NASBACKUP_DIGEST', DIGEST_ALGORITHMS, DEFAULT_DIGEST_ALGORITHM),
  });
}
