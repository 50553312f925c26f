// Append-only log in the original script's line format: `YYYY-MM-DD HH-MM-SS> message`.
// Logging must never make an operation fail, nor block it: every error here is swallowed,
// the file is opened non-blocking (a FIFO without a reader is refused, not waited for),
// only regular files and character devices are written, and missing folders are created
// with one mkdir each (Node's recursive mkdir spins forever under /proc).
import { closeSync, constants, fstatSync, mkdirSync, openSync, writeSync } from 'node:fs';
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

const OPEN_FLAGS = constants.O_WRONLY | constants.O_APPEND | constants.O_CREAT | constants.O_NONBLOCK | constants.O_NOCTTY;

/** Append without ever waiting on the file's kind (FIFO, socket): those are refused. */
function append(file: string, data: string): void {
  const fd = openSync(file, OPEN_FLAGS, 0o644);
  try {
    const st = fstatSync(fd);
    if (!st.isFile() && !st.isCharacterDevice()) throw new Error(`${file} is not a regular file`);
    const buf = Buffer.from(data);
    for (let off = 0; off < buf.length;) off += writeSync(fd, buf, off);
  } finally {
    closeSync(fd);
  }
}

/** mkdir -p with one attempt per level, at most `depth` levels. */
function makeDirs(dir: string, depth: number): void {
  try {
    mkdirSync(dir, { mode: 0o755 });
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'EEXIST') return;
    if (code !== 'ENOENT' || depth <= 0 || dirname(dir) === dir) throw e;
    makeDirs(dirname(dir), depth - 1);
    mkdirSync(dir, { mode: 0o755 }); // once more; if it still fails, give up
  }
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
        append(file, data);
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== 'ENOENT') {
          disabled = true;
          return;
        }
        try {
          makeDirs(dirname(file), 16);
          append(file, data);
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
