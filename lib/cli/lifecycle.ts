// Running one operation safely: signals wired to cancellation, a context that records
// every NAS session and VM lock it hands out, and — on every path — locks released,
// sessions unmounted, and every failure handed back with the result (lib/output.ts renders them).
import type { Config } from '../config.js';
import { NasbackupError, toNasbackupError } from '../errors.js';
import { Runner } from '../exec.js';
import type { Logger } from '../log.js';
import { VmLock } from '../nas/lock.js';
import { NasSession } from '../nas/session.js';
import { ensureWithin } from '../paths.js';
import type { OpContext, Output } from '../ops/context.js';
import type { MountedNas, Outcome } from '../output.js';

export interface ExecuteIo {
  out: Output;
  env: NodeJS.ProcessEnv;
  /** Process-wide signal wiring; tests may pass a no-op. */
  onSignal?: (handler: (signal: NodeJS.Signals) => void) => () => void;
}

const SIGNALS: NodeJS.Signals[] = ['SIGTERM', 'SIGINT', 'SIGHUP'];

export function processSignals(handler: (signal: NodeJS.Signals) => void): () => void {
  for (const s of SIGNALS) process.on(s, handler);
  return () => {
    for (const s of SIGNALS) process.off(s, handler);
  };
}

export async function execute<T>(io: ExecuteIo, config: Config, logger: Logger, body: (ctx: OpContext) => Promise<T>): Promise<Outcome<T>> {
  const abort = new AbortController();
  let interruptedBy: NodeJS.Signals | null = null;
  const onSignal = io.onSignal ?? processSignals;
  const unhook = onSignal((signal) => {
    if (interruptedBy) return; // cleanup is already under way and bounded
    interruptedBy = signal;
    logger.log(`Received ${signal}: stopping and cleaning up`);
    abort.abort();
  });

  const runner = new Runner(logger, abort.signal);
  const sessions: NasSession[] = [];
  const locks: VmLock[] = [];
  const mounts: MountedNas[] = [];
  const ctx: OpContext = {
    runner,
    logger,
    config,
    openNas: (target) =>
      NasSession.open(target, { runner, config, logger }, (s) => {
        sessions.push(s);
        mounts.push({ mountPoint: s.mountPoint, address: target.address });
      }),
    lockVm: async (mountPoint, instance, operation) => {
      const dir = await ensureWithin(mountPoint, instance, { what: 'instance folder' });
      locks.push(
        await VmLock.acquire(dir, {
          operation,
          waitMs: config.lockWaitMs,
          staleAfterMs: config.lockStaleAfterMs,
          breakLock: config.breakLock,
          logger,
        }),
      );
    },
    checkpoint: () => {
      if (interruptedBy) throw new NasbackupError('INTERRUPTED', `Interrupted by ${interruptedBy}`);
    },
  };

  let failure: NasbackupError | null = null;
  let result: T | undefined;
  try {
    result = await body(ctx);
    ctx.checkpoint();
  } catch (e) {
    failure = toNasbackupError(e);
    if (interruptedBy && failure.code !== 'INTERRUPTED') {
      failure = new NasbackupError('INTERRUPTED', `Interrupted by ${interruptedBy}`, { details: failure.toText() });
    }
  }

  const cleanupErrors: NasbackupError[] = [];
  for (const l of locks.reverse()) await l.release();
  for (const s of sessions.reverse()) {
    try {
      await s.close();
    } catch (e) {
      cleanupErrors.push(toNasbackupError(e));
    }
  }
  unhook();

  const errors = [failure, ...cleanupErrors].filter((e): e is NasbackupError => e !== null);
  for (const e of errors) logger.log(`ERROR [${e.code}] ${e.message}${e.details ? `\n${e.details}` : ''}`);
  return { ...(result !== undefined ? { result } : {}), errors, mounts };
}

