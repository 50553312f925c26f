// How long a copy may take: it follows the data to move (a minimum throughput plus a
// base), never a fixed wait that a large disk outgrows (apache/cloudstack#13883), and
// it ends before the agent gives up when the operator tells us the agent's timeout.
// Heartbeats put a long copy's progress in the log (never on stdout).
import type { Config } from '../../config.js';

export interface DeadlinePolicy {
  baseMs: number;
  minRateBytesPerSec: number;
  /** An operator's fixed cap (NASBACKUP_JOB_TIMEOUT), or null. */
  capMs: number | null;
  /** The agent's own timeout (NASBACKUP_AGENT_TIMEOUT), or null when unknown. */
  agentTimeoutMs: number | null;
}

/**
 * `bandwidthBytesPerSec` (-b): a throttled copy may run at half its limit (the limit is a
 * ceiling, and QEMU shares it between disks) before it counts as too slow.
 */
export function deadlinePolicy(
  c: Pick<Config, 'jobBaseMs' | 'jobMinRateBytesPerSec' | 'jobTimeoutMs' | 'agentTimeoutMs'>,
  bandwidthBytesPerSec: number | null = null,
): DeadlinePolicy {
  const minRate = bandwidthBytesPerSec !== null ? Math.min(c.jobMinRateBytesPerSec, bandwidthBytesPerSec / 2) : c.jobMinRateBytesPerSec;
  return { baseMs: c.jobBaseMs, minRateBytesPerSec: minRate, capMs: c.jobTimeoutMs, agentTimeoutMs: c.agentTimeoutMs };
}

export interface Deadline {
  ms: number;
  /** Why this long, for the log. */
  why: string;
}

/**
 * What is left for cleanup (abort, remove the partial backup, unmount) before the agent
 * gives up: a tenth of its timeout, at most a minute.
 */
export function agentHeadroomMs(agentTimeoutMs: number): number {
  return Math.min(60_000, Math.ceil(agentTimeoutMs / 10));
}

/** The deadline of a copy of `bytes` (an estimate; null when unknown: the base alone). */
export function copyDeadline(bytes: number | null, p: DeadlinePolicy): Deadline {
  const data = bytes ?? 0;
  let ms = p.baseMs + Math.ceil((data / p.minRateBytesPerSec) * 1000);
  let why = `${fmtBytes(data)} at ${fmtBytes(p.minRateBytesPerSec)}/s + ${fmtSeconds(p.baseMs)}`;
  if (p.capMs !== null && p.capMs < ms) {
    ms = p.capMs;
    why = `NASBACKUP_JOB_TIMEOUT (${why} otherwise)`;
  }
  if (p.agentTimeoutMs !== null) {
    const bound = Math.max(1000, p.agentTimeoutMs - agentHeadroomMs(p.agentTimeoutMs));
    if (bound < ms) {
      ms = bound;
      why = `the agent's timeout of ${fmtSeconds(p.agentTimeoutMs)} less cleanup time (${why} otherwise)`;
    }
  }
  return { ms, why };
}

export function fmtBytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let v = n;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return i === 0 ? `${Math.round(v)} B` : `${v.toFixed(1)} ${units[i]}`;
}

export function fmtSeconds(ms: number): string {
  const s = Math.round(ms / 1000);
  if (s < 120) return `${s} s`;
  if (s < 7200) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

/**
 * Progress of a long copy in the log every `intervalMs`: bytes done of the total, the
 * rate since the last heartbeat, and the ETA at that rate (at the average rate so far
 * when nothing moved since): a throttled or slowed copy shows in the ETA at once.
 */
export class Heartbeat {
  private readonly started: number;
  private last: { t: number; done: number };
  private done = 0;
  private total: number | null = null;

  constructor(
    private readonly label: string,
    private readonly intervalMs: number,
    private readonly log: (line: string) => void,
    private readonly now: () => number = Date.now,
  ) {
    this.started = now();
    this.last = { t: this.started, done: 0 };
  }

  /** A new reading (total null when unknown); logs when a heartbeat is due. */
  update(done: number, total: number | null): void {
    this.done = done;
    if (total !== null) this.total = total;
    this.tick();
  }

  /** Logs when a heartbeat is due, with the last reading. */
  tick(): void {
    const t = this.now();
    if (t - this.last.t < this.intervalMs) return;
    const rate = ((this.done - this.last.done) / (t - this.last.t)) * 1000;
    const avg = (this.done / Math.max(1, t - this.started)) * 1000;
    this.last = { t, done: this.done };
    this.log(this.line(t, rate, rate > 0 ? rate : avg));
  }

  private line(t: number, rate: number, etaRate: number): string {
    const total = this.total;
    const of = total !== null && total > 0 ? ` of ${fmtBytes(total)} (${Math.floor((this.done / total) * 100)}%)` : '';
    const eta =
      total !== null && total > 0 && etaRate > 0
        ? `ETA ${fmtSeconds(Math.round((Math.max(0, total - this.done) / etaRate) * 1000))}`
        : 'ETA unknown';
    return `${this.label}: ${fmtBytes(this.done)}${of} after ${fmtSeconds(t - this.started)}, ${fmtBytes(Math.max(0, rate))}/s, ${eta}`;
  }
}
