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
 * The watch is another process, not a thread of ours: the main thread may itself be blocked
 * in a call on the NAS (the agent log can live there), and then only someone else can notice.
 * A POSIX shell (a worker thread, its first form, cost a whole V8 isolate: ~10 MiB of RSS and
 * ~30 ms of CPU on every call) that never touches the NAS itself, it only starts children:
 * `stat -f` with a deadline, and on a miss `umount -f -c`, which aborts the requests waiting
 * on the NAS, so a blocked main thread gets its call back (as an error). It waits for no
 * child without a deadline: it polls the child's /proc entry (still running and ours, or
 * ended: gone, a zombie, or another process by now), so a probe stuck in the kernel even past
 * SIGKILL cannot hold it. It prints `tripped` when the deadline passed, then `forced <exit
 * code of umount -f>`, and ends; it also ends when we are gone (its children are bound to it
 * by pdeathsig when setpriv is there), and, never silently, when it cannot even sleep.
 * $1 mount point, $2 stat, $3 umount, $4 interval (seconds), $5 probe deadline and
 * $6 umount deadline (tenths of a second), $7 setpriv or empty, $8 sleep (the system's, by
 * absolute path: a `sleep` earlier on PATH, a test's stand-in, must not pace the watch).
 */
export const PROBE_SCRIPT = String.raw`
mp=$1 st=$2 um=$3 iv=$4 to=$5 uto=$6 sl=$8 parent=$PPID rc=0
if [ -n "$7" ]; then sp="$7"; else sp=; fi
# Only in a subshell or with &: it execs, so $! is the program itself.
run() { if [ -n "$sp" ]; then exec "$sp" --pdeathsig KILL -- "$@"; else exec "$@"; fi; }
waitfor() {
  n=0
  while :; do
    s=
    read -r s 2>/dev/null </proc/$1/stat
    case $s in
      *") Z "*) break ;;
      *") "?" $$ "*) ;;
      *) break ;;
    esac
    [ "$n" -ge "$2" ] && return 1
    "$sl" 0.1
    n=$((n + 1))
  done
  wait "$1"
  rc=$?
  return 0
}
while :; do
  (run "$sl" "$iv") || exit 3
  kill -0 "$parent" 2>/dev/null || exit 0
  run "$st" -f -c %b "$mp" >/dev/null 2>&1 &
  p=$!
  if ! waitfor "$p" "$to"; then
    kill -KILL "$p" 2>/dev/null
    echo tripped
    run "$um" -f -c "$mp" >/dev/null 2>&1 &
    u=$!
    if waitfor "$u" "$uto"; then echo "forced $rc"; else kill -KILL "$u" 2>/dev/null; fi
    exit 0
  fi
done
`;
