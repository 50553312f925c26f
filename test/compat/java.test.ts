// The Java library behaviour the wrappers' parsing depends on.
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { isBlank, javaSplit, javaSplitWhitespace, javaTrim, JavaException, parseLong, pipedStdout } from '../../compat/index.js';

describe('String.trim', () => {
  it.each([
    [' \t\r\n a b \u0000\u001f', 'a b'],
    ['\u00a0x\u00a0', '\u00a0x\u00a0'], // NBSP is not <= U+0020
    ['\u2028x', '\u2028x'],
    ['', ''],
  ])('%j -> %j', (input, out) => expect(javaTrim(input)).toBe(out));
});

describe('String.split', () => {
  it.each<[string, string, 0 | -1, string[]]>([
    ['a\nb\n\n', '\n', 0, ['a', 'b']],
    ['a\nb\n\n', '\n', -1, ['a', 'b', '', '']],
    ['', '\n', 0, ['']],
    ['\n\n', '\n', 0, []],
    [' x y', ' ', 0, ['', 'x', 'y']],
    ['   ', ' ', 0, []],
    ['917504', ' ', 0, ['917504']],
  ])('%j split %j (limit %d)', (s, sep, limit, out) => expect(javaSplit(s, sep, limit)).toEqual(out));

  it('\\s+ is ASCII whitespace only, leading empty token kept', () => {
    expect(javaSplitWhitespace('/tmp/csbackup.Ab3xZ\n104857600 52428800\n')).toEqual(['/tmp/csbackup.Ab3xZ', '104857600', '52428800']);
    expect(javaSplitWhitespace('\nwarning\n/mp\n1 2\n')).toEqual(['', 'warning', '/mp', '1', '2']);
    expect(javaSplitWhitespace('a\u00a0b')).toEqual(['a\u00a0b']);
  });
});

describe('Long.parseLong', () => {
  it.each<[string, bigint]>([
    ['0', 0n],
    ['+17', 17n],
    ['-17', -17n],
    ['9223372036854775807', 9223372036854775807n],
    ['-9223372036854775808', -9223372036854775808n],
    ['\u0661\u0662', 12n], // Arabic-Indic digits: Character.digit accepts any Nd digit
    ['\uff19', 9n], // fullwidth nine
  ])('%j -> %s', (s, v) => expect(parseLong(s)).toBe(v));

  it.each(['', '+', '-', ' 1', '1 ', '1.0', '0x10', 'Jul', '9223372036854775808', '-9223372036854775809', '\u{1d7ce}'])(
    "%j throws NumberFormatException with Java's message",
    (s) => {
      let err: unknown;
      try {
        parseLong(s);
      } catch (e) {
        err = e;
      }
      expect(err).toBeInstanceOf(JavaException);
      expect(String(err)).toBe(`java.lang.NumberFormatException: For input string: "${s}"`);
    },
  );

  it('agrees with BigInt on every canonical decimal in range (property)', () => {
    fc.assert(
      fc.property(fc.bigInt({ min: -(2n ** 63n), max: 2n ** 63n - 1n }), (n) => {
        expect(parseLong(n.toString())).toBe(n);
      }),
    );
  });

  it('only ever returns a long or throws a JavaException (property)', () => {
    fc.assert(
      fc.property(fc.string({ unit: 'binary' }), (s) => {
        try {
          const v = parseLong(s);
          expect(v >= -(2n ** 63n) && v <= 2n ** 63n - 1n).toBe(true);
        } catch (e) {
          expect(e).toBeInstanceOf(JavaException);
        }
      }),
    );
  });
});

describe('Script.executePipedCommands stdout: readLine + "\\n"', () => {
  it.each([
    ['', ''],
    ['a', 'a\n'],
    ['a\n', 'a\n'],
    ['a\r\nb\rc\n\n', 'a\nb\nc\n\n'],
    ['\n', '\n'],
  ])('%j -> %j', (raw, out) => expect(pipedStdout(raw)).toBe(out));

  it('is idempotent (property)', () => {
    fc.assert(
      fc.property(fc.string({ unit: 'binary' }), (s) => {
        expect(pipedStdout(pipedStdout(s))).toBe(pipedStdout(s));
      }),
    );
  });
});

describe('StringUtils.isBlank', () => {
  it.each<[string | undefined, boolean]>([
    [undefined, true],
    ['', true],
    [' \t\n\u2003', true],
    ['\u00a0', false], // Character.isWhitespace excludes no-break spaces
    [' x ', false],
  ])('%j -> %s', (s, v) => expect(isBlank(s)).toBe(v));
});
