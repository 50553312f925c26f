// The one way this program starts another program: argv arrays (never a shell),
// a deadline on every call, cancellation on SIGTERM/SIGINT, and one log line per
// call with exit code and duration.
import type { Logger } from './log.js';

export interface RunOptions {
  timeoutMs: number;
  /** false: not cancelled by the run-wide abort (used by cleanup, which must still run). */
  abortable?: boolean;
  env?: NodeJS.ProcessEnv;
  /** Start it in its own process group (signals sent to ours do not reach it). */
  ownProcessGroup?: boolean;
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

export class Runner {
  constructor(
    private readonly logger: Logger,
    private readonly abort: AbortSignal | undefined = undefined,
  ) {}

  get aborted(): boolean {
    return this.abort?.aborted ?? false;
  }

  async run(command: string, args: readonly string[], opts: RunOptions): Promise<RunResult> {
    const { execa } = await import('execa'); // lazy: keeps start-up light for --help and errors
    const useAbort = opts.abortable !== false && this.abort !== undefined;
    const started = process.hrtime.bigint();
    const r = await execa(command, args, {
      reject: false,
      stdin: 'ignore',
      stripFinalNewline: false,
      timeout: opts.timeoutMs,
      forceKillAfterDelay: 5000,
      ...(useAbort ? { cancelSignal: this.abort } : {}),
      ...(opts.ownProcessGroup ? { detached: true } : {}),
      env: opts.env ?? process.env,
      extendEnv: false,
      encoding: 'utf8',
      maxBuffer: 64 * 1024 * 1024,
    });
    const durationMs = Number(process.hrtime.bigint() - started) / 1e6;
    const err = r as unknown as { code?: string; originalMessage?: string };
    const spawnError =
      r.exitCode === undefined && !r.timedOut && !r.isCanceled && r.signal === undefined
        ? (err.code ?? err.originalMessage ?? 'failed to start')
        : null;
    const result: RunResult = {
      command,
      args,
      exitCode: r.exitCode ?? null,
      signal: r.signal ?? null,
      stdout: typeof r.stdout === 'string' ? r.stdout : '',
      stderr: typeof r.stderr === 'string' ? r.stderr : '',
      timedOut: r.timedOut,
      canceled: r.isCanceled,
      spawnError,
      durationMs,
    };
    const status = succeeded(result) ? 'exit 0' : describeFailure(result);
    this.logger.log(
      redact(`exec: ${[command, ...args].map(quoteForLog).join(' ')} -> ${status} (${durationMs.toFixed(0)} ms)`),
    );
    return result;
  }
}

function quoteForLog(a: string): string {
  return a === '' ? "''" : /[\s'"\\$`]/.test(a) ? `'${a.replace(/'/g, "'\\''")}'` : a;
}
