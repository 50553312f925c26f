// What every operation gets: how to run programs, log, read config, write stdout,
// and how to open a NAS session that the lifecycle will always close.
import type { Config } from '../config.js';
import type { Runner } from '../exec.js';
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
