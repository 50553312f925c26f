// virsh behind a small typed client. Later operations add their calls here.
import type { Runner, RunResult } from '../exec.js';

export class VirshClient {
  constructor(
    private readonly runner: Runner,
    private readonly binary: string,
    private readonly timeoutMs: number,
  ) {}

  /** `virsh version`, without `-c`, as the original's sanity check runs it. */
  version(): Promise<RunResult> {
    return this.runner.run(this.binary, ['version'], { timeoutMs: this.timeoutMs });
  }
}
