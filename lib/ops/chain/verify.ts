// Verify every chain of a VM: backing files present, named relatively, inside the VM
// folder, no cycles, equal virtual sizes, the chain safety check (regular files, no
// external data file, no corrupt bit, tables inside the file; a dirty bit is a warning),
// and `qemu-img check` clean. Header and metadata walking is native; only the structural
// check runs qemu-img, and never on a chain our reader rejected (a FIFO or a loop would
// hang it). Then content: each layer of a backup with a manifest.json is re-read and its
// digest per extent compared with the manifest (lib/store/layer-digest.ts); a backup
// without one (older than manifests) gets the structural checks only, and says so.
import { basename, join } from 'node:path';
import type { CheckResult } from '../../clients/qemu-img.js';
import type { Warning } from '../../errors.js';
import { backingFile, insideInstance, type BackupFile, type VmBackups } from './discover.js';
import { inspectChain, type ChainProblem } from '../../store/safety.js';
import type { LayerDigest } from '../../store/layer-digest.js';
import { MANIFEST_NAME, type ExtentDigest } from '../../store/manifest.js';
import { readManifestFile } from '../../store/manifest-file.js';

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

/** `qemu-img check` of one file. */
export type CheckFn = (abs: string) => Promise<CheckResult>;

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
}

export async function verifyChains(vm: VmBackups, check: CheckFn, concurrency = 2, content?: ContentOptions): Promise<VerifyReport> {
  const reports = new Map<BackupFile, FileReport>();
  const rejected = new Set<BackupFile>();
  const scanned = new Map<string, ChainProblem | null>();
  // Messages name files relative to the VM folder, as the report does.
  const rel = (m: string): string => m.split(`${vm.instanceDir}/`).join('');
  for (const f of vm.files) {
    const r: FileReport = { file: `${f.backup}/${f.name}`, backing: f.backingName, errors: [], warnings: [] };
    reports.set(f, r);
    if (f.error) {
      r.errors.push(`unreadable header: ${f.error}`);
      continue;
    }
    const safety = await inspectChain(f.abs, vm.instanceDir, { scanned });
    for (const w of safety.warnings)
      if (w.message.startsWith(`${f.abs} `) || w.message.startsWith(`${f.abs}:`)) r.warnings.push({ ...w, message: rel(w.message) });
    if (safety.problem) rejected.add(f);
    const p = safety.problem;
    // This file's own damage first; its backing reference is judged by the checks below.
    if (p && p.layer === f.abs && !p.reference) r.errors.push(rel(p.message));
    await checkReference(vm, f, r.errors, p && p.layer === f.abs && p.reference ? p : null, rel);
    // What breaks further down the chain.
    if (p && p.layer !== f.abs) r.errors.push(`chain ${p.kind === 'broken' ? 'unreadable' : p.kind}: ${rel(p.message)}`);
  }
  // Structural checks, a few at a time; never on a chain our reader rejected.
  for (const [f, r] of reports)
    if (rejected.has(f) && !f.error)
      r.warnings.push({ code: 'CHECK_SKIPPED', message: 'qemu-img check skipped: the chain failed the checks above' });
  const queue = vm.files.filter((f) => !f.error && !rejected.has(f));
  await Promise.all(
    Array.from({ length: Math.max(1, concurrency) }, async () => {
      for (let f = queue.shift(); f; f = queue.shift()) {
        const res = await check(f.abs);
        const r = reports.get(f)!;
        if (res.kind === 'clean') continue;
        if (res.kind === 'leaks')
          r.warnings.push({ code: 'LEAKED_CLUSTERS', message: 'qemu-img check: leaked clusters (harmless, space only)' });
        else r.errors.push(`qemu-img check failed (exit ${res.exitCode}): ${res.message}`);
      }
    }),
  );
  const files = [...reports.values()];
  const warnings = vm.partials.map((p): Warning => ({
    code: 'UNFINISHED_BACKUP',
    message: `unfinished backup folder of an interrupted run: ${p}`,
  }));
  if (content) {
    const skip = new Set(vm.files.filter((f) => f.error || rejected.has(f)).map((f) => f.abs));
    warnings.push(...(await verifyContent(vm, files, content.scope, content.digest, skip, content.between)));
  }
  return { ok: files.every((f) => f.errors.length === 0), files, warnings };
}

// ---- content: each layer against its backup's manifest ---------------------------------

/** Digests of one layer (lib/store/layer-digest.ts), injectable for tests. */
export type DigestFn = (abs: string, extentBytes: number) => Promise<LayerDigest>;

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
  between: () => void = () => {},
): Promise<Warning[]> {
  const warnings: Warning[] = [];
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
      let got: LayerDigest;
      try {
        got = await digest(f.abs, m.digest.extentBytes);
      } catch (e) {
        r.errors.push(`content unreadable: ${(e as Error).message.split(`${vm.instanceDir}/`).join('')}`);
        continue;
      }
      r.errors.push(...compareExtents(d.extents, got.extents));
    }
  }
  return warnings;
}
