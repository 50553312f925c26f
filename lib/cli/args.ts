// Command-line parsing with the original script's flags, short and long names, and
// its rules: every value flag takes the next argv element verbatim ("" is a value),
// anything unknown is `Invalid option: <arg>`. Unlike the original, a value flag at
// the end of argv and an unknown -o get a message instead of a silent exit.
// The parser is yargs-parser, the one yargs itself runs, called with exactly the options
// yargs would pass it (test/cli/args.test.ts proves it against yargs): yargs' own machinery
// (locales, usage, commands) costs ~50 ms and ~10 MiB on every agent call for nothing.
import yargsParser from 'yargs-parser';
import { NasbackupError } from '../errors.js';

export const OPERATIONS = ['backup', 'delete', 'rebase', 'stats'] as const;
export type Operation = (typeof OPERATIONS)[number];

export interface CliArgs {
  help: boolean;
  operation?: string;
  vm?: string;
  type?: string;
  storage?: string;
  mount?: string;
  path?: string;
  quiesce?: string;
  diskpaths?: string;
  mode?: string;
  bitmapNew?: string;
  bitmapParent?: string;
  /** --parent-paths, or --parent-path as a one-element list. */
  parentPaths?: string;
  rebaseTarget?: string;
  rebaseNewBacking?: string;
  // later upstream flags
  compress: boolean;
  bandwidth?: string;
  encrypt?: string;
  verify: boolean;
  quiesceTimeout?: string;
  mountTimeout?: string;
  /** --json: one JSON object per run, for people and automation (the agent never passes it). */
  json: boolean;
  /** Rebase engine: auto, native or qemu-img (overrides NASBACKUP_ENGINE). */
  engine?: string;
}

/** [short, long, key] of every flag that takes a value. */
export const VALUE_FLAGS: ReadonlyArray<[string | null, string, keyof CliArgs]> = [
  ['o', 'operation', 'operation'],
  ['v', 'vm', 'vm'],
  ['t', 'type', 'type'],
  ['s', 'storage', 'storage'],
  ['m', 'mount', 'mount'],
  ['p', 'path', 'path'],
  ['q', 'quiesce', 'quiesce'],
  ['d', 'diskpaths', 'diskpaths'],
  ['M', 'mode', 'mode'],
  [null, 'bitmap-new', 'bitmapNew'],
  [null, 'bitmap-parent', 'bitmapParent'],
  [null, 'parent-paths', 'parentPaths'],
  [null, 'parent-path', 'parentPaths'],
  [null, 'rebase-target', 'rebaseTarget'],
  [null, 'rebase-new-backing', 'rebaseNewBacking'],
  ['b', 'bandwidth', 'bandwidth'],
  ['e', 'encrypt', 'encrypt'],
  [null, 'quiesce-timeout', 'quiesceTimeout'],
  ['w', 'mount-timeout', 'mountTimeout'],
  [null, 'engine', 'engine'],
];

/** [short, long] of every flag without a value that yargs parses (--json is taken out before: see wantsJson). */
export const BOOLEAN_FLAGS: ReadonlyArray<[string | null, string]> = [
  ['h', 'help'],
  ['c', 'compress'],
  [null, 'verify'],
];

/** Output for people and automation; never sent by the agent. */
export const JSON_FLAG = '--json';

export class UsageRequested extends NasbackupError {
  constructor() {
    super('USAGE', 'usage');
  }
}

export function parseArgs(all: readonly string[]): CliArgs {
  // --json is removed before parsing, so everything else parses exactly as without it.
  const json = wantsJson(all);
  const argv = json ? withoutJson(all) : all;
  // The original reads argv in order: -h before an unknown option (or a flag missing
  // its value) prints the usage, not an error.
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    if (a === '-h' || a === '--help') throw new UsageRequested();
    if (isValueFlag(a)) i++;
    else if (!BOOLEAN_FLAGS.some(([short, long]) => a === `--${long}` || (short !== null && a === `-${short}`))) break;
  }
  // A value flag as the very last element has no value (the original exits silently).
  const last = argv.at(-1);
  if (last !== undefined) {
    for (const [short, long] of VALUE_FLAGS) {
      if (last === `--${long}` || (short && last === `-${short}`)) {
        throw new NasbackupError('MISSING_OPTION_VALUE', `Option ${last} requires a value`);
      }
    }
  }
  const raw = parseFlags(argv);
  const unknown = raw._.map(String);
  if (unknown.length > 0) throw new NasbackupError('INVALID_OPTION', `Invalid option: ${unknown[0]}`);
  if (raw.h === true) throw new UsageRequested();

  const out: CliArgs = { help: false, compress: raw.c === true, verify: raw.verify === true, json };
  for (const [short, long, key] of VALUE_FLAGS) {
    const v = raw[short ?? long];
    if (typeof v === 'string') (out as unknown as Record<string, unknown>)[key] = v;
  }
  return out;
}

/** What yargs configures for these flags (parserConfiguration and .option() per flag). */
export const PARSER_CONFIGURATION = {
  'unknown-options-as-args': true,
  'camel-case-expansion': false,
  'dot-notation': false,
  'boolean-negation': false,
  'short-option-groups': false,
  'duplicate-arguments-array': false,
  'parse-numbers': false,
  'parse-positional-numbers': false,
  'strip-aliased': true,
  'greedy-arrays': false,
} as const;

/**
 * yargs-parser with the options yargs builds from the calls above: booleans and strings
 * under both names, nargs 1 under the first name, short → long aliases; `populate--` on,
 * then what follows `--` goes back into the positionals (as yargs does). A parse error
 * (a value flag followed by a known flag) is what yargs hands to `.fail()`. Exported for the
 * test that proves it equal to yargs.
 */
export function parseFlags(argv: readonly string[]): Record<string, unknown> & { _: unknown[] } {
  const boolean: string[] = [];
  const string: string[] = [];
  const narg: Record<string, number> = {};
  const alias: Record<string, string[]> = {};
  const key: Record<string, boolean> = {};
  for (const [short, long] of BOOLEAN_FLAGS) {
    boolean.push(...(short ? [short, long] : [long]));
    if (short) alias[short] = [long];
  }
  for (const [short, long] of VALUE_FLAGS) {
    string.push(...(short ? [short, long] : [long]));
    narg[short ?? long] = 1;
    if (short) alias[short] = [long];
  }
  for (const name of [...boolean, ...string]) key[name] = true;
  // `key` (every flag's name) is not in the typings, but yargs passes it: it makes each name known.
  const options = { boolean, string, narg, alias, key, configuration: { ...PARSER_CONFIGURATION, 'populate--': true } };
  const parsed = yargsParser.detailed([...argv], options);
  if (parsed.error) throw new NasbackupError('MISSING_OPTION_VALUE', parsed.error.message);
  const raw = parsed.argv as Record<string, unknown> & { _: unknown[]; '--'?: unknown[] };
  if (raw['--']) {
    raw._.push(...raw['--']);
    delete raw['--'];
  }
  return raw;
}

const isValueFlag = (a: string): boolean => VALUE_FLAGS.some(([short, long]) => a === `--${long}` || (short !== null && a === `-${short}`));

/** Indexes of `--json` used as a flag: not as the value of a value flag (`-m --json` is a mount option). */
function jsonFlagIndexes(argv: readonly string[], takesValue: (a: string) => boolean = isValueFlag): number[] {
  const at: number[] = [];
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === JSON_FLAG) at.push(i);
    else if (takesValue(argv[i]!)) i++;
  }
  return at;
}

/**
 * Whether argv asks for --json, decided before parsing (so an argv that fails to parse answers in JSON too).
 * `takesValue`: the flags whose next argument is a value (the agent CLI's by default; an operator command passes its own).
 */
export function wantsJson(argv: readonly string[], takesValue: (a: string) => boolean = isValueFlag): boolean {
  return jsonFlagIndexes(argv, takesValue).length > 0;
}

function withoutJson(argv: readonly string[]): string[] {
  const drop = new Set(jsonFlagIndexes(argv));
  return argv.filter((_, i) => !drop.has(i));
}

export function isOperation(s: string | undefined): s is Operation {
  return s !== undefined && (OPERATIONS as readonly string[]).includes(s);
}
