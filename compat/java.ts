// The few pieces of Java's standard library whose exact behaviour decides what the
// agent sends: String.trim/split, Long.parseLong, BufferedReader.readLine, and
// commons-lang StringUtils.isBlank. JavaScript's own trim/split differ in ways that
// matter here (Unicode whitespace, trailing empty strings, Unicode digits).

export const LONG_MIN = -(1n << 63n);
export const LONG_MAX = (1n << 63n) - 1n;
export const INT_MIN = -(2 ** 31);
export const INT_MAX = 2 ** 31 - 1;

/** Java `long` arithmetic wraps silently. */
export const wrapLong = (x: bigint): bigint => BigInt.asIntN(64, x);

/** A Java exception as the agent would see it: class name and getMessage(). */
export class JavaException {
  constructor(
    readonly className: string,
    readonly message: string | null,
  ) {}

  /** Throwable.toString(): the first line of a stack trace. */
  toString(): string {
    return this.message === null ? this.className : `${this.className}: ${this.message}`;
  }

  /** printStackTrace() text with one frame naming where it was thrown (no line numbers known). */
  stackTrace(frameClass: string, method = 'execute'): string {
    const file = `${frameClass.slice(frameClass.lastIndexOf('.') + 1)}.java`;
    return `${this.toString()}\n\tat ${frameClass}.${method}(${file})\n`;
  }
}

export const numberFormat = (s: string): JavaException => new JavaException('java.lang.NumberFormatException', `For input string: "${s}"`);

export const indexOutOfBounds = (index: number, length: number, array = true): JavaException =>
  new JavaException(
    array ? 'java.lang.ArrayIndexOutOfBoundsException' : 'java.lang.IndexOutOfBoundsException',
    `Index ${index} out of bounds for length ${length}`,
  );

export const nullPointer = (): JavaException => new JavaException('java.lang.NullPointerException', null);

/** String.trim(): strips every char <= U+0020 at both ends, nothing else (no NBSP, no U+2028). */
export function javaTrim(s: string): string {
  let a = 0;
  let b = s.length;
  while (a < b && s.charCodeAt(a) <= 0x20) a++;
  while (b > a && s.charCodeAt(b - 1) <= 0x20) b--;
  return s.slice(a, b);
}

/** Java's String.split result shaping: limit 0 drops trailing empty strings; no match gives [s]. */
function shape(parts: string[], limit: number): string[] {
  if (parts.length === 1) return parts; // no match: the input itself, even ""
  if (limit === 0) {
    let n = parts.length;
    while (n > 0 && parts[n - 1] === '') n--;
    return parts.slice(0, n);
  }
  return parts;
}

/** String.split(sep) / split(sep, -1) for a literal separator (the wrappers use "\n" and " "). */
export function javaSplit(s: string, sep: string, limit: 0 | -1 = 0): string[] {
  return shape(s.split(sep), limit);
}

/** String.split("\\s+"): Java's \s is [ \t\n\x0B\f\r] only. */
export function javaSplitWhitespace(s: string): string[] {
  // eslint-disable-next-line no-control-regex -- \x0B is part of Java's \s, on purpose
  return shape(s.split(/[ \t\n\x0B\f\r]+/), 0);
}

const ND = /\p{Nd}/u;

/** Character.digit(char, 10): any BMP decimal digit (Unicode Nd), not only ASCII. */
function digit(unit: number): number {
  if (unit >= 0x30 && unit <= 0x39) return unit - 0x30;
  if (unit >= 0xd800 && unit <= 0xdfff) return -1; // a lone half of a pair is never a digit
  if (!ND.test(String.fromCharCode(unit))) return -1;
  // Nd characters come in aligned runs of ten starting at zero.
  let start = unit;
  while (start > 0 && ND.test(String.fromCharCode(start - 1))) start--;
  return (unit - start) % 10;
}

/** Long.parseLong(s): optional sign, decimal digits, range-checked. Throws a JavaException. */
export function parseLong(s: string): bigint {
  const len = s.length;
  if (len === 0) throw numberFormat(s);
  let i = 0;
  let negative = false;
  const first = s.charCodeAt(0);
  if (first < 0x30) {
    if (first === 0x2d) negative = true;
    else if (first !== 0x2b) throw numberFormat(s);
    if (len === 1) throw numberFormat(s);
    i = 1;
  }
  let acc = 0n;
  for (; i < len; i++) {
    const d = digit(s.charCodeAt(i));
    if (d < 0) throw numberFormat(s);
    acc = acc * 10n + BigInt(d);
    if (acc > LONG_MAX + 1n) throw numberFormat(s);
  }
  const v = negative ? -acc : acc;
  if (v < LONG_MIN || v > LONG_MAX) throw numberFormat(s);
  return v;
}

/** Integer.parseInt(s) (named so it never shadows the global parseInt): the same syntax as parseLong ("+1" and Unicode digits parse, " 1" does not), within 32 bits. */
export function parseJavaInt(s: string): number {
  const v = parseLong(s);
  if (v < BigInt(INT_MIN) || v > BigInt(INT_MAX)) throw numberFormat(s);
  return Number(v);
}

/**
 * What Script.executePipedCommands returns for a process's stdout: every line as
 * BufferedReader.readLine sees it (terminated by \n, \r or \r\n) followed by "\n".
 */
export function pipedStdout(raw: string): string {
  if (raw === '') return '';
  const lines = raw.split(/\r\n|\r|\n/);
  if (lines[lines.length - 1] === '') lines.pop();
  return lines.map((l) => `${l}\n`).join('');
}

/** Character.isWhitespace (used by StringUtils.isBlank): not the no-break spaces. */
function isJavaWhitespace(unit: number): boolean {
  if ((unit >= 0x09 && unit <= 0x0d) || (unit >= 0x1c && unit <= 0x20)) return true;
  if (unit === 0xa0 || unit === 0x2007 || unit === 0x202f) return false;
  return /[\p{Zs}\p{Zl}\p{Zp}]/u.test(String.fromCharCode(unit));
}

/** commons-lang3 StringUtils.isBlank. */
export function isBlank(s: string | null | undefined): boolean {
  if (s === null || s === undefined) return true;
  for (let i = 0; i < s.length; i++) if (!isJavaWhitespace(s.charCodeAt(i))) return false;
  return true;
}

/** `s != null && !s.isEmpty()`. */
export const isNotEmpty = (s: string | null | undefined): s is string => s !== null && s !== undefined && s !== '';

/** String.join(",", list): a null element becomes "null". */
export const javaJoin = (sep: string, items: ReadonlyArray<string | null>): string => items.map((x) => (x === null ? 'null' : x)).join(sep);
