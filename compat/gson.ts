// CloudStack's wire JSON as its shared Gson instance writes it (docs/agent-contract.md §8.2):
// compact, null members omitted, HTML-safe escaping on, and Command[]/Answer[] as
// an array of one-key objects keyed by the fully-qualified class name.
import { CompatError } from './errors.js';
import { isJsonObject, jsonTypeName, parseJson, type JsonObject, type JsonValue } from './json.js';

const hex4 = (c: number): string => `\\u${c.toString(16).padStart(4, '0')}`; // Gson uses lower-case hex

/** What Gson's JsonWriter substitutes for a UTF-16 code unit, or undefined to write it as is. */
function replacement(c: number, htmlSafe: boolean): string | undefined {
  if (c < 0x20) {
    switch (c) {
      case 0x08:
        return '\\b';
      case 0x09:
        return '\\t';
      case 0x0a:
        return '\\n';
      case 0x0c:
        return '\\f';
      case 0x0d:
        return '\\r';
      default:
        return hex4(c);
    }
  }
  if (c === 0x22) return '\\"';
  if (c === 0x5c) return '\\\\';
  // JavaScript line terminators: Gson escapes them whatever the HTML setting.
  if (c === 0x2028 || c === 0x2029) return hex4(c);
  if (htmlSafe && (c === 0x3c || c === 0x3e || c === 0x26 || c === 0x3d || c === 0x27)) return hex4(c);
  return undefined; // DEL and every other non-ASCII character go out verbatim
}

/** A JSON string literal exactly as Gson's JsonWriter (htmlSafe by default, like CloudStack's Gson) writes it. */
export function gsonQuote(s: string, htmlSafe = true): string {
  let out = '"';
  let run = 0;
  for (let i = 0; i < s.length; i++) {
    const r = replacement(s.charCodeAt(i), htmlSafe);
    if (r === undefined) continue;
    out += s.slice(run, i) + r;
    run = i + 1;
  }
  return out + s.slice(run) + '"';
}

/**
 * Compact JSON in Gson's style. Object members whose value is null/undefined are
 * omitted (serializeNulls is off, for bean fields and map entries alike); nulls
 * inside arrays are kept, as Gson writes them.
 */
export function gsonStringify(v: JsonValue | undefined, htmlSafe = true): string {
  if (v === null || v === undefined) return 'null';
  if (typeof v === 'boolean') return v ? 'true' : 'false';
  if (typeof v === 'bigint') return v.toString();
  if (typeof v === 'number') {
    if (!Number.isFinite(v)) throw new CompatError('INVALID_FIELD', `Gson cannot write the number ${v}`);
    return String(v);
  }
  if (typeof v === 'string') return gsonQuote(v, htmlSafe);
  if (Array.isArray(v)) return `[${v.map((x) => gsonStringify(x, htmlSafe)).join(',')}]`;
  const parts: string[] = [];
  for (const [k, x] of v) {
    if (x === null || x === undefined) continue;
    parts.push(`${gsonQuote(k, htmlSafe)}:${gsonStringify(x, htmlSafe)}`);
  }
  return `{${parts.join(',')}}`;
}

/** One element of a Command[] / Answer[] on the wire: {"<FQCN>": {…fields…}}. */
export interface FqcnElement {
  fqcn: string;
  body: JsonObject;
}

export function encodeFqcnArray(elements: readonly FqcnElement[]): string {
  return `[${elements.map((e) => `{${gsonQuote(e.fqcn)}:${gsonStringify(e.body)}}`).join(',')}]`;
}

/**
 * Split a wire array into its elements. Structural problems (not JSON, not an
 * array, an element that is not a one-key object holding an object) fail the
 * whole request, as they fail Gson's ArrayTypeAdaptor before any class is known.
 */
export function decodeFqcnArray(text: string): FqcnElement[] {
  if (text.trim() === '')
    throw new CompatError('MALFORMED_JSON', 'Malformed JSON: the request is empty (expected a command array on stdin)');
  const doc = parseJson(text);
  if (!Array.isArray(doc)) {
    throw new CompatError('NOT_A_COMMAND_ARRAY', `Expected a JSON array of commands [{"<class name>":{…}}], got ${jsonTypeName(doc)}`);
  }
  if (doc.length === 0) throw new CompatError('EMPTY_REQUEST', 'The command array is empty: nothing to do');
  return doc.map((el, i) => {
    if (!isJsonObject(el) || el.size !== 1) {
      throw new CompatError(
        'NOT_A_COMMAND_ARRAY',
        `Element ${i} of the command array must be an object with exactly one key, the command's class name (got ${isJsonObject(el) ? `${el.size} keys` : jsonTypeName(el)})`,
      );
    }
    const [fqcn, body] = [...el][0]!;
    if (!isJsonObject(body)) {
      throw new CompatError('NOT_A_COMMAND_ARRAY', `Element ${i} (${fqcn}) must hold an object of fields, got ${jsonTypeName(body)}`);
    }
    return { fqcn, body };
  });
}
