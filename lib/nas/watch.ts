// A NAS that stops answering (hung NFS/CIFS server, stopped FUSE server) blocks every
// filesystem call on it, and such a call cannot be cancelled: it sits in the kernel, on
// one of libuv's few threads. So the operation is raced against a watch: while a NAS is
// mounted, a child probes it (statfs) with a deadline; when it does not answer, the
// watch trips, the operation is abandoned where it stands (its calls are left behind
// and die with the process), and cleanup runs with children and local calls only.
import { NasbackupError } from '../errors.js';

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
    this.failure = new NasbackupError('NAS_UNRESPONSIVE', `The NAS did not answer within ${Math.round(waitedMs / 1000)} s (${source} at ${mountPoint}); the operation was abandoned`);
    this.onTrip(this.failure);
    this.rejectTripped(this.failure);
  }

  /** `p`, unless the NAS stops answering first. */
  race<T>(p: Promise<T>): Promise<T> {
    return Promise.race([p, this.tripped]);
  }
}
