// A NAS that stops answering (hung NFS/CIFS server, stopped FUSE server) blocks every
// filesystem call on it, and such a call cannot be cancelled: it sits in the kernel, on
// one of libuv's few threads. So the operation is raced against a watch: while a NAS is
// mounted, a child probes it (statfs) with a deadline; when it does not answer, the
// watch trips, the operation is abandoned where it stands (its calls are left behind
// and die with the process), and cleanup runs with children and local calls only.
import { NasbackupError } from '../errors.js';
import { spawnExitGuard } from '../exec.js';

/** How long the process may take to end once a NAS stopped answering and cleanup is done. */
export const EXIT_GUARD_MS = 10_000;

export class NasWatch {
  private failure: NasbackupError | null = null;
  private rejectTripped!: (e: NasbackupError) => void;
  /** Rejects (with NAS_UNRESPONSIVE) when the NAS stops answering; never resolves. */
  readonly tripped: Promise<never>;

  constructor(private readonly onTrip: (e: NasbackupError) => void = () => {}) {
    this.tripped = new Promise<never>((_, reject) => (this.rejectTripped = reject));
    this.tripped.catch(() => {}); // only a race listens to it
  }

  get unresponsive(): NasbackupError | null {
    return this.failure;
  }

  trip(mountPoint: string, source: string, waitedMs: number): void {
    if (this.failure) return;
    this.failure = new NasbackupError(
      'NAS_UNRESPONSIVE',
      `The NAS did not answer within ${Math.round(waitedMs / 1000)} s (${source} at ${mountPoint}); the operation was abandoned`,
    );
    this.onTrip(this.failure);
    this.rejectTripped(this.failure);
  }

  /**
   * Node joins its I/O threads when the process exits; one still stuck on the NAS (when
   * even the forced unmount could not return its call) would keep us from ever ending.
   * A child bound to us (pdeathsig: it dies the moment we are gone) SIGKILLs us if we are
   * still here after `ms`. Without setpriv there is no guard: it could outlive us.
   */
  guardExit(ms: number = EXIT_GUARD_MS): void {
    spawnExitGuard(ms);
  }

  /** `p`, unless the NAS stops answering first. */
  race<T>(p: Promise<T>): Promise<T> {
    return Promise.race([p, this.tripped]);
  }
}

/**
 * The probe runs in a worker thread: the main thread may itself be blocked in a call on
 * the NAS (the agent log can live there), and then only another thread can notice. The
 * worker never touches the NAS itself, it only starts children: `stat -f` with a deadline
 * (in its own process group, killed whole), and on a miss `umount -f`, which aborts the
 * requests waiting on the NAS, so a blocked main thread gets its call back (as an error).
 * CommonJS source, evaluated: it works the same from dist/ and from the single-file bundle.
 */
export const PROBE_WORKER = String.raw`
const { parentPort, workerData: w } = require('node:worker_threads');
const { spawn } = require('node:child_process');
let timer = null;
let stopped = false;
const killGroup = (pid) => { try { process.kill(-pid, 'SIGKILL'); } catch {} };
const run = (argv) => spawn(w.setpriv || argv[0], w.setpriv ? ['--pdeathsig', 'KILL', '--', ...argv] : argv.slice(1), { detached: true, stdio: 'ignore', env: w.env });
function schedule() { if (!stopped) timer = setTimeout(tick, w.intervalMs); }
function tick() {
  timer = null;
  if (stopped) return;
  let child;
  try { child = run([w.stat, '-f', '-c', '%b', w.mountPoint]); } catch { schedule(); return; }
  const deadline = setTimeout(() => {
    killGroup(child.pid);
    if (stopped) return;
    stopped = true;
    parentPort.postMessage({ type: 'tripped' });
    let u;
    try { u = run([w.umount, '-f', '-c', w.mountPoint]); } catch { return; }
    const t = setTimeout(() => killGroup(u.pid), w.umountTimeoutMs);
    u.on('exit', (code) => { clearTimeout(t); parentPort.postMessage({ type: 'forced', code }); });
    u.on('error', () => clearTimeout(t));
  }, w.timeoutMs);
  child.on('error', () => { clearTimeout(deadline); schedule(); });
  child.on('exit', () => { clearTimeout(deadline); schedule(); });
}
parentPort.on('message', (m) => {
  if (m === 'stop') { stopped = true; if (timer) clearTimeout(timer); parentPort.close(); }
});
schedule();
`;
