// Node decodes argv as UTF-8 and silently replaces invalid bytes with U+FFFD, so
// `-p $'i-2/\xff'` would reach us as another, possibly existing, name. The kernel's
// copy of argv (/proc/self/cmdline) holds the real bytes: every argument must round-trip.
import { readFileSync } from 'node:fs';

export interface LossyArgument {
  /** 0-based index into the program's own arguments (process.argv.slice(2)). */
  index: number;
  /** The bytes as given, printable ASCII kept and everything else as \xHH. */
  shown: string;
}

/** The first argument whose bytes are not what Node decoded, or null (also when /proc is unreadable). */
export function findLossyArgument(args: readonly string[], cmdline?: Buffer): LossyArgument | null {
  let raw: Buffer;
  try {
    raw = cmdline ?? readFileSync('/proc/self/cmdline');
  } catch {
    return null; // no /proc: nothing to compare against
  }
  const parts: Buffer[] = [];
  let from = 0;
  for (let i = 0; i < raw.length; i++) {
    if (raw[i] === 0) {
      parts.push(raw.subarray(from, i));
      from = i + 1;
    }
  }
  if (from < raw.length) parts.push(raw.subarray(from));
  // Our arguments are the last ones (before them: node, its options, the script).
  if (parts.length < args.length) return null;
  const ours = parts.slice(parts.length - args.length);
  for (const [index, arg] of args.entries()) {
    const bytes = ours[index]!;
    if (!Buffer.from(arg, 'utf8').equals(bytes)) return { index, shown: showBytes(bytes) };
  }
  return null;
}

function showBytes(b: Buffer): string {
  let s = '';
  for (const c of b) s += c >= 0x20 && c < 0x7f && c !== 0x5c ? String.fromCharCode(c) : `\\x${c.toString(16).padStart(2, '0')}`;
  return s;
}

/** The one-line refusal, naming the option the value belongs to when there is one. */
export function lossyArgumentMessage(args: readonly string[], bad: LossyArgument): string {
  const prev = bad.index > 0 ? args[bad.index - 1]! : '';
  const what = /^--?[A-Za-z]/.test(prev) && !/[^\x20-\x7e]/.test(prev) ? `The value of ${prev}` : `Argument ${bad.index + 1}`;
  return `${what} is not valid UTF-8 ("${bad.shown}"); refusing to guess the name it means`;
}
