// Deadlines and knobs, all from the environment (the agent passes no config flags).
// Every wait in the program is bounded by one of these.

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
  /** Overall deadline of a libvirt backup job (the agent's cmds.timeout by default). */
  jobTimeoutMs: number;
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
  /** Rebase engine (`--engine` overrides): auto, native or qemu-img; checked where it is used. */
  engine: string;
}

function seconds(env: NodeJS.ProcessEnv, name: string, dflt: number): number {
  const raw = env[name];
  if (raw === undefined || raw === '') return dflt * 1000;
  const n = Number(raw);
  if (!Number.isFinite(n) || n <= 0) return dflt * 1000;
  return Math.round(n * 1000);
}

function int(env: NodeJS.ProcessEnv, name: string, dflt: number): number {
  const n = Number(env[name]);
  return Number.isInteger(n) && n > 0 ? n : dflt;
}

export function loadConfig(env: NodeJS.ProcessEnv = process.env): Config {
  const vc = env.NASBACKUP_VERSION_CHECK;
  return {
    logFile: env.NASBACKUP_LOG_FILE || '/var/log/cloudstack/agent/agent.log',
    mountTimeoutMs: seconds(env, 'NASBACKUP_MOUNT_TIMEOUT', 60),
    umountTimeoutMs: seconds(env, 'NASBACKUP_UMOUNT_TIMEOUT', 30),
    umountAttempts: int(env, 'NASBACKUP_UMOUNT_ATTEMPTS', 5),
    umountRetryDelayMs: seconds(env, 'NASBACKUP_UMOUNT_RETRY_DELAY', 1),
    nasTimeoutMs: seconds(env, 'NASBACKUP_NAS_TIMEOUT', 120),
    nasProbeIntervalMs: seconds(env, 'NASBACKUP_NAS_PROBE_INTERVAL', 5),
    commandTimeoutMs: seconds(env, 'NASBACKUP_COMMAND_TIMEOUT', 300),
    qemuImgTimeoutMs: seconds(env, 'NASBACKUP_QEMU_IMG_TIMEOUT', 7200),
    versionCheck: vc === 'backup' || vc === 'off' ? vc : 'all',
    jobTimeoutMs: seconds(env, 'NASBACKUP_JOB_TIMEOUT', 7200),
    jobPollInitialMs: seconds(env, 'NASBACKUP_JOB_POLL_INITIAL', 0.1),
    jobPollMaxMs: seconds(env, 'NASBACKUP_JOB_POLL_MAX', 1),
    quiesceTimeoutSec: int(env, 'NASBACKUP_QUIESCE_TIMEOUT', 60),
    quiesceRequired: env.NASBACKUP_QUIESCE_REQUIRED === '1' || env.NASBACKUP_QUIESCE_REQUIRED === 'true',
    lockWaitMs: seconds(env, 'NASBACKUP_LOCK_WAIT', 60),
    lockStaleAfterMs: seconds(env, 'NASBACKUP_LOCK_STALE_AFTER', 4 * 3600),
    breakLock: env.NASBACKUP_BREAK_LOCK === '1' || env.NASBACKUP_BREAK_LOCK === 'true',
    virshBinary: env.NASBACKUP_VIRSH || 'virsh',
    qemuImgBinary: env.NASBACKUP_QEMU_IMG || 'qemu-img',
    engine: env.NASBACKUP_ENGINE || 'auto',
  };
}
