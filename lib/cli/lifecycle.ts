// Running one operation safely: signals wired to cancellation, a context that records
// every NAS session and VM lock it hands out, and — on every path — locks released,
// sessions unmounted, and every failure handed back with the result (lib/output.ts renders them).
import type { Config } from '../config.js';
import { NasbackupError, toNasbackupError } from '../errors.js';
import { makeClients } from '../clients/index.js';
import { Runner } from '../exec.js';
import type { Logger } from '../log.js';
import { VmLock } from '../nas/lock.js';
import { NasSession, type NasTarget } from '../nas/session.js';
import { NasWatch } from '../nas/watch.js';
import { ensureWithin } from '../paths.js';
import type { OpContext } from '../ops/context.js';
import { onTerminatingSignal } from './signals.js';
import type { MountedNas, Outcome, Output } from '../output.js';

export interface ExecuteIo {
  out: Output;
  env: NodeJS.ProcessEnv;
  /** Process-wide signal wiring; tests may pass a no-op. */
  onSignal?: (handler: (signal: NodeJS.Signals) => void) => () => void;
}

/** The process's signals (handlers installed at start-up, see signals.ts). */
export function processSignals(handler: (signal: NodeJS.Signals) => void): () => void {
  return onTerminatingSignal(handler);
}

export async function execute<T>(io: ExecuteIo, config: Config, logger: Logger, body: (ctx: OpContext) => Promise<T>): Promise<Outcome<T>> {
  const abort = new AbortController();
  let interruptedBy: NodeJS.Signals | null = null;
  // Past the commit point the result exists: a signal no longer undoes or fails it.
  let phase: 'work' | 'shielded' | 'committed' = 'work';
  let lateSignal: NodeJS.Signals | null = null;
  const stop = (signal: NodeJS.Signals): void => {
    interruptedBy = signal;
    logger.log(`Received ${signal}: stopping and cleaning up`);
    abort.abort();
  };
  const takeLate = (): NodeJS.Signals => {
    const s = lateSignal!;
    lateSignal = null;
    return s;
  };
  const onSignal = io.onSignal ?? processSignals;
  const unhook = onSignal((signal) => {
    if (interruptedBy || lateSignal) return; // cleanup (or the finish) is already under way and bounded
    if (phase === 'work') return stop(signal);
    lateSignal = signal;
    logger.log(
      phase === 'shielded'
        ? `Received ${signal} during a step that must not be stopped halfway: letting it finish first`
        : `Received ${signal} after the commit point: finishing the operation and reporting its result`,
    );
  });

  const runner = new Runner(logger, abort.signal);
  // A NAS that stops answering abandons the body; its children are killed (abort).
  const watch = new NasWatch(() => abort.abort());
  const sessions: NasSession[] = [];
  const locks: VmLock[] = [];
  const leftovers: string[] = [];
  const mounts: MountedNas[] = [];
  /** One mount per NAS per run: a second openNas of the same target gets the same session. */
  const opened = new Map<NasTarget, Promise<NasSession>>();
  const ctx: OpContext = {
    clients: makeClients(runner, config),
    logger,
    config,
    openNas: (target) => {
      let nas = opened.get(target);
      if (!nas)
        opened.set(
          target,
          (nas = NasSession.open(target, { runner, config, logger, watch }, (s) => {
            sessions.push(s);
            mounts.push({ mountPoint: s.mountPoint, address: target.address });
          })),
        );
      return nas;
    },
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
      if (watch.unresponsive) throw watch.unresponsive;
      if (interruptedBy && phase === 'work') throw new NasbackupError('INTERRUPTED', `Interrupted by ${interruptedBy}`);
    },
    shield: async <T>(step: () => Promise<T>): Promise<T> => {
      if (phase !== 'work') return step();
      ctx.checkpoint();
      phase = 'shielded';
      try {
        return await step();
      } finally {
        phase = 'work';
        // A signal held back meanwhile stops the operation now (the caller decides whether the work stands).
        if (lateSignal) stop(takeLate());
      }
    },
    commit: async <T>(step: () => Promise<T>): Promise<T> => {
      if (phase !== 'work') return step();
      ctx.checkpoint();
      phase = 'shielded';
      let r: T;
      try {
        r = await step();
      } catch (e) {
        phase = 'work';
        if (lateSignal) stop(takeLate()); // it did not take effect: the held-back signal stops the operation
        throw e;
      }
      phase = 'committed'; // a signal held back meanwhile stays held: the result stands
      return r;
    },
    leftover: (what) => {
      leftovers.push(what);
      logger.log(`Left behind: ${what}`);
    },
    committed: () => {
      if (phase === 'committed') return;
      phase = 'committed';
      // The work got done although a signal came in on its very last stretch: it stands.
      if (interruptedBy) logger.log(`The operation completed despite ${interruptedBy}; reporting its result`);
      lateSignal ??= interruptedBy;
      interruptedBy = null;
    },
  };

  let failure: NasbackupError | null = null;
  let result: T | undefined;
  try {
    ctx.checkpoint(); // a signal that came in while starting: stop before anything happens
    result = await watch.race(body(ctx));
    ctx.checkpoint();
  } catch (e) {
    failure = toNasbackupError(e);
    const by = interruptedBy as NodeJS.Signals | null; // set by the signal handler meanwhile
    if (by && failure.code !== 'INTERRUPTED') {
      failure = new NasbackupError('INTERRUPTED', `Interrupted by ${by}`, { details: failure.toText() });
    }
  }

  const cleanupErrors: NasbackupError[] = [];
  for (const l of locks.reverse()) {
    // A lock on a NAS that does not answer cannot be removed (nor looked at); the next run takes it over.
    if (watch.unresponsive) {
      ctx.leftover(`Could not remove the lock ${l.path} (the NAS did not answer)`);
      continue;
    }
    await watch.race(l.release()).catch(() => {});
    // Still there (a read-only or failing NAS): say so; the next run takes over a lock whose holder is gone.
    // Only our own: another run waiting for this VM may hold the lock by now.
    const left = await watch.race(l.stillHeld()).catch(() => true);
    if (left) ctx.leftover(`Could not remove the lock ${l.path}`);
  }
  for (const s of sessions.reverse()) {
    try {
      await s.close();
    } catch (e) {
      cleanupErrors.push(toNasbackupError(e));
    }
  }
  if (leftovers.length > 0) {
    // One report of everything left, the unmount problems included.
    const all = [...leftovers, ...cleanupErrors.splice(0).map((e) => e.message)];
    cleanupErrors.push(new NasbackupError('NAS_CLEANUP_FAILED', all.join('\n'), { details: 'Backup cleanup failed' }));
  }
  unhook();
  if (watch.unresponsive) watch.guardExit();

  const errors = [failure, ...cleanupErrors].filter((e): e is NasbackupError => e !== null);
  for (const e of errors) logger.log(`ERROR [${e.code}] ${e.message}${e.details ? `\n${e.details}` : ''}`);
  return { ...(result !== undefined ? { result } : {}), errors, mounts };
}
