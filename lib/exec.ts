// The one way this program starts another program: argv arrays (never a shell that
// parses our values: the one shell, the NAS watch, runs a constant script),
// a deadline on every call, cancellation on SIGTERM/SIGINT, and one log line per
// call with exit code and duration.
import { spawn, type ChildProcess } from 'node:child_process';
import { accessSync, closeSync, constants as fsConstants, openSync, readFileSync, statSync } from 'node:fs';
import type { Logger } from './log.js';

export interface RunOptions {
  timeoutMs: number;
  /** false: not cancelled by the run-wide abort (used by cleanup, which must still run). */
  abortable?: boolean;
  env?: NodeJS.ProcessEnv;
  /**
   * Start it in its own process group (signals sent to ours do not reach it). Every
   * child is now (see spawnBounded); kept so callers can say it matters to them.
   */
  ownProcessGroup?: boolean;
  /**
   * Not bound to our life (no pdeathsig): a step that would leave damage if stopped
   * halfway (qemu-img rebase is not crash-safe) finishes even if we are SIGKILLed.
   * Its deadline still applies while we live.
   */
  finishIfWeDie?: boolean;
  /**
   * The program leaves a daemon behind on purpose (`qemu-nbd --fork`, `setsid -f`): its
   * output goes to this file instead of pipes the daemon would keep open, and only the
   * starter's exit is waited for (the daemon is in a session of its own, no longer our child).
   */
  daemonLog?: string;
  /** Working folder of the child (a daemon gets `/`, so it holds no filesystem busy). */
  cwd?: string;
}

export interface RunResult {
  command: string;
  args: readonly string[];
  exitCode: number | null;
  signal: string | null;
  stdout: string;
  stderr: string;
  timedOut: boolean;
  canceled: boolean;
  /** Set when the program could not be started at all (e.g. ENOENT). */
  spawnError: string | null;
  durationMs: number;
}

export const succeeded = (r: RunResult | undefined): boolean =>
  r !== undefined && r.exitCode === 0 && !r.timedOut && !r.canceled && r.spawnError === null;

/** Short text for messages: why a call failed, in one line. */
export function describeFailure(r: RunResult): string {
  if (r.spawnError) return `could not run ${r.command}: ${r.spawnError}`;
  if (r.timedOut) return `${r.command} timed out after ${Math.round(r.durationMs / 1000)} s`;
  if (r.canceled) return `${r.command} was interrupted`;
  if (r.signal) return `${r.command} was killed by ${r.signal}`;
  return `${r.command} exited with code ${r.exitCode}`;
}

/** The tool's own error text (stderr, else stdout), or why it failed when it said nothing. */
export function failureText(r: RunResult): string {
  return r.stderr.trim() || r.stdout.trim() || describeFailure(r);
}

// Mount options may carry CIFS credentials; they must not reach the agent log.
const SECRET = /\b(password|pass|passwd|secret|credentials|key)=([^,\s]*)/gi;
export function redact(text: string): string {
  return text.replace(SECRET, '$1=***');
}

/** After the kill, how long the pipes and the exit may still take before we stop waiting. */
const KILL_GRACE_MS = 5000;
/** After a normal exit, how long a leftover holder of our pipes may keep them open. */
const PIPE_GRACE_MS = 1000;
const MAX_OUTPUT = 64 * 1024 * 1024;

/** An executable path for `command` on `path`, or null (so a missing program stays ENOENT). */
export function resolveProgram(command: string, path: string | undefined): string | null {
  const ok = (p: string): boolean => {
    try {
      accessSync(p, fsConstants.X_OK);
      return statSync(p).isFile();
    } catch {
      return false;
    }
  };
  if (command.includes('/')) return ok(command) ? command : null;
  for (const dir of (path ?? '').split(':')) {
    if (dir === '') continue;
    const p = `${dir}/${command}`;
    if (ok(p)) return p;
  }
  return null;
}

let setprivPath: string | null | undefined;
/** util-linux `setpriv`, which makes the kernel kill a child when we die (PR_SET_PDEATHSIG). */
function setpriv(): string | null {
  if (setprivPath === undefined) setprivPath = resolveProgram('setpriv', '/usr/bin:/bin:/usr/sbin:/sbin');
  return setprivPath;
}

/**
 * A child bound to us (pdeathsig: it dies the moment we are gone) that SIGKILLs us if we
 * are still here after `ms` (see NasWatch.guardExit). Without setpriv there is no guard:
 * it could outlive us.
 */
export function spawnExitGuard(ms: number): void {
  const guard = setpriv();
  if (!guard) return;
  const kill = `setTimeout(() => { try { process.kill(${process.pid}, 'SIGKILL') } catch {} }, ${ms})`;
  try {
    spawn(guard, ['--pdeathsig', 'KILL', '--', process.execPath, '-e', kill], { detached: true, stdio: 'ignore' }).unref();
  } catch {
    // no guard: the exit may wait on the NAS
  }
}

/** A helper process that lives as long as we do (see spawnWatchdog). */
export interface Watchdog {
  /** Kill it and everything it started (its process group); no line is reported after this. */
  stop(): void;
}

/**
 * A long-lived helper: `sh -c script` with `args` as $1…, in its own process group, bound
 * to us (pdeathsig; the script should also end when its parent is gone, for hosts without
 * setpriv). The script is a constant of ours and the values only ever positional
 * parameters, so no value is ever parsed as shell text. Each line it prints is handed to
 * `onLine`, and its end to `onExit` unless we stopped it; it never keeps the process alive.
 * Null when it cannot be started.
 */
export function spawnWatchdog(
  script: string,
  args: readonly string[],
  onLine: (line: string) => void,
  onExit: (code: number | null) => void = () => {},
): Watchdog | null {
  const sh = resolveProgram('sh', '/bin:/usr/bin');
  if (sh === null) return null;
  const guard = setpriv();
  const argv = [sh, '-c', script, 'nasbackup-watch', ...args];
  let child: ChildProcess;
  try {
    child = guard
      ? spawn(guard, ['--pdeathsig', 'KILL', '--', ...argv], { detached: true, stdio: ['ignore', 'pipe', 'ignore'] })
      : spawn(argv[0]!, argv.slice(1), { detached: true, stdio: ['ignore', 'pipe', 'ignore'] });
  } catch {
    return null;
  }
  let stopped = false;
  let pending = '';
  child.on('error', () => {}); // could not start: 'exit' says so (code null)
  child.on('exit', (code) => {
    if (!stopped) onExit(code);
  });
  child.stdout!.setEncoding('utf8');
  child.stdout!.on('data', (d: string) => {
    pending += d;
    let nl: number;
    while (!stopped && (nl = pending.indexOf('\n')) >= 0) {
      const line = pending.slice(0, nl);
      pending = pending.slice(nl + 1);
      onLine(line);
    }
  });
  child.unref();
  (child.stdout as unknown as { unref?: () => void }).unref?.();
  return {
    stop: () => {
      if (stopped) return;
      stopped = true;
      if (child.pid !== undefined && child.exitCode === null && child.signalCode === null) {
        try {
          process.kill(-child.pid, 'SIGKILL');
        } catch {
          // already gone
        }
      }
      child.stdout!.destroy();
    },
  };
}

export class Runner {
  constructor(
    private readonly logger: Logger,
    private readonly abort: AbortSignal | undefined = undefined,
  ) {}

  get aborted(): boolean {
    return this.abort?.aborted ?? false;
  }

  async run(command: string, args: readonly string[], opts: RunOptions): Promise<RunResult> {
    const useAbort = opts.abortable !== false && this.abort !== undefined;
    const started = process.hrtime.bigint();
    const r = await spawnBounded(command, args, opts, useAbort && this.abort ? [this.abort] : []);
    const result: RunResult = { command, args, ...r, durationMs: Number(process.hrtime.bigint() - started) / 1e6 };
    const status = succeeded(result) ? 'exit 0' : describeFailure(result);
    this.logger.log(redact(`exec: ${[command, ...args].map(quoteForLog).join(' ')} -> ${status} (${result.durationMs.toFixed(0)} ms)`));
    return result;
  }
}

type Outcome = Omit<RunResult, 'command' | 'args' | 'durationMs'>;

/**
 * Start one child in its own process group, under `setpriv --pdeathsig KILL` when the
 * host has it (the child dies with us, even on our SIGKILL). On the deadline or on
 * cancellation the whole group gets SIGTERM, then SIGKILL, so a helper the child
 * started (mount.nfs under mount) goes too; and we never wait for the pipes or the
 * exit longer than a short grace after that (a process stuck in the kernel is left).
 */
function spawnBounded(command: string, args: readonly string[], opts: RunOptions, aborts: AbortSignal[]): Promise<Outcome> {
  const env = opts.env ?? process.env;
  const base: Outcome = { exitCode: null, signal: null, stdout: '', stderr: '', timedOut: false, canceled: false, spawnError: null };
  if (aborts.some((a) => a.aborted)) return Promise.resolve({ ...base, canceled: true });
  const program = resolveProgram(command, env.PATH);
  if (program === null) return Promise.resolve({ ...base, spawnError: 'ENOENT' });
  const guard = opts.finishIfWeDie ? null : setpriv();
  const [file, argv] = guard ? [guard, ['--pdeathsig', 'KILL', '--', program, ...args]] : [program, [...args]];

  return new Promise<Outcome>((resolve) => {
    let child: ChildProcess;
    const daemon = opts.daemonLog !== undefined;
    let logFd: number | null = null;
    try {
      if (daemon) logFd = openSync(opts.daemonLog!, 'a', 0o600);
      const out = logFd ?? 'pipe';
      child = spawn(file, argv, { detached: true, stdio: ['ignore', out, out], env, ...(opts.cwd !== undefined ? { cwd: opts.cwd } : {}) });
    } catch (e) {
      resolve({ ...base, spawnError: (e as NodeJS.ErrnoException).code ?? (e as Error).message });
      return;
    } finally {
      if (logFd !== null) closeSync(logFd); // the child has its own copy; the file is read back at the end
    }
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    let size = 0;
    const collect = (into: Buffer[]) => (d: Buffer) => {
      if (size + d.length > MAX_OUTPUT) return; // keep the first 64 MiB; the rest is not read by anyone
      size += d.length;
      into.push(d);
    };
    child.stdout?.on('data', collect(out));
    child.stderr?.on('data', collect(err));

    let timedOut = false;
    let canceled = false;
    let exit: { code: number | null; signal: string | null } | null = null;
    let spawnError: string | null = null;
    let settled = false;
    const timers: NodeJS.Timeout[] = [];

    const killGroup = (sig: NodeJS.Signals): void => {
      if (child.pid === undefined) return;
      try {
        process.kill(-child.pid, sig);
      } catch {
        // the group is gone already
      }
    };
    const finish = (): void => {
      if (settled) return;
      settled = true;
      for (const t of timers) clearTimeout(t);
      for (const a of aborts) a.removeEventListener('abort', onAbort);
      child.stdout?.destroy();
      child.stderr?.destroy();
      child.unref();
      resolve({
        exitCode: exit?.code ?? null,
        // A child we gave up on after SIGKILL (stuck in the kernel) counts as killed.
        signal: exit?.signal ?? (exit === null && spawnError === null ? 'SIGKILL' : null),
        stdout: Buffer.concat(out).toString('utf8'),
        stderr: daemon ? readLog(opts.daemonLog!) : Buffer.concat(err).toString('utf8'),
        timedOut,
        canceled,
        spawnError,
      });
    };
    const stop = (): void => {
      killGroup('SIGTERM');
      timers.push(
        setTimeout(() => {
          killGroup('SIGKILL');
          timers.push(setTimeout(finish, KILL_GRACE_MS)); // do not wait on pipes or exit any longer
        }, KILL_GRACE_MS),
      );
    };
    const onAbort = (): void => {
      if (exit !== null || timedOut || canceled) return;
      canceled = true;
      stop();
    };
    for (const a of aborts) a.addEventListener('abort', onAbort, { once: true });
    timers.push(
      setTimeout(() => {
        if (exit !== null || canceled) return;
        timedOut = true;
        stop();
      }, opts.timeoutMs),
    );
    child.on('error', (e: NodeJS.ErrnoException) => {
      spawnError = e.code ?? e.message;
      finish();
    });
    child.on('exit', (code, signal) => {
      exit = { code, signal };
      if (daemon) return finish(); // no pipes; the daemon it left is not ours to kill
      // Normally the pipes close with the exit; a leftover of its group holding them
      // (a helper gone astray) is killed after a short grace rather than waited for.
      timers.push(
        setTimeout(() => {
          killGroup('SIGKILL');
          finish();
        }, PIPE_GRACE_MS),
      );
    });
    child.on('close', finish);
  });
}

function readLog(path: string): string {
  try {
    return readFileSync(path, 'utf8').slice(-MAX_LOG);
  } catch {
    return '';
  }
}
const MAX_LOG = 64 * 1024;

function quoteForLog(a: string): string {
  return a === '' ? "''" : /[\s'"\\$`]/.test(a) ? `'${a.replace(/'/g, "'\\''")}'` : a;
}
