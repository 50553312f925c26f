// The divergence table (divergences.json): the declared ways our program deliberately
// differs from the recordings. Rules are selected by what a fixture shows (`when`),
// not by name, so a new fixture of a known kind is judged without editing the table.
// All matching rules apply in table order: later scalar expectations override earlier
// ones, lists (calls, stdoutContains) accumulate. Anything no rule covers must match
// the recording.
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { argValue, targetDomain, type Fixture } from './fixture.js';
import { callKey, matchesPattern, normArgv, type ArgvRule } from './normalize.js';

export const TABLE_FILE = fileURLToPath(new URL('./divergences.json', import.meta.url));

/** One line of expected stdout: literal text, a regex, or a directive (see README of the table). */
export type LineSpec = string | { re: string };

export interface CallsExpect {
  /** The program makes no external call at all (it refuses before touching anything). */
  none?: boolean;
  /** false: the recording says nothing about our calls; only require/forbid/sequence apply. */
  recorded?: boolean;
  /** Recorded calls we deliberately do not make. */
  drop?: string[];
  /** Drop the first recorded call matching this and every later one (we stop earlier). */
  dropFrom?: string;
  /** Calls of ours the recording does not have, allowed. */
  extra?: string[];
  /** Recorded calls we may or may not make (e.g. work done in-process instead). */
  optional?: string[];
  /** Compared as a set, not in order. */
  unordered?: string[];
  /** Must be made / must not be made / must be made in this order (a subsequence of ours). */
  require?: string[];
  forbid?: string[];
  sequence?: string[];
}

export interface Expectation {
  exit?: number;
  stdout?: 'recorded' | { lines: LineSpec[] };
  stdoutContains?: string[];
  stderr?: 'recorded' | 'empty';
  log?: 'recorded' | 'append-only';
  calls?: CallsExpect;
  nas?: 'recorded' | 'unchanged' | 'backup-full' | 'backup-incremental';
  primary?: 'recorded' | 'unchanged';
  checkpoints?: 'recorded' | 'unchanged' | 'after-success';
  leftovers?: 'recorded' | 'none';
}

export interface When {
  group?: string | string[];
  /** Recorded exit: a number, "nonzero", "timeout" (the original hung), or a list of these. */
  exit?: number | string | Array<number | string>;
  recordedStdout?: string;
  recordedStderr?: boolean;
  recordedLeftovers?: boolean;
  recordedEffect?: string;
  /** A recorded call matches the pattern (`!pattern`: none does). */
  recordedCall?: string;
  /** A recorded call with a non-zero exit matches the pattern. */
  failedCall?: string;
  /** argv flag → regex its value must match (an absent flag never matches). */
  args?: Record<string, string>;
  /** Named facts of the fixture's host section (`!name` negates); see HOST_FACTS. */
  host?: string | string[];
  scenarios?: string[];
}

export interface Rule {
  id: string;
  title: string;
  when: When;
  original: string;
  ours: string;
  why: string;
  expect: Expectation;
}

export interface ArgvRewrite extends ArgvRule {
  original: string;
  ours: string;
  why: string;
}

export interface Table {
  schema: string;
  about: string;
  compare: { queries: string[]; notes: string[] };
  argv: ArgvRewrite[];
  rules: Rule[];
}

export function loadTable(file: string = TABLE_FILE): Table {
  const t = JSON.parse(readFileSync(file, 'utf8')) as Table;
  if (t.schema !== 'nasbackup-golden-divergences/1') throw new Error(`${file}: unsupported schema ${t.schema}`);
  return t;
}

const QEMU_MIN = [4, 2, 0];
const LIBVIRT_MIN = [7, 2, 0];
const lastField = (s: string): string => s.trim().split(/\s+/).at(-1) ?? '';
const below = (v: string, min: number[]): boolean => {
  const p = v.split('.').map((x) => parseInt(x, 10) || 0);
  for (let i = 0; i < 3; i++) if ((p[i] ?? 0) !== min[i]) return (p[i] ?? 0) < min[i]!;
  return false;
};

/** Facts about the simulated host a rule may select on. */
export const HOST_FACTS: Record<string, (fx: Fixture) => boolean> = {
  /** QEMU < 4.2.0 or libvirt < 7.2.0 (`virsh version`). */
  versionTooOld: (fx) => below(lastField(fx.host.virsh.version.hypervisor), QEMU_MIN) || below(fx.host.virsh.version.library, LIBVIRT_MIN),
  /** Every virsh call fails to connect. */
  libvirtDown: (fx) => fx.host.virsh.connectError !== undefined,
  /** The --bitmap-parent bitmap is in every disk image of the VM (e.g. after a restart or a stopped-VM pre-seed). */
  parentBitmapOnDisk: (fx) => {
    const parent = argValue(fx.argv, '--bitmap-parent');
    const disks = targetDomain(fx)?.disks.filter((k) => k.device === 'disk' && k.source !== '-') ?? [];
    return parent !== undefined && disks.length > 0 && disks.every((k) => (k.bitmaps ?? []).includes(parent));
  },
  /** A -d source disk that the host does not have (not seeded). */
  missingSourceDisk: (fx) => {
    const seeded = new Set(fx.host.domains.flatMap((d) => d.disks).filter((k) => k.seed !== false).map((k) => k.source));
    return (argValue(fx.argv, '-d', '--diskpaths') ?? '').split(',').filter(Boolean).some((p) => !seeded.has(p));
  },
};

const list = <T>(v: T | T[] | undefined): T[] => (v === undefined ? [] : Array.isArray(v) ? v : [v]);

function recordedKeys(fx: Fixture, argv: readonly ArgvRule[], failedOnly = false): string[] {
  return fx.expect.calls.filter((c) => !failedOnly || c.exitCode !== 0).map((c) => callKey(c.cmd, normArgv(c.cmd, c.argv, argv)));
}

/** Does the rule's `when` hold for this fixture? Every given condition must hold. */
export function matches(w: When, fx: Fixture, argv: readonly ArgvRule[]): boolean {
  const e = fx.expect;
  if (w.scenarios && !w.scenarios.includes(fx.name)) return false;
  if (w.group && !list(w.group).includes(fx.group)) return false;
  if (w.exit !== undefined) {
    const ok = list(w.exit).some((x) =>
      x === 'timeout' ? e.timedOut : x === 'nonzero' ? !e.timedOut && e.exitCode !== 0 : !e.timedOut && e.exitCode === x,
    );
    if (!ok) return false;
  }
  if (w.recordedStdout !== undefined && !new RegExp(w.recordedStdout, 'm').test(e.stdout.text)) return false;
  if (w.recordedStderr !== undefined && (e.stderr.text !== '') !== w.recordedStderr) return false;
  if (w.recordedLeftovers !== undefined) {
    const any = e.leftovers.mounts.length + e.leftovers.tempDirs.length + e.hostAfter.shimMounts.length > 0;
    if (any !== w.recordedLeftovers) return false;
  }
  if (w.recordedEffect && !e.calls.some((c) => (c.effects ?? []).some((x) => x.op === w.recordedEffect))) return false;
  if (w.recordedCall) {
    const neg = w.recordedCall.startsWith('!');
    const p = neg ? w.recordedCall.slice(1) : w.recordedCall;
    if (recordedKeys(fx, argv).some((k) => matchesPattern(k, p)) === neg) return false;
  }
  if (w.failedCall && !recordedKeys(fx, argv, true).some((k) => matchesPattern(k, w.failedCall!))) return false;
  for (const [flag, re] of Object.entries(w.args ?? {})) {
    const v = argValue(fx.argv, flag);
    if (v === undefined || !new RegExp(re).test(v)) return false;
  }
  for (const h of list(w.host)) {
    const neg = h.startsWith('!');
    const fact = HOST_FACTS[neg ? h.slice(1) : h];
    if (!fact) throw new Error(`unknown host fact ${h}`);
    if (fact(fx) === neg) return false;
  }
  return true;
}

export interface Resolved {
  expect: Required<Omit<Expectation, 'exit'>> & { exit?: number; calls: Required<Omit<CallsExpect, 'dropFrom'>> & { dropFrom?: string } };
  rules: Rule[];
}

/** Merge every matching rule over the defaults ("as recorded"). */
export function resolve(fx: Fixture, table: Table): Resolved {
  const out: Resolved['expect'] = {
    stdout: 'recorded',
    stdoutContains: [],
    stderr: 'recorded',
    log: 'recorded',
    nas: 'recorded',
    primary: 'recorded',
    checkpoints: 'recorded',
    leftovers: 'recorded',
    calls: { none: false, recorded: true, drop: [], extra: [], optional: [], unordered: [...table.compare.queries], require: [], forbid: [], sequence: [] },
  };
  const applied: Rule[] = [];
  for (const r of table.rules) {
    if (!matches(r.when, fx, table.argv)) continue;
    applied.push(r);
    const x = r.expect;
    if (x.exit !== undefined) out.exit = x.exit;
    for (const k of ['stdout', 'stderr', 'log', 'nas', 'primary', 'checkpoints', 'leftovers'] as const) {
      if (x[k] !== undefined) (out as unknown as Record<string, unknown>)[k] = x[k];
    }
    out.stdoutContains.push(...(x.stdoutContains ?? []));
    const c = x.calls ?? {};
    if (c.none !== undefined) out.calls.none = c.none;
    if (c.recorded !== undefined) out.calls.recorded = c.recorded;
    if (c.dropFrom !== undefined) out.calls.dropFrom = c.dropFrom;
    for (const k of ['drop', 'extra', 'optional', 'unordered', 'require', 'forbid', 'sequence'] as const) out.calls[k].push(...(c[k] ?? []));
  }
  return { expect: out, rules: applied };
}

const escapeRe = (s: string): string => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');

/**
 * `${-v}`, `${--bitmap-new}` … (argv values), `${qemu}`/`${libvirt}` (host versions),
 * `${job.errorMessage}` (the VM's scripted job error). In regexes, values are escaped.
 */
export function substitute(s: string, fx: Fixture, forRegex = false): string {
  return s.replace(/\$\{([^}]+)\}/g, (_, name: string) => {
    let v: string | undefined;
    if (name.startsWith('-')) v = argValue(fx.argv, name);
    else if (name === 'qemu') v = lastField(fx.host.virsh.version.hypervisor);
    else if (name === 'libvirt') v = fx.host.virsh.version.library;
    else if (name === 'job.errorMessage') v = targetDomain(fx)?.job?.errorMessage;
    if (v === undefined) throw new Error(`${fx.name}: \${${name}} has no value`);
    return forRegex ? escapeRe(v) : v;
  });
}
