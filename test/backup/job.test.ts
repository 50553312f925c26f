// Waiting for a libvirt push-backup job, with a scripted virsh and a fake clock: every
// way a job can end (or not) becomes a result or a failure — never a hang.
import { describe, expect, it } from 'vitest';
import { jobHasEnded, waitForBackupJob, type WaitOptions } from '../../lib/ops/backup/job.js';
import { VirshClient } from '../../lib/clients/virsh.js';
import { NasbackupError } from '../../lib/errors.js';
import type { RunResult } from '../../lib/exec.js';
import { scriptedRunner } from '../helpers/runner.js';

const ok = (stdout: string): RunResult => ({
  command: 'virsh',
  args: [],
  exitCode: 0,
  signal: null,
  stdout,
  stderr: '',
  timedOut: false,
  canceled: false,
  spawnError: null,
  durationMs: 1,
});
const err = (stderr: string): RunResult => ({ ...ok('\n'), exitCode: 1, stderr });

const pad = (k: string, v: string): string => `${k.padEnd(17)} ${v.padEnd(12)}\n`;
const NONE = pad('Job type:', 'None') + '\n';
const COMPLETED =
  pad('Job type:', 'Completed') +
  pad('Operation:', 'Backup') +
  'Time elapsed:     133          ms\nFile processed:   16.000 MiB\nFile remaining:   0.000 B\nFile total:       16.000 MiB\n\n';
const FAILED = pad('Job type:', 'Failed') + pad('Operation:', 'Backup') + '\n';
const FAILED_ANY =
  pad('Job type:', 'Failed') +
  pad('Operation:', 'Backup') +
  'Time elapsed:     71           ms\nError message:    No space left on device\n\n';
const running = (processed: string, total: string): string =>
  pad('Job type:', 'Unbounded') +
  pad('Operation:', 'Backup') +
  `File processed:   ${processed}\nFile remaining:   0.000 B\nFile total:       ${total}\n\n`;

/**
 * A virsh answering from scripts (the last answer repeats) and a clock that only the
 * poll's sleeps move. Records every call and every sleep. The real client runs over a
 * scripted Runner, so the poll sees virsh's output as the client parses it.
 */
function harness(
  completed: RunResult[],
  active: RunResult[] = [ok(running('1.000 MiB', '16.000 MiB'))],
  anystats: RunResult = ok(FAILED_ANY),
) {
  const calls: string[] = [];
  const sleeps: number[] = [];
  let t = 1_000_000;
  let c = 0;
  let a = 0;
  const { runner } = scriptedRunner((args) => {
    const [, , , vm] = args; // -c <uri> domjobinfo <vm> ...
    const keep = args.includes('--keep-completed');
    if (args.includes('--anystats')) {
      calls.push(`completed${keep ? ' keep' : ''} anystats ${vm}`);
      return anystats;
    }
    if (args.includes('--completed')) {
      calls.push(`completed${keep ? ' keep' : ''} ${vm}`);
      return completed[Math.min(c++, completed.length - 1)]!;
    }
    calls.push(`active ${vm}`);
    return active[Math.min(a++, active.length - 1)]!;
  });
  const virsh = new VirshClient(runner, 'virsh', 1000);
  const progress: Array<[number, number]> = [];
  const opts = (o: Partial<WaitOptions> = {}): WaitOptions => ({
    deadlineMs: 60_000,
    checkpoint: () => {},
    onProgress: (p, total) => progress.push([p, total]),
    sleep: async (ms) => {
      sleeps.push(ms);
      t += ms;
    },
    now: () => t,
    ...o,
  });
  return { virsh, calls, sleeps, progress, opts, elapsed: () => t - 1_000_000 };
}

const failure = (p: Promise<unknown>): Promise<NasbackupError> =>
  p.then(
    () => {
      throw new Error('expected a failure');
    },
    (e: NasbackupError) => e,
  );

describe('waitForBackupJob', () => {
  it('Completed at the first poll: its statistics block, no sleep, the stats kept for a later read', async () => {
    const h = harness([ok(COMPLETED)]);
    expect(await waitForBackupJob(h.virsh, 'vm', h.opts())).toBe(COMPLETED);
    expect(h.calls).toEqual(['completed keep vm']);
    expect(h.sleeps).toEqual([]);
  });

  it('running, then Completed: progress reported from the active job, growing sleeps', async () => {
    const h = harness(
      [ok(NONE), ok(NONE), ok(COMPLETED)],
      [ok(running('4.000 MiB', '16.000 MiB')), ok(running('12.000 MiB', '16.000 MiB'))],
    );
    expect(await waitForBackupJob(h.virsh, 'vm', h.opts())).toBe(COMPLETED);
    expect(h.calls).toEqual(['completed keep vm', 'active vm', 'completed keep vm', 'active vm', 'completed keep vm']);
    expect(h.progress).toEqual([
      [4 * 1048576, 16 * 1048576],
      [12 * 1048576, 16 * 1048576],
    ]);
    expect(h.sleeps).toEqual([100, 150]);
  });

  it("Failed: libvirt's error message from --anystats, with the statistics", async () => {
    const io = FAILED_ANY.replace('No space left on device', 'Input/output error');
    const h = harness([ok(FAILED)], undefined, ok(io));
    const e = await failure(waitForBackupJob(h.virsh, 'vm', h.opts()));
    expect(e.code).toBe('BACKUP_JOB_FAILED');
    expect(jobHasEnded(e)).toBe(true);
    expect(e.toText()).toBe('Virsh backup job failed\nInput/output error\n' + io.trimEnd() + '\n');
    expect(h.calls).toEqual(['completed keep vm', 'completed keep anystats vm']);
  });

  it('Failed with "No space left on device": NAS_FULL in one line, the statistics in the log, nothing left to abort', async () => {
    const h = harness([ok(FAILED)]);
    const logged: string[] = [];
    const e = await failure(waitForBackupJob(h.virsh, 'vm', h.opts({ log: (l) => logged.push(l) })));
    expect(e.code).toBe('NAS_FULL');
    expect(e.toText()).toBe('The NAS ran out of space during the backup of vm (No space left on device)\n');
    expect(jobHasEnded(e)).toBe(true);
    expect(logged).toEqual([`The backup job of vm failed: No space left on device\n${FAILED_ANY.trimEnd()}`]);
  });

  it("Failed on another error while the NAS is full (libvirt's words do not say so): still NAS_FULL", async () => {
    const io = FAILED_ANY.replace('No space left on device', 'Input/output error');
    const h = harness([ok(FAILED)], undefined, ok(io));
    const e = await failure(waitForBackupJob(h.virsh, 'vm', h.opts({ nasFull: async () => true })));
    expect(e.code).toBe('NAS_FULL');
    expect(e.message).toBe('The NAS ran out of space during the backup of vm (Input/output error)');
    const h2 = harness([ok(FAILED)], undefined, ok(io));
    expect((await failure(waitForBackupJob(h2.virsh, 'vm', h2.opts({ nasFull: async () => false })))).code).toBe('BACKUP_JOB_FAILED');
  });

  it('watch: a failure it returns while the job runs ends the wait (the job still runs: not "ended")', async () => {
    const h = harness([ok(NONE)]);
    let polls = 0;
    const stop = new NasbackupError('NAS_FULL', 'paused');
    const e = await failure(waitForBackupJob(h.virsh, 'vm', h.opts({ watch: async () => (++polls === 3 ? stop : null) })));
    expect(e).toBe(stop);
    expect(jobHasEnded(e)).toBe(false);
    expect(h.calls.filter((c) => c === 'active vm')).toHaveLength(3);
  });

  it('deadlineFromTotal: a total reported by the job extends the deadline (the data was not known beforehand)', async () => {
    const h = harness([ok(NONE)], [ok(running('1.000 MiB', '16.000 MiB'))]);
    const totals: number[] = [];
    const e = await failure(
      waitForBackupJob(
        h.virsh,
        'vm',
        h.opts({
          deadlineMs: 5_000,
          deadlineFromTotal: (t) => {
            totals.push(t);
            return 30_000;
          },
        }),
      ),
    );
    expect(e.message).toBe('Backup job of vm did not finish within 30 s');
    expect(totals[0]).toBe(16 * 1048576);
    expect(h.elapsed()).toBeGreaterThan(28_000);
    expect(h.elapsed()).toBeLessThanOrEqual(30_000);
  });

  it('Cancelled (someone ran domjobabort): a failure saying so', async () => {
    const cancelled = pad('Job type:', 'Cancelled') + pad('Operation:', 'Backup') + '\n';
    const h = harness([ok(cancelled)], [], ok(cancelled));
    const e = await failure(waitForBackupJob(h.virsh, 'vm', h.opts()));
    expect(e.code).toBe('BACKUP_JOB_FAILED');
    expect(e.details.split('\n')[0]).toBe('job cancelled');
  });

  it('--anystats itself failing: the first answer is reported instead', async () => {
    const h = harness([ok(FAILED)], [], err('error: failed\n'));
    const e = await failure(waitForBackupJob(h.virsh, 'vm', h.opts()));
    expect(e.details).toBe('job failed\n' + FAILED.trimEnd());
  });

  it('never finishing: BACKUP_JOB_TIMEOUT at the deadline, without sleeping past it', async () => {
    const h = harness([ok(NONE)]);
    const e = await failure(waitForBackupJob(h.virsh, 'vm', h.opts({ deadlineMs: 10_000 })));
    expect(e.code).toBe('BACKUP_JOB_TIMEOUT');
    expect(e.message).toBe('Backup job of vm did not finish within 10 s');
    expect(h.elapsed()).toBeLessThanOrEqual(10_000);
    expect(h.elapsed()).toBeGreaterThan(10_000 - 2000);
  });

  it('vanished (None/None, e.g. libvirtd restarted): a failure after 5 polls in a row', async () => {
    const h = harness([ok(NONE)], [ok(NONE)]);
    const e = await failure(waitForBackupJob(h.virsh, 'vm', h.opts()));
    expect(e.code).toBe('BACKUP_JOB_FAILED');
    expect(e.details).toBe('The backup job of vm is neither running nor completed (job type None/None); was libvirtd restarted?');
    expect(h.calls.filter((c) => c === 'completed keep vm')).toHaveLength(5);
  });

  it('a job seen running again resets the vanish count', async () => {
    const r = ok(running('1.000 MiB', '2.000 MiB'));
    const h = harness(
      [ok(NONE), ok(NONE), ok(NONE), ok(NONE), ok(NONE), ok(NONE), ok(NONE), ok(COMPLETED)],
      [ok(NONE), ok(NONE), ok(NONE), ok(NONE), r, ok(NONE), ok(NONE)],
    );
    expect(await waitForBackupJob(h.virsh, 'vm', h.opts())).toBe(COMPLETED);
  });

  it("domjobinfo failing 3 times in a row: VIRSH_FAILED with virsh's error", async () => {
    const lock = 'error: Timed out during operation: cannot acquire state change lock (held by monitor=remoteDispatchDomainBackupBegin)\n';
    const h = harness([err(lock)]);
    const e = await failure(waitForBackupJob(h.virsh, 'vm', h.opts()));
    expect(e.code).toBe('VIRSH_FAILED');
    expect(e.toText()).toBe(`Cannot read the backup job status of vm (virsh exited with code 1)\n${lock}`);
    expect(h.calls).toEqual(['completed keep vm', 'completed keep vm', 'completed keep vm']);
  });

  it('errors that stop before the third: the job is still followed to the end', async () => {
    const h = harness([err('error: busy\n'), err('error: busy\n'), ok(NONE), err('error: busy\n'), err('error: busy\n'), ok(COMPLETED)]);
    expect(await waitForBackupJob(h.virsh, 'vm', h.opts())).toBe(COMPLETED);
  });

  it('the interval grows by half each poll and is capped', async () => {
    const h = harness([ok(NONE)]);
    await failure(waitForBackupJob(h.virsh, 'vm', h.opts({ deadlineMs: 20_000, initialIntervalMs: 100, maxIntervalMs: 2000 })));
    expect(h.sleeps.slice(0, 11)).toEqual([100, 150, 225, 338, 507, 761, 1142, 1713, 2000, 2000, 2000]);
    expect(Math.max(...h.sleeps)).toBe(2000);
  });

  it('an interruption (SIGTERM) stops the wait before the next poll', async () => {
    const h = harness([ok(NONE)]);
    let polls = 0;
    const e = await failure(
      waitForBackupJob(
        h.virsh,
        'vm',
        h.opts({
          checkpoint: () => {
            if (++polls > 2) throw new NasbackupError('INTERRUPTED', 'Interrupted by SIGTERM');
          },
        }),
      ),
    );
    expect(e.code).toBe('INTERRUPTED');
    expect(h.calls.filter((c) => c.startsWith('completed'))).toHaveLength(2);
  });
});
