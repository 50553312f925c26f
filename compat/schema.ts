// Field-by-field binding of a wire object to a class, the way Gson's reflective
// adapter does it: fields in declaration order (subclass first, then superclasses),
// unknown members ignored, absent or null members left null, primitives defaulted,
// and Gson's lenient scalar coercions (e.g. "wait":"0" from a log view binds as 0).
import { CompatError } from './errors.js';
import { isJsonObject, jsonTypeName, type JsonObject, type JsonValue } from './json.js';
import { INT_MAX, INT_MIN, LONG_MAX, LONG_MIN } from './java.js';

export type FieldKind =
  | 'String'
  | 'Boolean' // boxed: may be null
  | 'boolean' // primitive: never null, always written
  | 'Integer'
  | 'int'
  | 'Long'
  | 'List<String>'
  | 'List<Object>' // list of transfer objects, kept as raw JSON objects
  | 'Map<String,String>'
  | 'Object'; // anything, passed through untouched

export interface Field {
  name: string;
  kind: FieldKind;
  /** The wrapper cannot build a command line without it (our check, not Gson's). */
  required?: boolean;
}

export interface ClassSchema {
  fqcn: string;
  simpleName: string;
  /** Every wire field in Gson's order: this class, then Answer (for answers), then Command. */
  fields: readonly Field[];
}

/** com.cloud.agent.api.Command's own fields, written after every subclass's. */
export const COMMAND_FIELDS: readonly Field[] = [
  { name: 'contextMap', kind: 'Map<String,String>' },
  { name: 'wait', kind: 'int' },
  { name: 'bypassHostMaintenance', kind: 'boolean' },
  { name: 'externalDetails', kind: 'Object' },
];

/** com.cloud.agent.api.Answer's own fields (Answer extends Command). */
export const ANSWER_FIELDS: readonly Field[] = [
  { name: 'result', kind: 'boolean' },
  { name: 'details', kind: 'String' },
];

export type Bound = Record<string, unknown>;

function invalid(cls: string, field: string, expected: string, v: JsonValue): never {
  throw new CompatError('INVALID_FIELD', `${cls}.${field}: expected ${expected} but was ${jsonTypeName(v)}`);
}

function asString(cls: string, field: string, v: JsonValue): string {
  if (typeof v === 'string') return v;
  if (typeof v === 'number' || typeof v === 'bigint') return String(v); // Gson reads a number token as its text
  if (typeof v === 'boolean') return String(v);
  return invalid(cls, field, 'a string', v);
}

function asBoolean(cls: string, field: string, v: JsonValue): boolean {
  if (typeof v === 'boolean') return v;
  if (typeof v === 'string') return v.toLowerCase() === 'true'; // Boolean.parseBoolean
  return invalid(cls, field, 'a boolean', v);
}

function asInteger(cls: string, field: string, v: JsonValue, min: bigint, max: bigint, what: string): bigint {
  let n: bigint | null = null;
  if (typeof v === 'bigint') n = v;
  else if (typeof v === 'number' && Number.isInteger(v)) n = BigInt(v);
  else if (typeof v === 'string' && /^[+-]?\d+$/.test(v.trim())) n = BigInt(v.trim());
  else if (typeof v === 'string' && /^\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*$/.test(v)) {
    const d = Number(v); // Gson falls back to a double that must be integral
    if (Number.isInteger(d)) n = BigInt(d);
  }
  if (n === null) return invalid(cls, field, what, v);
  if (n < min || n > max)
    throw new CompatError('INVALID_FIELD', `${cls}.${field}: ${typeof v === 'string' ? v : String(n)} does not fit in a Java ${what}`);
  return n;
}

function bindOne(cls: string, f: Field, v: JsonValue): unknown {
  switch (f.kind) {
    case 'String':
      return asString(cls, f.name, v);
    case 'Boolean':
    case 'boolean':
      return asBoolean(cls, f.name, v);
    case 'Integer':
    case 'int':
      return Number(asInteger(cls, f.name, v, BigInt(INT_MIN), BigInt(INT_MAX), 'int'));
    case 'Long':
      return asInteger(cls, f.name, v, LONG_MIN, LONG_MAX, 'long');
    case 'List<String>':
      if (!Array.isArray(v)) return invalid(cls, f.name, 'a list', v);
      return v.map((x) => (x === null ? null : asString(cls, f.name, x)));
    case 'List<Object>':
      if (!Array.isArray(v)) return invalid(cls, f.name, 'a list', v);
      return v.map((x) => (x === null ? null : isJsonObject(x) ? x : invalid(cls, f.name, 'a list of objects', x)));
    case 'Map<String,String>': {
      if (!isJsonObject(v)) return invalid(cls, f.name, 'an object', v);
      const m = new Map<string, string | null>();
      for (const [k, x] of v) m.set(k, x === null ? null : asString(cls, f.name, x));
      return m;
    }
    case 'Object':
      return v;
  }
}

/** Bind a wire object to a class: the result has one key per present field (primitives always). */
export function bindFields(schema: ClassSchema, body: JsonObject): Bound {
  const out: Bound = {};
  for (const f of schema.fields) {
    const v = body.get(f.name);
    if (v === undefined || v === null) {
      if (f.kind === 'boolean') out[f.name] = false;
      else if (f.kind === 'int') out[f.name] = 0;
      else if (f.required) {
        throw new CompatError('MISSING_FIELD', `${schema.simpleName} is missing the required field "${f.name}"`);
      }
      continue;
    }
    out[f.name] = bindOne(schema.simpleName, f, v);
  }
  return out;
}

function toJson(v: unknown): JsonValue {
  if (v === undefined || v === null) return null;
  if (typeof v === 'string' || typeof v === 'boolean' || typeof v === 'number' || typeof v === 'bigint') return v;
  if (Array.isArray(v)) return v.map(toJson);
  if (v instanceof Map) {
    const m: JsonObject = new Map();
    for (const [k, x] of v as Map<string, unknown>) m.set(k, toJson(x));
    return m;
  }
  throw new CompatError('INVALID_FIELD', `cannot write a ${typeof v} to the wire`);
}

/** The wire object for a bound record, fields in schema order, nulls omitted, primitives defaulted. */
export function unbindFields(schema: ClassSchema, rec: Bound): JsonObject {
  const out: JsonObject = new Map();
  for (const f of schema.fields) {
    let v = rec[f.name];
    if (v === undefined || v === null) {
      if (f.kind === 'boolean') v = false;
      else if (f.kind === 'int') v = 0;
      else continue;
    }
    out.set(f.name, toJson(v));
  }
  return out;
}
