// qemu-img behind a small typed client. Every call has a deadline; callers turn
// failures into their own messages and keep qemu-img's stderr as details.
import type { Runner, RunResult } from '../exec.js';

export interface RebaseArgs {
  file: string;
  backing: string;
  backingFormat: string;
  unsafe?: boolean;
  /** Run in its own process group: a signal sent to ours does not stop it halfway. */
  ownProcessGroup?: boolean;
}

export function rebaseArgs(a: RebaseArgs): string[] {
  return ['rebase', ...(a.unsafe ? ['-u'] : []), '-b', a.backing, '-F', a.backingFormat, a.file];
}

export class QemuImgClient {
  constructor(
    private readonly runner: Runner,
    private readonly binary: string,
    private readonly timeoutMs: number,
  ) {}

  rebase(a: RebaseArgs): Promise<RunResult> {
    return this.runner.run(this.binary, rebaseArgs(a), { timeoutMs: this.timeoutMs, ...(a.ownProcessGroup ? { ownProcessGroup: true } : {}) });
  }

  /** Copy a disk into a new qcow2 (the source format is given, never probed). */
  convert(src: string, srcFormat: string, dst: string): Promise<RunResult> {
    return this.runner.run(this.binary, ['convert', '-f', srcFormat, '-O', 'qcow2', src, dst], { timeoutMs: this.timeoutMs });
  }

  bitmap(file: string, action: '--add' | '--clear' | '--remove', name: string): Promise<RunResult> {
    return this.runner.run(this.binary, ['bitmap', action, file, name], { timeoutMs: this.timeoutMs });
  }

  /** `shared`: -U, read-only check of an image another process may hold. */
  check(file: string, opts: { shared?: boolean } = {}): Promise<RunResult> {
    return this.runner.run(this.binary, ['check', ...(opts.shared ? ['-U'] : []), '--output=json', file], { timeoutMs: this.timeoutMs });
  }
}
