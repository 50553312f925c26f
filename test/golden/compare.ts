// Our outcome against the fixture, under the resolved expectations: exit code, stdout
// (annotations honoured, sizes recomputed from our files), stderr, log, calls, trees,
// checkpoints and leftovers. Returns every difference found (empty: the scenario passes).
import { createHash } from 'node:crypto';
import { lstatSync, readdirSync, readFileSync } from 'node:fs';
import { basename, join, posix } from 'node:path';
import { isDeepStrictEqual } from 'node:util';
import { argValue, NAS, targetDomain, type Annotation, type Entry, type Fixture, type Write } from './fixture.js';
import type { Outcome } from './harness.js';
import { LOG_SENTINEL } from './harness.js';
import { callKey, matchesPattern, normArgv, normText, VIRSH_URI } from './normalize.js';
import { substitute, type LineSpec, type Resolved, type Table } from './rules.js';
import { decodeManifest, MANIFEST_NAME } from '../../lib/store/manifest.js';

export interface Diff {
  check: string;
  message: string;
}

const lines = (text: string): string[] => {
  if (text === '') return [];
  const l = text.split('\n');
  if (l.at(-1) === '') l.pop();
  return l;
};
const show = (l: readonly string[]): string => l.map((x) => `    | ${x}`).join('\n');

/** `du -sb`: st_size of the folder itself and of everything below it. */
export function duSb(path: string): number {
  const st = lstatSync(path);
  let total = st.size;
  if (st.isDirectory()) for (const n of readdirSync(path)) total += duSb(join(path, n));
  return total;
}

/** Where a `<MOUNT_POINT>/…` path of the recording is now: the same path on the NAS export. */
const onNas = (p: string): string => p.replace(/^<MOUNT_POINT>/, NAS);

// ------------------------------------------------------------------ stdout specs

type Item =
  | { kind: 'line'; desc: string; test: (l: string) => boolean; optional?: boolean }
  | { kind: 'block'; desc: string; n: number; test: (ls: string[]) => string | null }
  | { kind: 'any' };

function literal(text: string): Item {
  return { kind: 'line', desc: JSON.stringify(text), test: (l) => l === text };
}

interface Ctx {
  fx: Fixture;
  out: Outcome;
  table: Table;
}

/** Our last call with the key of recorded call `seq`. */
function ourCallFor(ctx: Ctx, seq: number) {
  const rec = ctx.fx.expect.calls.find((c) => c.seq === seq);
  if (!rec) return undefined;
  const key = callKey(rec.cmd, normArgv(rec.cmd, rec.argv, ctx.table.argv));
  return [...ctx.out.calls].reverse().find((c) => c.key === key);
}

/** The recorded stdout as items, each annotation turned into its rule. */
function recordedItems(ctx: Ctx, from = 1, to = Number.MAX_SAFE_INTEGER, fix: (l: string) => string = (l) => l): Item[] {
  const block = ctx.fx.expect.stdout;
  const byLine = new Map<number, Annotation>();
  for (const a of block.annotations) byLine.set(a.line, a);
  const items: Item[] = [];
  const p = argValue(ctx.fx.argv, '-p', '--path') ?? '';
  for (let i = 1; i <= block.lines.length; i++) {
    if (i < from || i > to) continue;
    const a = byLine.get(i);
    const text = block.lines[i - 1]!;
    if (!a) {
      items.push(literal(fix(text)));
      continue;
    }
    switch (a.kind) {
      case 'from-call': {
        const ours = ourCallFor(ctx, a.seq!);
        const src = ours ? lines(normText(a.stream === 'stderr' ? ours.stderr : ours.stdout)) : block.lines.slice(i - 1, i - 1 + a.count);
        for (let k = 0; k < a.count; k++) {
          const want = src[k];
          if (i + k >= from && i + k <= to)
            items.push(want === undefined ? { kind: 'line', desc: `(line ${k + 1} of call #${a.seq})`, test: () => false } : literal(want));
        }
        i += a.count - 1;
        break;
      }
      case 'size:du-sb': {
        const dir = onNas(a.of!);
        items.push({ kind: 'line', desc: `du -sb of ${a.of}`, test: (l) => l === String(duSb(dir)) });
        break;
      }
      case 'size:ls-total-line':
        items.push(literal(''));
        break;
      case 'size:ls-entry': {
        const f = join(NAS, p, a.entry!);
        items.push({ kind: 'line', desc: `size of ${a.entry}`, test: (l) => l === String(lstatSync(f).size) });
        break;
      }
      case 'size:df-blocks-used': {
        const df = ourCallFor(ctx, a.fromCall!);
        const row = (df ? lines(df.stdout)[1] : undefined)?.trim().split(/\s+/);
        const want = row ? `${row[1]} ${row[2]}` : text;
        items.push(literal(want));
        break;
      }
      case 'mount-point':
        items.push(literal('<MOUNT_POINT>'));
        break;
      case 'rm-verbose': {
        let n = 1;
        while (byLine.get(i + n)?.kind === 'rm-verbose') n++;
        const want = block.lines.slice(i - 1, i - 1 + n).map(fix);
        items.push({
          kind: 'block',
          n,
          desc: `${n} rm -v lines (any order, each directory after its contents)`,
          test: (got) => {
            if (!isDeepStrictEqual([...got].sort(), [...want].sort())) return 'not the same set of lines';
            for (const [k, l] of got.entries()) {
              const m = /^removed directory '(.*)'$/.exec(l);
              if (m && got.slice(k + 1).some((x) => x.includes(`'${m[1]}/`))) return `${l} comes before its contents`;
            }
            return null;
          },
        });
        i += n - 1;
        break;
      }
      default:
        items.push(literal(text));
    }
  }
  return items;
}

/** In `'…'`-quoted paths: `//` → `/`, `/./` → `/`, no trailing `/` (paths as a normalizing program prints them). */
function normalizeQuotedPaths(line: string): string {
  return line.replace(
    /'([^']*)'/g,
    (_, p: string) =>
      `'${p
        .replace(/\/(\.\/)+/g, '/')
        .replace(/\/{2,}/g, '/')
        .replace(/(.)\/$/, '$1')}'`,
  );
}

function specItems(ctx: Ctx, specs: readonly LineSpec[]): Item[] {
  const { fx } = ctx;
  const p = argValue(fx.argv, '-p', '--path') ?? '';
  const items: Item[] = [];
  for (const s of specs) {
    if (typeof s !== 'string') {
      const re = new RegExp(substitute(s.re, fx, true));
      items.push({
        kind: 'line',
        desc: `/${re.source}/${s.optional ? ' (optional)' : ''}`,
        test: (l) => re.test(l),
        ...(s.optional ? { optional: true } : {}),
      });
    } else if (s === '@any*') items.push({ kind: 'any' });
    else if (s === '@recorded') items.push(...recordedItems(ctx));
    else if (s === '@recorded-normalized-paths') items.push(...recordedItems(ctx, 1, Number.MAX_SAFE_INTEGER, normalizeQuotedPaths));
    else if (s.startsWith('@recorded-through:')) {
      const re = new RegExp(s.slice('@recorded-through:'.length));
      const n = fx.expect.stdout.lines.findIndex((l) => re.test(l));
      if (n < 0) throw new Error(`${fx.name}: ${s} matches no recorded line`);
      items.push(...recordedItems(ctx, 1, n + 1));
    } else if (s.startsWith('@recorded:')) {
      const [a, b] = s.slice('@recorded:'.length).split('-').map(Number);
      items.push(...recordedItems(ctx, a, b ?? a!));
    } else if (s === '@markers' || s.startsWith('@markers:')) {
      // The recorded marker lines (`NAME=…`), optionally only those starting with a prefix.
      const prefix = s.slice('@markers:'.length);
      for (const l of fx.expect.stdout.lines) if (/^[A-Z_]+=/.test(l) && l.startsWith(prefix)) items.push(literal(l));
    } else if (s === '@file-sizes') {
      // One st_size per qcow2 file of the new backup, in the order `ls` lists them in the C
      // locale (byte order of the names: datadisk.* before root.*), as the original.
      const dir = join(NAS, p);
      let names: string[] = [];
      try {
        names = readdirSync(dir)
          .filter((n) => n.endsWith('.qcow2'))
          .sort((a, b) => Buffer.compare(Buffer.from(a), Buffer.from(b)));
      } catch {
        // no backup folder: nothing can match below
      }
      if (names.length === 0)
        items.push({ kind: 'line', desc: `(size lines of the qcow2 files in ${p}: there are none)`, test: () => false });
      for (const name of names) {
        const f = join(dir, name);
        items.push({
          kind: 'line',
          desc: `size of ${name}`,
          test: (l) => {
            try {
              return l === String(lstatSync(f).size);
            } catch {
              return false;
            }
          },
        });
      }
    } else if (s === '@job-block') {
      const job = [...ctx.out.calls]
        .reverse()
        .find((c) => /^virsh domjobinfo \S+ --completed/.test(c.key) && /^Job type:\s+Completed/.test(c.stdout));
      if (!job) items.push({ kind: 'line', desc: '(a completed domjobinfo block)', test: () => false });
      else for (const l of lines(normText(job.stdout))) items.push(literal(l));
    } else if (s === '@du-total') {
      const dir = join(NAS, p);
      items.push({
        kind: 'line',
        desc: `du -sb of ${p}`,
        test: (l) => {
          try {
            return l === String(duSb(dir));
          } catch {
            return false;
          }
        },
      });
    } else items.push(literal(substitute(s, fx)));
  }
  return items;
}

/** Match lines against items (`any` = zero or more lines); null when they match. */
function matchItems(items: Item[], got: string[]): string | null {
  let best = { i: -1, why: '' };
  const go = (i: number, j: number): boolean => {
    if (i === items.length) {
      if (j === got.length) return true;
      if (i >= best.i) best = { i, why: `unexpected line ${j + 1}: ${JSON.stringify(got[j])}` };
      return false;
    }
    const it = items[i]!;
    if (it.kind === 'any') {
      for (let k = j; k <= got.length; k++) if (go(i + 1, k)) return true;
      return false;
    }
    if (it.kind === 'block') {
      const chunk = got.slice(j, j + it.n);
      const why = chunk.length < it.n ? 'too few lines' : it.test(chunk);
      if (why === null) return go(i + 1, j + it.n);
      if (i >= best.i) best = { i, why: `line ${j + 1}: expected ${it.desc}: ${why}` };
      return false;
    }
    if (j < got.length && it.test(got[j]!)) {
      if (go(i + 1, j + 1)) return true;
      if (!it.optional) return false;
    }
    if (it.optional) return go(i + 1, j);
    if (i >= best.i)
      best = { i, why: `line ${j + 1}: expected ${it.desc}, got ${j < got.length ? JSON.stringify(got[j]) : 'end of output'}` };
    return false;
  };
  return go(0, 0) ? null : best.why;
}

function compareStdout(ctx: Ctx, r: Resolved, diffs: Diff[]): void {
  const got = lines(normText(ctx.out.stdout));
  const spec = r.expect.stdout;
  const items = spec === 'recorded' ? recordedItems(ctx) : specItems(ctx, spec.lines);
  const why = matchItems(items, got);
  if (why) diffs.push({ check: 'stdout', message: `${why}\n  ours:\n${show(got)}\n  recorded:\n${show(ctx.fx.expect.stdout.lines)}` });
  if (ctx.out.stdout !== '' && !ctx.out.stdout.endsWith('\n')) diffs.push({ check: 'stdout', message: 'does not end with a newline' });

  const text = normText(ctx.out.stdout);
  for (const c of r.expect.stdoutContains) {
    let wanted: string[] = [];
    if (c === '@tool-errors' || c === '@tool-error-reasons') {
      const failed = ctx.fx.expect.calls.filter((x) => x.exitCode !== 0);
      for (const rec of failed) {
        const key = callKey(rec.cmd, normArgv(rec.cmd, rec.argv, ctx.table.argv));
        const ours = ctx.out.calls.filter((x) => x.key === key && x.exitCode !== 0).at(-1);
        if (c === '@tool-errors' && ours) wanted.push(...lines(normText(ours.stderr)).filter((l) => l.trim()));
        if (c === '@tool-error-reasons' && !ctx.out.calls.some((x) => x.key === key)) {
          wanted.push(
            ...lines(rec.stderr)
              .filter((l) => l.trim())
              .map((l) => l.slice(l.lastIndexOf(': ') + 2)),
          );
        }
      }
    } else wanted = [substitute(c, ctx.fx)];
    for (const w of wanted) if (!text.includes(w)) diffs.push({ check: 'stdout', message: `does not contain ${JSON.stringify(w)} (${c})` });
  }
  for (const x of r.expect.stdoutExcludes) {
    const re = new RegExp(substitute(x, ctx.fx, true), 'm');
    if (re.test(text)) diffs.push({ check: 'stdout', message: `has a line matching /${re.source}/, which must not be there` });
  }
}

// ------------------------------------------------------------------ log

function compareLog(ctx: Ctx, r: Resolved, diffs: Diff[]): void {
  const all = lines(ctx.out.log);
  if (all[0] !== LOG_SENTINEL) diffs.push({ check: 'log', message: 'the line written before the run is gone: the log was truncated' });
  const ours = all.slice(1);
  const bad = ours.filter((l) => !/^\d{4}-\d\d-\d\d \d\d-\d\d-\d\d> /.test(l));
  if (bad.length) diffs.push({ check: 'log', message: `lines without the YYYY-MM-DD HH-MM-SS> prefix:\n${show(bad)}` });
  const opts = argValue(ctx.fx.argv, '-m', '--mount') ?? '';
  for (const m of opts.matchAll(/\b(?:password|pass|passwd)=([^,\s]+)/g)) {
    if (ctx.out.log.includes(m[1]!)) diffs.push({ check: 'log', message: 'a mount password is in the log' });
  }
  if (r.expect.log === 'recorded') {
    const mine = ours.map((l) => normText(l.replace(/^[^>]*> /, '')));
    let j = 0;
    for (const want of ctx.fx.expect.log.lines.map((l) => l.replace(/^<TS> /, ''))) {
      while (j < mine.length && mine[j] !== want) j++;
      if (j === mine.length) {
        diffs.push({ check: 'log', message: `recorded line missing (or out of order): ${JSON.stringify(want)}\n  ours:\n${show(mine)}` });
        break;
      }
      j++;
    }
  }
}

// ------------------------------------------------------------------ calls

function compareCalls(ctx: Ctx, r: Resolved, diffs: Diff[]): void {
  const c = r.expect.calls;
  const sub = (p: string): string => substitute(p, ctx.fx);
  const anyOf = (k: string, ps: string[]): boolean => ps.some((p) => matchesPattern(k, sub(p)));
  const ours = ctx.out.calls.map((x) => x.key);
  const uniq = (ks: string[]): string[] => [...new Set(ks)];

  for (const x of ctx.out.calls) {
    if (x.cmd === 'virsh' && x.norm[0] !== 'version' && !(x.norm[0] === VIRSH_URI[0] && x.norm[1] === VIRSH_URI[1])) {
      diffs.push({ check: 'calls', message: `virsh without -c qemu:///system: ${x.key}` });
    }
  }
  if (c.none) {
    if (ours.length) diffs.push({ check: 'calls', message: `expected no call at all, made:\n${show(ours)}` });
    return;
  }
  if (c.recorded) {
    let rec = ctx.fx.expect.calls.map((x) => callKey(x.cmd, normArgv(x.cmd, x.argv, ctx.table.argv)));
    if (c.dropFrom) {
      const i = rec.findIndex((k) => matchesPattern(k, sub(c.dropFrom!)));
      if (i >= 0) rec = rec.slice(0, i);
    }
    rec = uniq(rec.filter((k) => !anyOf(k, [...c.drop, ...c.optional])));
    const mine = uniq(ours).filter((k) => !anyOf(k, c.optional));
    const missing = rec.filter((k) => !mine.includes(k));
    const extra = mine.filter((k) => !rec.includes(k) && !anyOf(k, c.extra));
    if (missing.length) diffs.push({ check: 'calls', message: `recorded calls not made:\n${show(missing)}\n  ours:\n${show(ours)}` });
    if (extra.length) diffs.push({ check: 'calls', message: `calls not in the recording (and not declared):\n${show(extra)}` });
    const ordered = (ks: string[]): string[] => ks.filter((k) => !anyOf(k, c.unordered) && rec.includes(k) && mine.includes(k));
    const [a, b] = [ordered(rec), ordered(mine)];
    if (!isDeepStrictEqual(a, b)) diffs.push({ check: 'calls', message: `order differs:\n  recorded:\n${show(a)}\n  ours:\n${show(b)}` });
  }
  for (const p of c.require)
    if (!ours.some((k) => matchesPattern(k, sub(p)))) diffs.push({ check: 'calls', message: `required call not made: ${sub(p)}` });
  for (const p of c.forbid) {
    const hit = ours.filter((k) => matchesPattern(k, sub(p)));
    if (hit.length) diffs.push({ check: 'calls', message: `forbidden call made (${sub(p)}):\n${show(hit)}` });
  }
  let j = 0;
  for (const p of c.sequence) {
    while (j < ours.length && !matchesPattern(ours[j]!, sub(p))) j++;
    if (j === ours.length) {
      diffs.push({ check: 'calls', message: `sequence: ${sub(p)} not found (in order)\n  ours:\n${show(ours)}` });
      break;
    }
    j++;
  }
}

// ------------------------------------------------------------------ trees

function compareTrees(name: string, ours: Entry[], want: Entry[], diffs: Diff[], allowExtra: (e: Entry) => boolean = () => false): void {
  const mine = new Map(ours.map((e) => [e.path, e]));
  const problems: string[] = [];
  for (const w of want) {
    const o = mine.get(w.path);
    mine.delete(w.path);
    if (!o) {
      problems.push(`missing: ${w.path} (${w.type})`);
      continue;
    }
    const keys = new Set([...Object.keys(w), ...Object.keys(o)]);
    for (const k of keys) {
      if (k === 'path' || (k === 'size' && w.type === 'qcow2')) continue;
      let a = (w as unknown as Record<string, unknown>)[k];
      let b = (o as unknown as Record<string, unknown>)[k];
      if (k === 'topLayerData') [a, b] = [mergeAdjacent(a as Entry['topLayerData']), mergeAdjacent(b as Entry['topLayerData'])];
      if (!isDeepStrictEqual(a, b)) problems.push(`${w.path}: ${k} is ${JSON.stringify(b)}, expected ${JSON.stringify(a)}`);
    }
  }
  for (const o of mine.values()) if (!allowExtra(o)) problems.push(`unexpected: ${o.path} (${o.type})`);
  if (problems.length) diffs.push({ check: name, message: problems.join('\n  ') });
}

/** Allocated ranges; qemu-img map splits adjacent extents by host offset, which says nothing about content. */
const mergeAdjacent = (r: Entry['topLayerData']): Entry['topLayerData'] => {
  if (!r) return r;
  const out: Array<[number, number]> = [];
  for (const [s, l] of r) {
    const last = out.at(-1);
    if (last && last[0] + last[1] === s) last[1] += l;
    else out.push([s, l]);
  }
  return out;
};

const mergeRanges = (writes: readonly Write[]): Array<[number, number]> => {
  const clusters = [
    ...new Set(
      writes.flatMap((w) => {
        const out: number[] = [];
        for (let c = Math.floor(w.offset / 65536); c * 65536 < w.offset + w.length; c++) out.push(c);
        return out;
      }),
    ),
  ].sort((a, b) => a - b);
  const r: Array<[number, number]> = [];
  for (const c of clusters) {
    const last = r.at(-1);
    if (last && last[0] + last[1] === c * 65536) last[1] += 65536;
    else r.push([c * 65536, 65536]);
  }
  return r;
};

/**
 * The NAS a successful running-VM backup must leave: what was there, plus the new
 * folder with the four side files (what our fake answered) and one qcow2 per disk
 * whose guest-visible content equals the live disk: a full copy, or a thin
 * incremental relinked onto its parent holding exactly the dirty clusters.
 */
function expectedBackupTree(ctx: Ctx, kind: 'full' | 'incremental'): Entry[] {
  const { fx, out } = ctx;
  const p = argValue(fx.argv, '-p', '--path')!;
  const vm = argValue(fx.argv, '-v', '--vm')!;
  const tree = [...fx.nasBefore];
  const have = new Set(tree.map((e) => e.path));
  const parts = p.split('/');
  for (let i = 1; i <= parts.length; i++) {
    const d = parts.slice(0, i).join('/');
    if (!have.has(d)) tree.push({ path: d, type: 'dir', mode: '0755' });
  }
  const side: Array<[string, string]> = [
    ['domain-config.xml', 'dumpxml'],
    ['dominfo.xml', 'dominfo'],
    ['domiflist.xml', 'domiflist'],
    ['domblklist.xml', 'domblklist'],
  ];
  for (const [file, sub] of side) {
    const call = [...out.calls].reverse().find((c) => c.key === `virsh ${sub} ${vm}`);
    const raw = call?.stdout ?? '';
    const text = normText(raw);
    tree.push({
      path: `${p}/${file}`,
      type: 'file',
      size: Buffer.byteLength(raw),
      mode: '0644',
      sha256: createHash('sha256').update(text).digest('hex'),
      text,
      ...(text !== raw ? { sha256OfNormalizedText: true } : {}),
    });
  }
  const parents = (argValue(fx.argv, '--parent-paths', '--parent-path') ?? '').split(',').filter(Boolean);
  const disks = targetDomain(fx)!.disks.filter((k) => k.device === 'disk' && k.source !== '-');
  disks.forEach((disk, i) => {
    const vol = basename(disk.source);
    const file = `${i === 0 ? 'root' : 'datadisk'}.${vol}.qcow2`;
    const live = out.primaryAfter.find((e) => `<PRIMARY>/${e.path}` === disk.source);
    const e: Entry = {
      path: `${p}/${file}`,
      type: 'qcow2',
      mode: '0600',
      format: 'qcow2',
      virtualSize: disk.virtualSize!,
      bitmaps: [],
      corrupt: false,
      contentSha256: live?.contentSha256 ?? '(live disk not found)',
      check: { exitCode: 0, checkErrors: 0, corruptions: 0, leaks: 0 },
    };
    if (kind === 'full') {
      Object.assign(e, { backingFilename: null, backingFilenameFormat: null, backingChain: [], topLayerData: live?.topLayerData ?? [] });
    } else {
      // By volume id; a disk without one takes the file of its name from the parents' folder.
      const dirs = [...new Set(parents.map((x) => posix.dirname(x)))];
      const parent = parents.find((x) => x.endsWith(`.${vol}.qcow2`)) ?? (dirs.length === 1 ? `${dirs[0]}/${file}` : '');
      const pe = fx.nasBefore.find((x) => x.path === parent);
      Object.assign(e, {
        backingFilename: posix.relative(p, parent),
        backingFilenameFormat: 'qcow2',
        backingChain: [`<NAS>/${parent}`, ...(pe?.backingChain ?? [])],
        topLayerData: mergeRanges(disk.dirty ?? []),
      });
    }
    tree.push(e);
  });
  return tree.sort((a, b) => Buffer.compare(Buffer.from(a.path), Buffer.from(b.path)));
}

/** The declared files we add (nasAdds): present, and a manifest that decodes and lists the new backup's qcow2 files. */
function checkNasAdds(ctx: Ctx, r: Resolved, diffs: Diff[]): Set<string> {
  const adds = new Set(r.expect.nasAdds.map((a) => substitute(a, ctx.fx)));
  // A backup folder as ours writes it carries its manifest.
  if (r.expect.nas === 'backup-full' || r.expect.nas === 'backup-incremental') adds.add(substitute(`\${-p}/${MANIFEST_NAME}`, ctx.fx));
  const problems: string[] = [];
  for (const a of adds) {
    const e = ctx.out.nasAfter.find((x) => x.path === a);
    if (!e || e.type !== 'file') {
      problems.push(`missing: ${a} (file)`);
      continue;
    }
    if (posix.basename(a) !== MANIFEST_NAME) continue;
    try {
      const m = decodeManifest(readFileSync(join(NAS, a), 'utf8'));
      const dir = posix.dirname(a);
      const qcow2 = ctx.out.nasAfter.filter((x) => x.type === 'qcow2' && posix.dirname(x.path) === dir).map((x) => posix.basename(x.path));
      const listed = m.disks.map((d) => d.file);
      if (!isDeepStrictEqual([...listed].sort(), qcow2.sort()))
        problems.push(`${a}: lists ${JSON.stringify(listed)}, the folder holds ${JSON.stringify(qcow2)}`);
    } catch (e) {
      problems.push(`${a}: ${(e as Error).message}`);
    }
  }
  if (problems.length) diffs.push({ check: 'nas', message: problems.join('\n  ') });
  return adds;
}

function compareNas(ctx: Ctx, r: Resolved, diffs: Diff[]): void {
  const { fx, out } = ctx;
  const mode = r.expect.nas;
  const adds = mode === 'any' || mode === 'unchanged' ? new Set<string>() : checkNasAdds(ctx, r, diffs);
  const added = (e: Entry): boolean => adds.has(e.path);
  if (mode === 'any') {
    // the recording cannot say (the original never ran the operation)
  } else if (mode === 'recorded') compareTrees('nas', out.nasAfter, fx.expect.nasAfter, diffs, added);
  else if (mode === 'unchanged') {
    // `mkdir -p` of the instance folder (the original does it too) may leave it behind, empty.
    const p = argValue(fx.argv, '-p', '--path') ?? '';
    const ancestors = p
      .split('/')
      .slice(0, -1)
      .map((_, i, a) => a.slice(0, i + 1).join('/'));
    compareTrees('nas', out.nasAfter, fx.nasBefore, diffs, (e) => e.type === 'dir' && ancestors.includes(e.path));
  } else compareTrees('nas', out.nasAfter, expectedBackupTree(ctx, mode === 'backup-full' ? 'full' : 'incremental'), diffs, added);
  if (r.expect.primary !== 'any')
    compareTrees('primary', out.primaryAfter, r.expect.primary === 'recorded' ? fx.expect.primaryAfter : fx.primaryBefore, diffs);
}

// ------------------------------------------------------------------ the rest

function expectedCheckpoints(ctx: Ctx, mode: Exclude<Resolved['expect']['checkpoints'], 'any'>): Record<string, string[]> {
  const { fx } = ctx;
  if (mode === 'recorded') return fx.expect.hostAfter.checkpoints;
  const before = Object.fromEntries(fx.host.domains.map((d) => [d.name, [...d.checkpoints]]));
  if (mode === 'unchanged') return before;
  const vm = argValue(fx.argv, '-v', '--vm')!;
  const m = argValue(fx.argv, '-M', '--mode');
  const added = m === 'full' || m === 'incremental' ? [argValue(fx.argv, '--bitmap-new')!] : [];
  const parent = m === 'incremental' ? argValue(fx.argv, '--bitmap-parent') : undefined;
  before[vm] = [...new Set([...(before[vm] ?? []), ...added])].filter((n) => n !== parent);
  return before;
}

export function compare(fx: Fixture, out: Outcome, r: Resolved, table: Table): Diff[] {
  const ctx: Ctx = { fx, out, table };
  const diffs: Diff[] = [];
  if (out.timedOut) diffs.push({ check: 'exit', message: 'the program did not finish (killed by the watchdog)' });
  const exit = r.expect.exit ?? fx.expect.exitCode;
  if (exit === null) diffs.push({ check: 'exit', message: 'the original hung here: a rule must say what we do instead' });
  else if (exit !== 'any' && out.exitCode !== exit)
    diffs.push({
      check: 'exit',
      message: `exit ${out.exitCode}, expected ${exit} (recorded ${fx.expect.timedOut ? 'timeout' : fx.expect.exitCode})`,
    });

  const step = (name: string, f: () => void): void => {
    try {
      f();
    } catch (e) {
      diffs.push({ check: name, message: `comparison failed: ${(e as Error).stack ?? String(e)}` });
    }
  };
  step('stdout', () => compareStdout(ctx, r, diffs));
  step('stderr', () => {
    const want = r.expect.stderr === 'empty' ? '' : fx.expect.stderr.text;
    const got = normText(out.stderr);
    if (got !== want) diffs.push({ check: 'stderr', message: `ours:\n${show(lines(got))}\n  expected:\n${show(lines(want))}` });
  });
  step('log', () => compareLog(ctx, r, diffs));
  step('calls', () => compareCalls(ctx, r, diffs));
  step('nas', () => compareNas(ctx, r, diffs));
  step('checkpoints', () => {
    const sort = (o: Record<string, string[]>) =>
      Object.fromEntries(
        Object.entries(o)
          .map(([k, v]) => [k, [...v].sort()])
          .sort(),
      );
    if (r.expect.checkpoints === 'any') return;
    const want = expectedCheckpoints(ctx, r.expect.checkpoints);
    if (!isDeepStrictEqual(sort(out.checkpoints), sort(want))) {
      diffs.push({
        check: 'checkpoints',
        message: `libvirt checkpoints ${JSON.stringify(out.checkpoints)}, expected ${JSON.stringify(want)}`,
      });
    }
  });
  step('leftovers', () => {
    const rec = fx.expect.leftovers;
    const none = r.expect.leftovers === 'none';
    const want = {
      mounts: none ? [] : rec.mounts,
      tempDirs: none ? [] : rec.tempDirs,
      shimMounts: none ? [] : fx.expect.hostAfter.shimMounts,
    };
    const got = { mounts: out.leftovers.mounts, tempDirs: out.leftovers.tempDirs, shimMounts: out.shimMounts };
    if (!isDeepStrictEqual(got, want))
      diffs.push({ check: 'leftovers', message: `${JSON.stringify(got)}, expected ${JSON.stringify(want)}` });
  });
  return diffs;
}
