// Waiting for a libvirt push-backup job: a short, growing poll interval under an
// overall deadline. Completed → the statistics block; Failed/Cancelled → libvirt's
// own error text; a job that vanishes or never ends → a failure, never a hang.
import { NasbackupError } from '../../errors.js';
import { ToolError } from '../../clients/failure.js';
import type { VirshClient } from '../../clients/virsh.js';

export interface WaitOptions {
  deadlineMs: number;
  /**
   * When the data to move was not known beforehand: the deadline for the total the job
   * reports (the longer of the two applies, from the start of the wait).
   */
  deadlineFromTotal?: (totalBytes: number) => number;
  /**
   * Called at each poll that finds the job running: a failure it returns (e.g. the VM
   * paused on an I/O error) ends the wait; the job is still running then.
   */
  watch?: () => Promise<NasbackupError | null>;
  /** Each poll that finds the job running (heartbeats). */
  onPoll?: () => void;
  /** Log lines (what a failed job's statistics were). */
  log?: (line: string) => void;
  /** Whether the NAS is full now: a failed job whose error does not say so is still a full NAS then. */
  nasFull?: () => Promise<boolean>;
  /** First poll interval; grows by half each poll up to maxIntervalMs. */
  initialIntervalMs?: number;
  maxIntervalMs?: number;
  /** Throws when the run has been interrupted. */
  checkpoint: () => void;
  onProgress?: (processed: number, total: number) => void;
  sleep?: (ms: number) => Promise<void>;
  now?: () => number;
}

const RUNNING = new Set(['Unbounded', 'Bounded']);
/** Consecutive virsh errors or "no job at all" answers tolerated before giving up. */
const MAX_ERRORS = 3;
const MAX_VANISHED = 5;

/** Failures of a job that libvirt already ended (nothing left to abort). */
const ended = new WeakSet<NasbackupError>();
export const jobHasEnded = (e: unknown): boolean => e instanceof NasbackupError && (e.code === 'BACKUP_JOB_FAILED' || ended.has(e));

/** libvirt's words for a target that filled up (ENOSPC, EDQUOT). */
export const NO_SPACE = /no space left|ENOSPC|quota exceeded|EDQUOT/i;

/** A tool failure as a value (the poll counts them); anything else propagates. */
function orFailure(e: unknown): ToolError {
  if (e instanceof ToolError) return e;
  throw e;
}

export async function waitForBackupJob(virsh: VirshClient, vm: string, opts: WaitOptions): Promise<string> {
  const sleep = opts.sleep ?? ((ms: number) => new Promise<void>((r) => setTimeout(r, ms)));
  const now = opts.now ?? Date.now;
  const start = now();
  let deadlineMs = opts.deadlineMs;
  let end = start + deadlineMs;
  let interval = opts.initialIntervalMs ?? 100;
  const maxInterval = opts.maxIntervalMs ?? 2000;
  let errors = 0;
  let vanished = 0;
  for (;;) {
    opts.checkpoint();
    const r = await virsh.jobInfoCompleted(vm, { keep: true }).catch(orFailure);
    if (r instanceof ToolError) {
      if (++errors >= MAX_ERRORS) {
        throw new NasbackupError('VIRSH_FAILED', `Cannot read the backup job status of ${vm} (${r.reason})`, { details: r.output });
      }
    } else {
      errors = 0;
      const type = r.type;
      if (type === 'Completed') return r.text;
      if (type === 'Failed' || type === 'Cancelled') {
        const any = await virsh.jobInfoCompleted(vm, { keep: true, anystats: true }).catch(orFailure);
        // virsh prints an empty line even when it fails: fall back to the first answer.
        const stats = any instanceof ToolError ? r : any;
        const why = stats.fields.get('Error message') ?? `job ${type.toLowerCase()}`;
        if (type === 'Failed' && (NO_SPACE.test(why) || (await opts.nasFull?.()) === true)) {
          // One clear line for the agent; the statistics go to the log.
          opts.log?.(`The backup job of ${vm} failed: ${why}\n${stats.text.trimEnd()}`);
          const e = new NasbackupError('NAS_FULL', `The NAS ran out of space during the backup of ${vm} (${why})`);
          ended.add(e);
          throw e;
        }
        throw new NasbackupError('BACKUP_JOB_FAILED', 'Virsh backup job failed', { details: `${why}\n${stats.text.trimEnd()}` });
      }
      // Not finished: is it still running? (A failed answer counts as no job.)
      const active = await virsh.jobInfo(vm).catch(orFailure);
      const atype = active instanceof ToolError ? '' : (active.type ?? '');
      if (!(active instanceof ToolError) && RUNNING.has(atype)) {
        vanished = 0;
        if (active.processed !== null && active.total !== null) {
          opts.onProgress?.(active.processed, active.total);
          if (opts.deadlineFromTotal) {
            const d = opts.deadlineFromTotal(active.total);
            if (d > deadlineMs) {
              deadlineMs = d;
              end = start + d;
            }
          }
        }
        opts.onPoll?.();
        const stop = await opts.watch?.();
        if (stop) throw stop;
      } else if (++vanished >= MAX_VANISHED) {
        throw new NasbackupError('BACKUP_JOB_FAILED', 'Virsh backup job failed', {
          details: `The backup job of ${vm} is neither running nor completed (job type ${type ?? 'unknown'}/${atype || 'unknown'}); was libvirtd restarted?`,
        });
      }
    }
    if (now() + interval > end) {
      throw new NasbackupError('BACKUP_JOB_TIMEOUT', `Backup job of ${vm} did not finish within ${Math.round(deadlineMs / 1000)} s`);
    }
    await sleep(interval);
    interval = Math.min(maxInterval, Math.ceil(interval * 1.5));
  }
}
