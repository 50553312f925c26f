// Verify every chain of a VM: backing files present, named relatively, inside the VM
// folder, no cycles, equal virtual sizes, the chain safety check (regular files, no
// external data file, no corrupt bit, tables inside the file; a dirty bit is a warning),
// and the structural check clean (lib/qcow2/check.ts: refcounts against every reference;
// qemu-img check only for what it cannot answer, and never on a chain our reader rejected:
// a FIFO or a loop would hang it). Then content: each layer of a backup with a manifest.json is re-read and its
// digest per extent compared with the manifest (lib/store/layer-digest.ts); a backup
// without one (older than manifests) gets the structural checks only, and says so.
import { basename, join } from 'node:path';
import { NasbackupError, type Warning } from '../errors.js';
import { backingFile, insideInstance, type BackupFile, type VmBackups } from './backups.js';
import { inspectChain, type ChainProblem, type StructuralCheck } from './safety.js';
import type { LayerDigest } from './layer-digest.js';
import { MANIFEST_NAME, type ExtentDigest } from './manifest.js';
import { readManifestFile } from './manifest-file.js';

export interface FileReport {
  file: string;
  backing: string | null;
  errors: string[];
  warnings: Warning[];
}

export interface VerifyReport {
  ok: boolean;
  files: FileReport[];
  warnings: Warning[];
}

/** The structural check of one file (lib/store/safety.ts structuralCheck). */
export type CheckFn = (abs: string) => Promise<StructuralCheck>;

/** The checks of `f`'s backing reference; `refProblem` is what the chain safety check found in it. */
async function checkReference(
  vm: VmBackups,
  f: BackupFile,
  errors: string[],
  refProblem: ChainProblem | null,
  rel: (m: string) => string,
): Promise<void> {
  if (f.backingName === null) return;
  const before = errors.length;
  if (f.backingName.startsWith('/')) errors.push(`backing name is absolute (${f.backingName}); chains on the NAS must be relative`);
  if (f.backingAbs === null) {
    errors.push(`backing reference is not a file name: ${f.backingName}`);
    return;
  }
  if (!insideInstance(vm, f.backingAbs)) errors.push(`backing file is outside the VM folder: ${f.backingName}`);
  if (f.backingFormat !== null && f.backingFormat !== 'qcow2') errors.push(`backing format is ${f.backingFormat}, not qcow2`);
  const parent = await backingFile(vm, f);
  if (parent === null) {
    // Name the real reason (a FIFO, a device, …) when the reader found one.
    const why = refProblem?.kind === 'unsafe' && errors.length === before ? rel(refProblem.message) : null;
    errors.push(why ?? `backing file is missing or not a backup file: ${f.backingName}`);
  } else {
    if (parent.volId !== f.volId) errors.push(`backs onto another volume's file (${parent.backup}/${parent.name})`);
    if (parent.virtualSize !== null && f.virtualSize !== null && parent.virtualSize !== f.virtualSize) {
      errors.push(`virtual size ${f.virtualSize} differs from its backing's ${parent.virtualSize}`);
    }
  }
  // A bad reference the checks above did not name (a loop, …).
  if (refProblem && errors.length === before) errors.push(rel(refProblem.message));
}

export interface ContentOptions {
  /** Backup folders whose content is compared with their manifests. */
  scope: readonly string[];
  digest: DigestFn;
  /** A cancellation point between layers. */
  between?: () => void;
  /** Layers re-read at once (default 2: different files and extents in flight together). */
  layers?: number;
  /** Data bytes compared so far of the total the manifests list (a progress bar). */
  progress?: (done: number, total: number) => void;
}

export async function verifyChains(vm: VmBackups, check: CheckFn, concurrency = 2, content?: ContentOptions): Promise<VerifyReport> {
  const reports = new Map<BackupFile, FileReport>();
  const rejected = new Set<BackupFile>();
  const scanned = new Map<string, ChainProblem | null>();
  const cleanBelow = new Map<string, Warning[]>();
  // Messages name files relative to the VM folder, as the report does.
  const rel = (m: string): string => m.split(`${vm.instanceDir}/`).join('');
  for (const f of vm.files) {
    const r: FileReport = { file: `${f.backup}/${f.name}`, backing: f.backingName, errors: [], warnings: [] };
    reports.set(f, r);
    if (f.error) r.errors.push(`unreadable header: ${f.error}`);
  }
  // The chain walks, a few at a time (each mostly waits for small reads); a walk stops at a
  // lower layer another walk found clean, so the VM's files are walked about once.
  await pool(
    4,
    vm.files.filter((f) => !f.error),
    async (f) => {
      const r = reports.get(f)!;
      const safety = await inspectChain(f.abs, vm.instanceDir, { scanned, cleanBelow });
      for (const w of safety.warnings)
        if (w.message.startsWith(`${f.abs} `) || w.message.startsWith(`${f.abs}:`)) r.warnings.push({ ...w, message: rel(w.message) });
      if (safety.problem) rejected.add(f);
      const p = safety.problem;
      // This file's own damage first; its backing reference is judged by the checks below.
      if (p && p.layer === f.abs && !p.reference) r.errors.push(rel(p.message));
      await checkReference(vm, f, r.errors, p && p.layer === f.abs && p.reference ? p : null, rel);
      // What breaks further down the chain.
      if (p && p.layer !== f.abs) r.errors.push(`chain ${p.kind === 'broken' ? 'unreadable' : p.kind}: ${rel(p.message)}`);
    },
  );
  // Structural checks, a few at a time; never on a chain our reader rejected.
  for (const [f, r] of reports)
    if (rejected.has(f) && !f.error)
      r.warnings.push({ code: 'CHECK_SKIPPED', message: 'structural check skipped: the chain failed the checks above' });
  const files = [...reports.values()];
  const warnings = vm.partials.map((p): Warning => ({
    code: 'UNFINISHED_BACKUP',
    message: `unfinished backup folder of an interrupted run: ${p}`,
  }));
  // The structural checks (metadata) run while the content is re-read (data); their lines go
  // where they went when the two ran one after the other, before the content's.
  const at = new Map(files.map((r) => [r, { errors: r.errors.length, warnings: r.warnings.length }]));
  const structural = new Map<BackupFile, StructuralCheck>();
  const skip = new Set(vm.files.filter((f) => f.error || rejected.has(f)).map((f) => f.abs));
  const [checked, proved] = await Promise.allSettled([
    pool(
      concurrency,
      vm.files.filter((f) => !f.error && !rejected.has(f)),
      async (f) => void structural.set(f, await check(f.abs)),
    ),
    content ? verifyContent(vm, files, content.scope, content.digest, skip, content) : Promise.resolve([]),
  ]);
  if (checked.status === 'rejected') throw checked.reason;
  if (proved.status === 'rejected') throw proved.reason;
  for (const f of vm.files) {
    const res = structural.get(f);
    if (!res || res.kind === 'clean') continue;
    const r = reports.get(f)!;
    if (res.kind === 'leaks') r.warnings.splice(at.get(r)!.warnings, 0, { code: 'LEAKED_CLUSTERS', message: res.message });
    else r.errors.splice(at.get(r)!.errors, 0, res.message);
  }
  warnings.push(...proved.value);
  return { ok: files.every((f) => f.errors.length === 0), files, warnings };
}

// ---- content: each layer against its backup's manifest ---------------------------------

/** Digests of one layer (lib/store/layer-read.ts), injectable for tests; `onData`: bytes hashed so far. */
export type DigestFn = (abs: string, extentBytes: number, onData?: (bytes: number) => void) => Promise<LayerDigest>;

/** `extent <n>: digest mismatch` lines, by extent number. */
export function compareExtents(want: readonly ExtentDigest[], got: readonly ExtentDigest[]): string[] {
  const w = new Map(want.map((e) => [e.index, e.digest]));
  const g = new Map(got.map((e) => [e.index, e.digest]));
  const out: string[] = [];
  for (const i of [...new Set([...w.keys(), ...g.keys()])].sort((a, b) => a - b)) {
    const a = w.get(i);
    const b = g.get(i);
    if (a === b) continue;
    out.push(
      `extent ${i}: digest mismatch${a === undefined ? ' (the manifest records nothing there)' : b === undefined ? ' (the layer holds nothing there now)' : ''}`,
    );
  }
  return out;
}

/**
 * Content proof of the backups in `scope`: every disk file the manifest lists is
 * re-read and its per-extent digests compared; a file not listed, or listed and missing,
 * is a problem too. A backup without a manifest gets a NO_MANIFEST warning.
 */
export async function verifyContent(
  vm: VmBackups,
  reports: FileReport[],
  scope: readonly string[],
  digest: DigestFn,
  skip: ReadonlySet<string>,
  opts: Pick<ContentOptions, 'between' | 'layers' | 'progress'> = {},
): Promise<Warning[]> {
  const between = opts.between ?? ((): void => {});
  const warnings: Warning[] = [];
  // Every layer to re-read, then a few at a time: the reads of one overlap the hashing of another.
  const jobs: { r: FileReport; abs: string; extentBytes: number; want: readonly ExtentDigest[]; bytes: number }[] = [];
  const instance = basename(vm.instanceDir);
  for (const backup of scope) {
    const m = await readManifestFile(join(vm.instanceDir, backup));
    if (m === null) {
      warnings.push({ code: 'NO_MANIFEST', message: `${backup}: no manifest: structural checks only` });
      continue;
    }
    if ('error' in m) {
      reports.push({ file: `${backup}/${MANIFEST_NAME}`, backing: null, errors: [m.error], warnings: [] });
      continue;
    }
    const problems: string[] = [];
    if (m.path !== `${instance}/${backup}`) problems.push(`the manifest is of another backup (${m.path})`);
    if (problems.length) reports.push({ file: `${backup}/${MANIFEST_NAME}`, backing: null, errors: problems, warnings: [] });
    const files = vm.files.filter((f) => f.backup === backup);
    for (const f of files) {
      const r = reports.find((x) => x.file === `${backup}/${f.name}`);
      if (r && !m.disks.some((d) => d.file === f.name)) r.errors.push(`not listed in the manifest`);
    }
    for (const d of m.disks) {
      between();
      const f = files.find((x) => x.name === d.file);
      let r = reports.find((x) => x.file === `${backup}/${d.file}`);
      if (!r) {
        r = { file: `${backup}/${d.file}`, backing: null, errors: [], warnings: [] };
        reports.push(r);
      }
      if (!f) {
        r.errors.push('listed in the manifest but missing');
        continue;
      }
      if (skip.has(f.abs)) {
        r.warnings.push({ code: 'CHECK_SKIPPED', message: 'content not compared with the manifest: the layer failed the checks above' });
        continue;
      }
      if (f.virtualSize !== null && f.virtualSize !== BigInt(d.virtualSize))
        r.errors.push(`virtual size ${f.virtualSize}, the manifest says ${d.virtualSize}`);
      if (f.backingName !== d.backing) r.errors.push(`backing ${f.backingName ?? 'none'}, the manifest says ${d.backing ?? 'none'}`);
      jobs.push({ r, abs: f.abs, extentBytes: m.digest.extentBytes, want: d.extents, bytes: d.dataBytes });
    }
  }
  const total = jobs.reduce((n, j) => n + j.bytes, 0);
  let done = 0;
  const onData = opts.progress
    ? (n: number): void => {
        done += n;
        opts.progress!(Math.min(done, total), total);
      }
    : undefined;
  opts.progress?.(0, total);
  await pool(opts.layers ?? 2, jobs, async (j) => {
    between();
    let got: LayerDigest;
    try {
      got = await digest(j.abs, j.extentBytes, onData);
    } catch (e) {
      if (e instanceof NasbackupError) throw e; // a stop (signal) from the cancellation point
      j.r.errors.push(`content unreadable: ${(e as Error).message.split(`${vm.instanceDir}/`).join('')}`);
      return;
    }
    j.r.errors.push(...compareExtents(j.want, got.extents));
  });
  return warnings;
}

/** Run `work` on every item, `n` at a time. */
async function pool<T>(n: number, items: readonly T[], work: (item: T) => Promise<void>): Promise<void> {
  const queue = [...items];
  await Promise.all(
    Array.from({ length: Math.max(1, Math.min(n, queue.length)) }, async () => {
      for (let x = queue.shift(); x !== undefined; x = queue.shift()) await work(x);
    }),
  );
}
