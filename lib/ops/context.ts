// What every operation gets: the clients of the programs it runs, log, the (frozen)
// config, and how to open a NAS session that the lifecycle will always close. No
// Runner (every child process goes through a client), no stdout and no environment:
// operations return results (lib/output.ts renders them) and take their settings from
// the config built once by the CLI.
import type { Config } from '../config.js';
import { ToolError } from '../clients/failure.js';
import type { Clients } from '../clients/index.js';
import type { Logger } from '../log.js';
import type { NasSession, NasTarget } from '../nas/session.js';

export interface OpContext {
  clients: Clients;
  logger: Logger;
  config: Readonly<Config>;
  /**
   * Mounts the NAS (once per target and run: a second call gets the same session); the
   * session is closed by the caller of the operation on every path.
   */
  openNas(target: NasTarget): Promise<NasSession>;
  /**
   * Take the per-VM lock of `<mount>/<instance>`; released by the caller of the
   * operation on every path, before the NAS is unmounted.
   */
  lockVm(mountPoint: string, instance: string, operation: string): Promise<void>;
  /** Throws INTERRUPTED once a terminating signal has arrived (before the commit point). */
  checkpoint(): void;
  /**
   * Run `step` (bounded by its own deadline) with terminating signals held back: a step
   * that must not be stopped halfway (a qemu-img rebase). A signal held back meanwhile
   * takes effect once it is over.
   */
  shield<T>(step: () => Promise<T>): Promise<T>;
  /**
   * The commit point: `step` (the rename that makes a backup) under shield; once it has
   * succeeded the operation finishes and reports success whatever signal arrives.
   */
  commit<T>(step: () => Promise<T>): Promise<T>;
  /**
   * Something this run wrote and could not remove (e.g. the NAS turned read-only): the
   * run then ends with exit 20 (cleanup failed) and names it on stdout.
   */
  leftover(what: string): void;
  /** Mark the commit point as passed (the work took effect, e.g. a rebase confirmed on disk). */
  committed(): void;
}

/** Flush the NAS after writing; a failed sync is logged, not fatal (the data was written). */
export async function syncAfter(ctx: OpContext, what: string, opts: { afterCommit?: boolean; fileSystemOf?: string } = {}): Promise<void> {
  // After the commit point a signal no longer cancels the flush (it is bounded by its deadline).
  const only = opts.fileSystemOf === undefined ? {} : { fileSystemOf: opts.fileSystemOf };
  await ctx.clients.host.sync({ abortable: !opts.afterCommit, ...only }).catch((e: unknown) => {
    if (!(e instanceof ToolError)) throw e;
    ctx.logger.log(`Warning: sync after ${what} failed: ${e.reason}`);
  });
}
