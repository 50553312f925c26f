// Verify every chain of a VM: backing files present, named relatively, inside the VM
// folder, no cycles, equal virtual sizes, and `qemu-img check` clean. Header walking
// is native (one read per file); only the structural check runs qemu-img.
import { readChain } from '../qcow2/index.js';
import { backingFile, insideInstance, type BackupFile, type VmBackups } from './discover.js';

export interface FileReport {
  file: string;
  backing: string | null;
  errors: string[];
  warnings: string[];
}

export interface VerifyReport {
  ok: boolean;
  files: FileReport[];
  warnings: string[];
}

/** Result of `qemu-img check` for one file: exit code and its JSON (if any). */
export type CheckFn = (abs: string) => Promise<{ exitCode: number | null; stdout: string; stderr: string }>;

export async function verifyChains(vm: VmBackups, check: CheckFn, concurrency = 2): Promise<VerifyReport> {
  const reports = new Map<BackupFile, FileReport>();
  for (const f of vm.files) {
    const r: FileReport = { file: `${f.backup}/${f.name}`, backing: f.backingName, errors: [], warnings: [] };
    reports.set(f, r);
    if (f.error) {
      r.errors.push(`unreadable header: ${f.error}`);
      continue;
    }
    if (f.backingName === null) continue;
    if (f.backingName.startsWith('/')) r.errors.push(`backing name is absolute (${f.backingName}); chains on the NAS must be relative`);
    if (f.backingAbs === null) {
      r.errors.push(`backing reference is not a file name: ${f.backingName}`);
      continue;
    }
    if (!insideInstance(vm, f.backingAbs)) r.errors.push(`backing file is outside the VM folder: ${f.backingName}`);
    if (f.backingFormat !== null && f.backingFormat !== 'qcow2') r.errors.push(`backing format is ${f.backingFormat}, not qcow2`);
    const parent = await backingFile(vm, f);
    if (parent === null) {
      r.errors.push(`backing file is missing or not a backup file: ${f.backingName}`);
      continue;
    }
    if (parent.volId !== f.volId) r.errors.push(`backs onto another volume's file (${parent.backup}/${parent.name})`);
    if (parent.virtualSize !== null && f.virtualSize !== null && parent.virtualSize !== f.virtualSize) {
      r.errors.push(`virtual size ${f.virtualSize} differs from its backing's ${parent.virtualSize}`);
    }
    try {
      await readChain(f.abs);
    } catch (e) {
      r.errors.push(`chain unreadable: ${(e as Error).message}`);
    }
  }
  // Structural checks, a few at a time.
  const queue = vm.files.filter((f) => !f.error);
  await Promise.all(
    Array.from({ length: Math.max(1, concurrency) }, async () => {
      for (let f = queue.shift(); f; f = queue.shift()) {
        const res = await check(f.abs);
        const r = reports.get(f)!;
        if (res.exitCode === 0) continue;
        if (res.exitCode === 3) r.warnings.push('qemu-img check: leaked clusters (harmless, space only)');
        else r.errors.push(`qemu-img check failed (exit ${res.exitCode}): ${(res.stderr || res.stdout).trim().split('\n')[0] ?? ''}`);
      }
    }),
  );
  const files = [...reports.values()];
  const warnings = vm.partials.map((p) => `unfinished backup folder of an interrupted run: ${p}`);
  return { ok: files.every((f) => f.errors.length === 0), files, warnings };
}
