// The process's one set of SIGTERM/SIGINT/SIGHUP handlers, installed before anything
// else is loaded (bin/nasbackup, the bundle's entry): a signal that arrives while the
// program is still starting is kept, not fatal, and handed to the operation as soon as
// it subscribes; it then stops cleanly and says so on stdout. Deliberately tiny and
// free of imports, so installing it costs nothing.

export const TERMINATING_SIGNALS: readonly NodeJS.Signals[] = ['SIGTERM', 'SIGINT', 'SIGHUP'];

type Handler = (signal: NodeJS.Signals) => void;

let installed = false;
let pending: NodeJS.Signals | null = null;
const handlers = new Set<Handler>();

function deliver(signal: NodeJS.Signals): void {
  if (handlers.size === 0) {
    pending ??= signal; // nobody listening yet (start-up) or any more (reporting): keep it
    return;
  }
  for (const h of [...handlers]) h(signal);
}

/** Catch the terminating signals from now on (idempotent). */
export function installSignalHandlers(): void {
  if (installed) return;
  installed = true;
  for (const s of TERMINATING_SIGNALS) process.on(s, deliver);
}

/**
 * Receive the terminating signals; one that arrived before (while starting) is handed
 * over at once. Returns the unsubscribe function.
 */
export function onTerminatingSignal(handler: Handler): () => void {
  installSignalHandlers();
  handlers.add(handler);
  if (pending) {
    const s = pending;
    pending = null;
    handler(s);
  }
  return () => {
    handlers.delete(handler);
  };
}

/**
 * Give the signals back their default action (commands that do not run under the
 * operation lifecycle): a signal kept while starting takes effect now.
 */
export function restoreDefaultSignals(): void {
  if (!installed) return;
  installed = false;
  for (const s of TERMINATING_SIGNALS) process.off(s, deliver);
  if (pending) process.kill(process.pid, pending);
}
