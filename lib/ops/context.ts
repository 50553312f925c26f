// What every operation gets: how to run programs, log, read the (frozen) config, and
// how to open a NAS session that the lifecycle will always close. No stdout and no
// environment: operations return results (lib/output.ts renders them) and take their
// settings from the config built once by the CLI.
import type { Config } from '../config.js';
import { describeFailure, succeeded, type Runner } from '../exec.js';
import type { Logger } from '../log.js';
import type { NasSession, NasTarget } from '../nas/session.js';

export type { Output } from '../output.js';

export interface OpContext {
  runner: Runner;
  logger: Logger;
  config: Readonly<Config>;
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
