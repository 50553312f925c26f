// Append-only log in the original script's line format: `YYYY-MM-DD HH-MM-SS> message`.
// Logging must never make an operation fail: every error here is swallowed.
import { appendFileSync, mkdirSync } from 'node:fs';
import { dirname } from 'node:path';

export const DEFAULT_LOG_FILE = '/var/log/cloudstack/agent/agent.log';

const pad = (n: number, w = 2): string => String(n).padStart(w, '0');

/** Local time, hyphens in the time part (the original uses `date '+%Y-%m-%d %H-%M-%S'`). */
export function formatTimestamp(d: Date): string {
  return (
    `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
    `${pad(d.getHours())}-${pad(d.getMinutes())}-${pad(d.getSeconds())}`
  );
}

/** One log record per line of `message`, each with the timestamp prefix. */
export function formatLogLines(message: string, now: Date = new Date()): string {
  const ts = formatTimestamp(now);
  const lines = message.replace(/\n+$/, '').split('\n');
  return lines.map((l) => `${ts}> ${l}\n`).join('');
}

export interface Logger {
  readonly file: string;
  log(message: string): void;
}

export function logFileFromEnv(env: NodeJS.ProcessEnv = process.env): string {
  return env.NASBACKUP_LOG_FILE || DEFAULT_LOG_FILE;
}

export function createLogger(file: string = logFileFromEnv()): Logger {
  let disabled = false;
  return {
    file,
    log(message: string): void {
      if (disabled) return;
      const data = formatLogLines(message);
      try {
        appendFileSync(file, data);
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== 'ENOENT') {
          disabled = true;
          return;
        }
        try {
          mkdirSync(dirname(file), { recursive: true });
          appendFileSync(file, data);
        } catch {
          disabled = true; // unwritable: skip logging for the rest of the run
        }
      }
    },
  };
}

/** A logger that records into memory (tests, dry runs). */
export function memoryLogger(): Logger & { lines: string[] } {
  const lines: string[] = [];
  return {
    file: '<memory>',
    lines,
    log(message: string) {
      lines.push(...message.replace(/\n+$/, '').split('\n'));
    },
  };
}
