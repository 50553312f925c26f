// What every operation gets: the clients of the programs it runs, log, config, stdout,
// and how to open a NAS session that the lifecycle will always close. No operation
// gets the Runner itself: every child process goes through a client.
import type { Config } from '../config.js';
import { ToolError } from '../clients/failure.js';
import type { Clients } from '../clients/index.js';
import type { Logger } from '../log.js';
import type { NasSession, NasTarget } from '../nas/session.js';

export interface Output {
  write(text: string): void;
}

export interface OpContext {
  clients: Clients;
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
  await ctx.clients.host.sync().catch((e: unknown) => {
    if (!(e instanceof ToolError)) throw e;
    ctx.logger.log(`Warning: sync after ${what} failed: ${e.reason}`);
  });
}
