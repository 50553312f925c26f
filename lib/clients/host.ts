// The host's own small tools behind a typed client: `sync` after writing to the NAS,
// `dd` to drop a file's cached pages before a verifying re-read, and `df -P` for the storage stats. The `df` parser stays private to it.
import { describeFailure, succeeded, type Runner } from '../exec.js';
import { ToolError, toolFailure } from './failure.js';

export interface DiskUsage {
  totalKiB: bigint;
  usedKiB: bigint;
}

/** Fields 2 and 3 of the data row of `df -P` (the mount source may contain spaces, so count from the right). */
function parseDfP(text: string): DiskUsage | null {
  const rows = text.split('\n').filter((l) => l.trim() !== '');
  const row = rows[1];
  if (!row) return null;
  // Row: <source> <1024-blocks> <used> <available> <capacity%> <mounted on>
  const m = /^(.*?)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+%|-)\s+(.*)$/.exec(row);
  if (!m) return null;
  return { totalKiB: BigInt(m[2]!), usedKiB: BigInt(m[3]!) };
}

export class HostClient {
  constructor(
    private readonly runner: Runner,
    private readonly timeoutMs: number,
  ) {}

  /**
   * Flush every filesystem, or with `fileSystemOf` only the one holding that path (`sync -f`,
   * syncfs(2): the NAS, not every disk of the host); a failure is a ToolError whose `reason`
   * says why.
   */
  async sync(opts: { abortable?: boolean; fileSystemOf?: string } = {}): Promise<void> {
    const args = opts.fileSystemOf === undefined ? [] : ['-f', opts.fileSystemOf];
    const r = await this.runner.run('sync', args, { timeoutMs: this.timeoutMs, ...(opts.abortable === false ? { abortable: false } : {}) });
    if (!succeeded(r)) throw toolFailure('COMMAND_FAILED', 'sync', r);
  }

  /** Ask the kernel to drop the clean cached pages of `file` (GNU dd: iflag=nocache count=0), so its next read comes from storage. */
  async dropCache(file: string): Promise<void> {
    const r = await this.runner.run('dd', [`if=${file}`, 'iflag=nocache', 'count=0', 'status=none'], { timeoutMs: this.timeoutMs });
    if (!succeeded(r)) throw toolFailure('COMMAND_FAILED', 'dd', r);
  }

  /** Size and use of the filesystem holding `path`, in 1K blocks (`df -P`). */
  async diskUsage(path: string): Promise<DiskUsage> {
    const r = await this.runner.run('df', ['-P', path], { timeoutMs: this.timeoutMs });
    if (!succeeded(r)) {
      throw new ToolError('STATS_FAILED', `Failed to get storage stats of ${path}`, r, r.stderr.trim() || describeFailure(r));
    }
    const usage = parseDfP(r.stdout);
    if (!usage) throw new ToolError('STATS_FAILED', 'Cannot parse the output of df -P', r, r.stdout);
    return usage;
  }
}
