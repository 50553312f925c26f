// A small strict JSON reader for the wire format. JSON.parse is not enough here:
// Gson writes Java longs as plain numbers (sizes can pass 2^53), and object key
// order is part of what we compare byte for byte (a plain JS object reorders
// integer-like keys). So objects are ordered Maps and big integers are bigints.
import { CompatError } from './errors.js';

export type JsonValue = null | boolean | number | bigint | string | JsonValue[] | JsonObject;
export type JsonObject = Map<string, JsonValue>;

export const isJsonObject = (v: JsonValue | undefined): v is JsonObject => v instanceof Map;

/** Nesting deeper than this is refused rather than risking the stack on hostile input. */
const MAX_DEPTH = 256;
const NUMBER = /-?(?:0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?/y;

class Reader {
  pos = 0;
  constructor(private readonly s: string) {}

  fail(what: string): never {
    const at = this.pos < this.s.length ? `at offset ${this.pos}` : 'at end of input';
    throw new CompatError('MALFORMED_JSON', `Malformed JSON ${at}: ${what}`);
  }

  ws(): void {
    while (this.pos < this.s.length) {
      const c = this.s.charCodeAt(this.pos);
      if (c === 0x20 || c === 0x09 || c === 0x0a || c === 0x0d) this.pos++;
      else break;
    }
  }

  value(depth: number): JsonValue {
    if (depth > MAX_DEPTH) this.fail(`nesting deeper than ${MAX_DEPTH}`);
    this.ws();
    const c = this.s[this.pos];
    switch (c) {
      case '{':
        return this.object(depth);
      case '[':
        return this.array(depth);
      case '"':
        return this.string();
      case 't':
        return this.literal('true', true);
      case 'f':
        return this.literal('false', false);
      case 'n':
        return this.literal('null', null);
      default:
        if (c === '-' || (c !== undefined && c >= '0' && c <= '9')) return this.number();
        return this.fail(c === undefined ? 'unexpected end of input' : `unexpected character ${JSON.stringify(c)}`);
    }
  }

  literal<T extends JsonValue>(word: string, v: T): T {
    if (this.s.startsWith(word, this.pos)) {
      this.pos += word.length;
      return v;
    }
    return this.fail(`expected ${word}`);
  }

  number(): number | bigint {
    NUMBER.lastIndex = this.pos;
    const m = NUMBER.exec(this.s);
    if (!m) return this.fail('invalid number');
    this.pos += m[0].length;
    if (m[1] === undefined && m[2] === undefined) {
      const big = BigInt(m[0]);
      // Keep small integers as numbers (ergonomic), big ones exact.
      return big >= BigInt(Number.MIN_SAFE_INTEGER) && big <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(big) : big;
    }
    return Number(m[0]);
  }

  string(): string {
    this.pos++; // opening quote
    let out = '';
    let run = this.pos;
    for (;;) {
      if (this.pos >= this.s.length) this.fail('unterminated string');
      const c = this.s.charCodeAt(this.pos);
      if (c === 0x22) {
        out += this.s.slice(run, this.pos);
        this.pos++;
        return out;
      }
      if (c < 0x20) this.fail('unescaped control character in string');
      if (c !== 0x5c) {
        this.pos++;
        continue;
      }
      out += this.s.slice(run, this.pos);
      const e = this.s[this.pos + 1];
      this.pos += 2;
      switch (e) {
        case '"':
          out += '"';
          break;
        case '\\':
          out += '\\';
          break;
        case '/':
          out += '/';
          break;
        case 'b':
          out += '\b';
          break;
        case 'f':
          out += '\f';
          break;
        case 'n':
          out += '\n';
          break;
        case 'r':
          out += '\r';
          break;
        case 't':
          out += '\t';
          break;
        case 'u': {
          const hex = this.s.slice(this.pos, this.pos + 4);
          if (!/^[0-9a-fA-F]{4}$/.test(hex)) this.fail('invalid \\u escape');
          out += String.fromCharCode(parseInt(hex, 16));
          this.pos += 4;
          break;
        }
        default:
          this.pos -= 2;
          this.fail('invalid escape sequence');
      }
      run = this.pos;
    }
  }

  array(depth: number): JsonValue[] {
    this.pos++;
    const out: JsonValue[] = [];
    this.ws();
    if (this.s[this.pos] === ']') {
      this.pos++;
      return out;
    }
    for (;;) {
      out.push(this.value(depth + 1));
      this.ws();
      const c = this.s[this.pos];
      if (c === ',') {
        this.pos++;
        continue;
      }
      if (c === ']') {
        this.pos++;
        return out;
      }
      this.fail("expected ',' or ']'");
    }
  }

  object(depth: number): JsonObject {
    this.pos++;
    const out: JsonObject = new Map();
    this.ws();
    if (this.s[this.pos] === '}') {
      this.pos++;
      return out;
    }
    for (;;) {
      this.ws();
      if (this.s[this.pos] !== '"') this.fail('expected a member name');
      const key = this.string();
      this.ws();
      if (this.s[this.pos] !== ':') this.fail("expected ':'");
      this.pos++;
      out.set(key, this.value(depth + 1)); // a repeated name: the last value wins, like Gson's field binding
      this.ws();
      const c = this.s[this.pos];
      if (c === ',') {
        this.pos++;
        continue;
      }
      if (c === '}') {
        this.pos++;
        return out;
      }
      this.fail("expected ',' or '}'");
    }
  }
}

/** Parse one JSON document (a leading BOM is tolerated). Throws CompatError('MALFORMED_JSON'). */
export function parseJson(text: string): JsonValue {
  const body = text.charCodeAt(0) === 0xfeff ? text.slice(1) : text;
  const r = new Reader(body);
  const v = r.value(0);
  r.ws();
  if (r.pos !== body.length) r.fail('trailing data after the JSON value');
  return v;
}

/** Short type name for messages, in Gson's vocabulary. */
export function jsonTypeName(v: JsonValue): string {
  if (v === null) return 'NULL';
  if (typeof v === 'boolean') return 'BOOLEAN';
  if (typeof v === 'number' || typeof v === 'bigint') return 'NUMBER';
  if (typeof v === 'string') return 'STRING';
  if (Array.isArray(v)) return 'BEGIN_ARRAY';
  return 'BEGIN_OBJECT';
}
