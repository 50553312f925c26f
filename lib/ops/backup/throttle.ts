// -b on the running path: libvirt's push backup runs one QEMU block job per disk and its
// backup XML has no rate limit. The limit is set on the jobs in the same virsh session as
// backup-begin (VirshClient.backupBegin); from then on this limiter keeps it for the whole
// backup: shared by the jobs still copying, and moved to the others as each disk finishes
// (QMP query-block-jobs / block-job-set-speed).
import { softly } from '../../clients/failure.js';
import type { BlockJob, VirshClient } from '../../clients/virsh.js';
import { formatBandwidth } from './args.js';

export interface RateLimiter {
  /** Stop re-balancing (awaits a round in progress). */
  stop(): Promise<void>;
}

const copying = (j: BlockJob): boolean => j.type === 'backup' && j.status === 'running' && j.offset < j.len;

/**
 * Check `bytesPerSec` on the domain's backup jobs now, then every `everyMs` re-share it
 * among those still copying. Failures are logged, never fatal: a limit that could not
 * be set makes a faster backup, not a failed one.
 */
export async function limitBackupRate(
  virsh: VirshClient,
  vm: string,
  bytesPerSec: number,
  log: (m: string) => void,
  everyMs = 1000,
): Promise<RateLimiter> {
  let shared = new Map<string, number>(); // job id → its share, as of the last round
  let stopped = false;

  const round = async (): Promise<void> => {
    let jobs: BlockJob[] = [];
    const unread = await softly(virsh.blockJobs(vm).then((j) => (jobs = j)));
    if (unread !== null) return log(`Warning: cannot read the backup jobs of ${vm} to limit their rate: ${unread}`);
    const active = jobs.filter(copying);
    if (active.length === 0) return;
    const each = Math.max(1, Math.floor(bytesPerSec / active.length));
    const next = new Map<string, number>();
    for (const j of active) {
      next.set(j.device, each);
      if (j.speed === each) continue;
      const refused = await softly(virsh.setBlockJobSpeed(vm, j.device, each));
      if (refused !== null) log(`Warning: cannot limit the rate of backup job ${j.device} of ${vm}: ${refused}`);
    }
    if (next.size !== shared.size)
      log(
        `Rate limit ${formatBandwidth(bytesPerSec)} for the backup of ${vm}: ${active.length} job(s) copying, ${formatBandwidth(each)} each`,
      );
    shared = next;
  };

  await round();
  let timer: NodeJS.Timeout | null = null;
  let inFlight: Promise<void> = Promise.resolve();
  const schedule = (): void => {
    if (stopped) return;
    timer = setTimeout(() => {
      inFlight = round()
        .catch((e: Error) => log(`Warning: rate limit of the backup of ${vm}: ${e.message}`))
        .finally(schedule);
    }, everyMs);
    timer.unref();
  };
  schedule();
  return {
    stop: async () => {
      stopped = true;
      if (timer) clearTimeout(timer);
      await inFlight.catch(() => {});
    },
  };
}
