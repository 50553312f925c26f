// Running one operation safely: signals wired to cancellation, a context that records
// every NAS session and VM lock it hands out, and — on every path — locks released,
// sessions unmounted, and failures rendered on stdout with the exit code from the table.
import type { Config } from '../config.js';
import { EXIT_OK, NasbackupError, toNasbackupError } from '../errors.js';
import { Runner } from '../exec.js';
import type { Logger } from '../log.js';
import { VmLock } from '../nas/lock.js';
import { NasSession } from '../nas/session.js';
import { NasWatch } from '../nas/watch.js';
import { ensureWithin } from '../paths.js';
import type { OpContext, Output } from '../ops/context.js';

export interface ExecuteIo {
  out: Output;
  env: NodeJS.ProcessEnv;
  /** Process-wide signal wiring; tests may pass a no-op. */
  onSignal?: (handler: (signal: NodeJS.Signals) => void) => () => void;
  /** Render failures as one JSON object instead of text (never on the agent's path). */
  json?: boolean;
}

const SIGNALS: NodeJS.Signals[] = ['SIGTERM', 'SIGINT', 'SIGHUP'];

export function processSignals(handler: (signal: NodeJS.Signals) => void): () => void {
  for (const s of SIGNALS) process.on(s, handler);
  return () => {
    for (const s of SIGNALS) process.off(s, handler);
  };
}

export async function execute(io: ExecuteIo, config: Config, logger: Logger, body: (ctx: OpContext) => Promise<void>): Promise<number> {
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
  // A NAS that stops answering abandons the body; its children are killed (abort).
  const watch = new NasWatch(() => abort.abort());
  const sessions: NasSession[] = [];
  const locks: VmLock[] = [];
  const ctx: OpContext = {
    runner,
    logger,
    config,
    env: io.env,
    out: io.out,
    openNas: (target) => NasSession.open(target, { runner, config, logger, watch }, (s) => sessions.push(s)),
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
      if (interruptedBy) throw new NasbackupError('INTERRUPTED', `Interrupted by ${interruptedBy}`);
    },
  };

  let failure: NasbackupError | null = null;
  try {
    await watch.race(body(ctx));
    ctx.checkpoint();
  } catch (e) {
    failure = toNasbackupError(e);
    if (interruptedBy && failure.code !== 'INTERRUPTED') {
      failure = new NasbackupError('INTERRUPTED', `Interrupted by ${interruptedBy}`, { details: failure.toText() });
    }
  }

  const cleanupErrors: NasbackupError[] = [];
  // A lock on a NAS that does not answer cannot be removed; the next run breaks it (its pid is dead).
  if (watch.unresponsive) logger.log(`Leaving ${locks.length} VM lock(s) on the unresponsive NAS`);
  else for (const l of locks.reverse()) await watch.race(l.release()).catch(() => {});
  for (const s of sessions.reverse()) {
    try {
      await s.close();
    } catch (e) {
      cleanupErrors.push(toNasbackupError(e));
    }
  }
  unhook();
  if (watch.unresponsive) watch.guardExit();

  let code = EXIT_OK;
  if (io.json) {
    const errors = [failure, ...cleanupErrors].filter((e): e is NasbackupError => e !== null);
    for (const e of errors) logger.log(`ERROR [${e.code}] ${e.message}`);
    const unreported = errors.filter((e) => !e.reported);
    if (unreported.length > 0) io.out.write(JSON.stringify({ ok: false, errors: unreported.map((e) => e.toJSON()) }) + '\n');
    return errors.reduce((c, e) => (e.code === 'NAS_CLEANUP_FAILED' ? e.exitCode : c || e.exitCode), EXIT_OK);
  }
  if (failure) {
    io.out.write(failure.toText());
    logger.log(`ERROR [${failure.code}] ${failure.message}${failure.details ? `\n${failure.details}` : ''}`);
    code = failure.exitCode;
  }
  for (const c of cleanupErrors) {
    io.out.write(c.toText());
    logger.log(`ERROR [${c.code}] ${c.message}`);
    code = c.exitCode; // leftovers outrank the operation's own failure: the agent must clean up
  }
  return code;
}

