// The divergence table (divergences.json): the declared ways our program deliberately
// differs from the recordings. Rules are selected by what a fixture shows (`when`),
// not by name, so a new fixture of a known kind is judged without editing the table.
// All matching rules apply in table order: later scalar expectations override earlier
// ones, lists (calls, stdoutContains) accumulate. Anything no rule covers must match
// the recording.
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { posix } from 'node:path';
import { argValue, hasFlag, ORIGINAL_VALUE_FLAGS, targetDomain, type Entry, type Fixture } from './fixture.js';
import { callKey, matchesPattern, normArgv, type ArgvRule } from './normalize.js';

export const TABLE_FILE = fileURLToPath(new URL('./divergences.json', import.meta.url));

/** One line of expected stdout: literal text, a regex (`optional`: zero or one such line), or a directive. */
export type LineSpec = string | { re: string; optional?: boolean };

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
  /** `any`: the recording cannot say (the original never ran the operation). */
  exit?: number | 'any';
  stdout?: 'recorded' | { lines: LineSpec[] };
  stdoutContains?: string[];
  /** Regexes no stdout line may match. */
  stdoutExcludes?: string[];
  stderr?: 'recorded' | 'empty';
  log?: 'recorded' | 'append-only';
  calls?: CallsExpect;
  nas?: 'recorded' | 'unchanged' | 'backup-full' | 'backup-incremental' | 'any';
  primary?: 'recorded' | 'unchanged' | 'any';
  checkpoints?: 'recorded' | 'unchanged' | 'after-success' | 'any';
  leftovers?: 'recorded' | 'none';
  /** NAS-relative files (`${-p}` substituted) that we add and the recording lacks; each must exist, a `manifest.json` must decode. */
  nasAdds?: string[];
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
  /** argv flag (either spelling) → regex its value must match (an absent flag never matches); null: the flag is absent. */
  args?: Record<string, string | null>;
  /** Named facts of the fixture's host section (`!name` negates); see HOST_FACTS. */
  host?: string | string[];
  /** Named facts of the fixture's argv and NAS (`!name` negates); see FACTS. */
  facts?: string | string[];
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
  /** The VM's scripted backup job carries an error message (what libvirt reports for a failed job). */
  jobErrorMessage: (fx) => targetDomain(fx)?.job?.errorMessage !== undefined,
  /** A -d source disk that the host does not have (not seeded). */
  missingSourceDisk: (fx) => {
    const seeded = new Set(
      fx.host.domains
        .flatMap((d) => d.disks)
        .filter((k) => k.seed !== false)
        .map((k) => k.source),
    );
    return (argValue(fx.argv, '-d', '--diskpaths') ?? '')
      .split(',')
      .filter(Boolean)
      .some((p) => !seeded.has(p));
  },
};

/** The original's way of adding `nobrl` for cifs: appended to -m as it is. */
export const originalCifsOptions = (m: string): string => `${m},nobrl`;
/** Ours (contract §10.25): empty pieces dropped, `nobrl` added once. */
export const ourCifsOptions = (m: string): string => {
  const parts = m.split(',').filter((p) => p !== '');
  if (!parts.includes('nobrl')) parts.push('nobrl');
  return parts.join(',');
};

/** Mount-relative path checks of the contract (§6): non-empty, relative, no `..`, deep enough. */
export function unsafeRelativePath(p: string, minDepth: number): boolean {
  if (p === '' || p.startsWith('/') || p.includes('\0')) return true;
  const parts = p.split('/').filter((x) => x !== '' && x !== '.');
  return parts.includes('..') || parts.length < minDepth;
}

const imageDisks = (fx: Fixture) => targetDomain(fx)?.disks.filter((k) => k.device === 'disk' && k.source !== '-') ?? [];
const nasEntry = (fx: Fixture, rel: string | undefined): Entry | undefined =>
  rel === undefined ? undefined : fx.nasBefore.find((e) => e.path === posix.normalize(rel).replace(/\/+$/, ''));
const parentList = (fx: Fixture): string[] => (argValue(fx.argv, '--parent-paths', '--parent-path') ?? '').split(',').filter(Boolean);
const volOf = (file: string): string | null => (/^(?:root|datadisk)\.(.+)\.qcow2$/.exec(posix.basename(file)) ?? [])[1] ?? null;

/** Facts about a fixture's argv and NAS a rule may select on (what it shows, never its name). */
export const FACTS: Record<string, (fx: Fixture) => boolean> = {
  /** The last argv element is a flag the original takes a value for: its `shift` fails. */
  trailingValueFlag: (fx) => ORIGINAL_VALUE_FLAGS.has(fx.argv.at(-1) ?? ''),
  /** No -o, or an empty one. */
  noOperation: (fx) => !argValue(fx.argv, '-o'),
  /** A mount-relative path the operation uses fails the contract's checks (§6): delete/backup -p, the rebase paths (files: no trailing `/`), the parents. */
  unsafePath: (fx) => {
    const op = argValue(fx.argv, '-o');
    const p = argValue(fx.argv, '-p');
    if (op === 'delete') return p === undefined || unsafeRelativePath(p, 2);
    if (op === 'backup') return (p !== undefined && unsafeRelativePath(p, 2)) || parentList(fx).some((x) => unsafeRelativePath(x, 3));
    if (op === 'rebase') {
      // Both name files: a trailing `/` is refused too.
      return ['--rebase-target', '--rebase-new-backing'].some((f) => {
        const v = argValue(fx.argv, f);
        return v !== undefined && v !== '' && (unsafeRelativePath(v, 2) || v.endsWith('/'));
      });
    }
    return false;
  },
  /** cifs, and the original's `-m,nobrl` is not what we pass (empty -m, empty pieces, nobrl already there). */
  cifsOptionsRewritten: (fx) => {
    if (argValue(fx.argv, '-t') !== 'cifs') return false;
    const m = argValue(fx.argv, '-m') ?? '';
    return originalCifsOptions(m) !== ourCifsOptions(m);
  },
  /** The backup folder -p already exists on the NAS before the run. */
  backupDirExists: (fx) => argValue(fx.argv, '-o') === 'backup' && nasEntry(fx, argValue(fx.argv, '-p'))?.type === 'dir',
  /** A stopped VM's -d disk already carries the --bitmap-new bitmap. */
  newBitmapOnStoppedDisk: (fx) => {
    const name = argValue(fx.argv, '--bitmap-new');
    const srcs = (argValue(fx.argv, '-d') ?? '').split(',').filter(Boolean);
    const disks = fx.host.domains.flatMap((d) => d.disks);
    return name !== undefined && srcs.some((s) => disks.some((k) => k.source === s && (k.bitmaps ?? []).includes(name)));
  },
  /** -M is one we refuse before anything runs: unknown, or `full` without --bitmap-new. */
  modeRefused: (fx) => {
    const m = argValue(fx.argv, '-M');
    if (m === undefined) return false;
    return !['', 'legacy-full', 'full', 'incremental'].includes(m) || (m === 'full' && !argValue(fx.argv, '--bitmap-new'));
  },
  /** The VM is paused (libvirt lists it, not as running). */
  vmPaused: (fx) => targetDomain(fx)?.state === 'paused',
  /** An incremental with fewer parent paths than the VM has disks. */
  fewerParentsThanDisks: (fx) =>
    argValue(fx.argv, '-M') === 'incremental' && parentList(fx).length > 0 && parentList(fx).length < imageDisks(fx).length,
  /** Every disk without a parent path has its file, by volume id, in the folder of the given parents. */
  missingParentsInferable: (fx) => {
    const given = parentList(fx);
    const dirs = new Set(given.map((p) => posix.dirname(p)));
    if (dirs.size !== 1) return false;
    const [dir] = [...dirs];
    const vols = new Set(given.map(volOf));
    return imageDisks(fx).every((k, i) => {
      const vol = posix.basename(k.source);
      return vols.has(vol) || nasEntry(fx, `${dir}/${i === 0 ? 'root' : 'datadisk'}.${vol}.qcow2`)?.type === 'qcow2';
    });
  },
  /** An incremental whose parent paths name the VM's disks, but in another order than its disks (domblklist order). */
  parentsOutOfDiskOrder: (fx) => {
    const given = parentList(fx).map(volOf);
    const vols = imageDisks(fx).map((k) => posix.basename(k.source));
    return (
      argValue(fx.argv, '-M') === 'incremental' &&
      given.length === vols.length &&
      given.every((v) => v !== null && vols.includes(v)) &&
      given.some((v, i) => v !== vols[i])
    );
  },
  /** An incremental with a parent path whose volume id is none of the VM's disks. */
  parentForUnknownVolume: (fx) => {
    const vols = imageDisks(fx).map((k) => posix.basename(k.source));
    return argValue(fx.argv, '-M') === 'incremental' && vols.length > 0 && parentList(fx).some((p) => !vols.includes(volOf(p) ?? ''));
  },
  /** Every disk's parent (by volume id, or the file of its name in the parents' folder) is a qcow2 on the NAS. */
  allParentsOnNas: (fx) => {
    const given = parentList(fx);
    const dirs = [...new Set(given.map((p) => posix.dirname(p)))];
    const disks = imageDisks(fx);
    return (
      disks.length > 0 &&
      disks.every((k, i) => {
        const vol = posix.basename(k.source);
        const parent =
          given.find((p) => volOf(p) === vol) ??
          (dirs.length === 1 ? `${dirs[0]}/${i === 0 ? 'root' : 'datadisk'}.${vol}.qcow2` : undefined);
        return nasEntry(fx, parent)?.type === 'qcow2';
      })
    );
  },
  /** The VM runs and libvirt has the --bitmap-parent checkpoint registered. */
  parentCheckpointRegistered: (fx) => {
    const d = targetDomain(fx);
    const parent = argValue(fx.argv, '--bitmap-parent');
    return d?.state === 'running' && parent !== undefined && d.checkpoints.includes(parent);
  },
  /** The rebase target is not a readable qcow2 image (corrupt header, not qcow2). */
  rebaseTargetUnreadable: (fx) => {
    const e = nasEntry(fx, argValue(fx.argv, '--rebase-target'));
    return e !== undefined && (e.type !== 'qcow2' || e.infoError !== undefined || e.corrupt === true);
  },
  /** The rebase target is a readable qcow2 whose current backing chain is broken (a layer is gone). */
  rebaseTargetChainBroken: (fx) => {
    const e = nasEntry(fx, argValue(fx.argv, '--rebase-target'));
    return (
      e?.type === 'qcow2' &&
      e.infoError === undefined &&
      (e.backingChainError !== undefined || (e.contentSha256 === null && !!e.backingFilename))
    );
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
    if (re === null) {
      if (hasFlag(fx.argv, flag)) return false;
      continue;
    }
    const v = argValue(fx.argv, flag);
    if (v === undefined || !new RegExp(re).test(v)) return false;
  }
  for (const h of list(w.host)) {
    const neg = h.startsWith('!');
    const fact = HOST_FACTS[neg ? h.slice(1) : h];
    if (!fact) throw new Error(`unknown host fact ${h}`);
    if (fact(fx) === neg) return false;
  }
  for (const h of list(w.facts)) {
    const neg = h.startsWith('!');
    const fact = FACTS[neg ? h.slice(1) : h];
    if (!fact) throw new Error(`unknown fact ${h}`);
    if (fact(fx) === neg) return false;
  }
  return true;
}

export interface Resolved {
  expect: Required<Omit<Expectation, 'exit'>> & {
    exit?: number | 'any';
    calls: Required<Omit<CallsExpect, 'dropFrom'>> & { dropFrom?: string };
  };
  rules: Rule[];
}

/** Merge every matching rule over the defaults ("as recorded"). */
export function resolve(fx: Fixture, table: Table): Resolved {
  const out: Resolved['expect'] = {
    stdout: 'recorded',
    stdoutContains: [],
    stdoutExcludes: [],
    stderr: 'recorded',
    log: 'recorded',
    nas: 'recorded',
    primary: 'recorded',
    checkpoints: 'recorded',
    leftovers: 'recorded',
    nasAdds: [],
    calls: {
      none: false,
      recorded: true,
      drop: [],
      extra: [],
      optional: [],
      unordered: [...table.compare.queries],
      require: [],
      forbid: [],
      sequence: [],
    },
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
    out.stdoutExcludes.push(...(x.stdoutExcludes ?? []));
    out.nasAdds.push(...(x.nasAdds ?? []));
    const c = x.calls ?? {};
    if (c.none !== undefined) out.calls.none = c.none;
    if (c.recorded !== undefined) out.calls.recorded = c.recorded;
    if (c.dropFrom !== undefined) out.calls.dropFrom = c.dropFrom;
    for (const k of ['drop', 'extra', 'optional', 'unordered', 'require', 'forbid', 'sequence'] as const)
      out.calls[k].push(...(c[k] ?? []));
  }
  return { expect: out, rules: applied };
}

const escapeRe = (s: string): string => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');

/**
 * `${-v}`, `${--bitmap-new}` … (argv values), `${argv.last}`, `${qemu}`/`${libvirt}` (host
 * versions), `${job.errorMessage}` (the VM's scripted job error), `${cifsOptions}` /
 * `${originalCifsOptions}` (the -o value of a cifs mount, ours / the original's). In
 * regexes, values are escaped.
 */
export function substitute(s: string, fx: Fixture, forRegex = false): string {
  return s.replace(/\$\{([^}]+)\}/g, (_, name: string) => {
    let v: string | undefined;
    if (name.startsWith('-')) v = argValue(fx.argv, name);
    else if (name === 'argv.last') v = fx.argv.at(-1);
    else if (name === 'cifsOptions') v = ourCifsOptions(argValue(fx.argv, '-m') ?? '');
    else if (name === 'originalCifsOptions') v = originalCifsOptions(argValue(fx.argv, '-m') ?? '');
    else if (name === 'qemu') v = lastField(fx.host.virsh.version.hypervisor);
    else if (name === 'libvirt') v = fx.host.virsh.version.library;
    else if (name === 'job.errorMessage') v = targetDomain(fx)?.job?.errorMessage;
    if (v === undefined) throw new Error(`${fx.name}: \${${name}} has no value`);
    return forRegex ? escapeRe(v) : v;
  });
}
