// What every operation gets: how to run programs, log, read config, write stdout,
// and how to open a NAS session that the lifecycle will always close.
import type { Config } from '../config.js';
import { describeFailure, succeeded, type Runner } from '../exec.js';
import type { Logger } from '../log.js';
import type { NasSession, NasTarget } from '../nas/session.js';

export interface Output {
  write(text: string): void;
}

export interface OpContext {
  runner: Runner;
  logger: Logger;
  config: Config;
  env: NodeJS.ProcessEnv;
  out: Output;
  /** Mounts the NAS; the session is closed by the caller of the operation on every path. */
  openNas(target: NasTarget): Promise<NasSession>;
  /**
   * Take the per-VM lock of `<mount>/<instance>`; released by the caller of the
   * operation on every path, before the NAS is unmounted.
   */
  lockVm(mountPoint: string, instance: string, operation: string): Promise<void>;
  /** Throws INTERRUPTED once a terminating signal has arrived. */
  checkpoint(): void;
}

/** Flush the NAS after writing; a failed sync is logged, not fatal (the data was written). */
export async function syncAfter(ctx: OpContext, what: string): Promise<void> {
  const s = await ctx.runner.run('sync', [], { timeoutMs: ctx.config.commandTimeoutMs });
  if (!succeeded(s)) ctx.logger.log(`Warning: sync after ${what} failed: ${describeFailure(s)}`);
}
