// Verify every chain of a VM: backing files present, named relatively, inside the VM
// folder, no cycles, equal virtual sizes, the chain safety check (regular files, no
// external data file, no corrupt bit, tables inside the file; a dirty bit is a warning),
// and `qemu-img check` clean. Header and metadata walking is native; only the structural
// check runs qemu-img, and never on a chain our reader rejected (a FIFO or a loop would
// hang it).
import type { CheckResult } from '../../clients/qemu-img.js';
import type { Warning } from '../../errors.js';
import { backingFile, insideInstance, type BackupFile, type VmBackups } from './discover.js';
import { inspectChain, type ChainProblem } from '../../store/safety.js';

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

export async function verifyChains(vm: VmBackups, check: CheckFn, concurrency = 2): Promise<VerifyReport> {
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
  return { ok: files.every((f) => f.errors.length === 0), files, warnings };
}
