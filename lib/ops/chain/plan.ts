// The improved delete planner, over the chains as they are on the NAS: it repairs
// EVERY disk of a dependent backup (matching files by volume id), refuses when the old
// chain is unreadable, and refuses when the management server's metadata disagrees
// with what the files say.
import { posix, relative } from 'node:path';
import { chainPosition, CHAIN_ID, type BackupRecord } from './provider-plan.js';
import { backingFile, dependentsOf, type BackupFile, type VmBackups } from '../../store/backups.js';

export interface DiskRebase {
  volId: string;
  /** Mount-relative paths, as `-o rebase` takes them. */
  target: string;
  newBacking: string;
}

export interface DeletePlan {
  /** `<instance>/<timestamp>` asked for. */
  backup: string;
  proceed: boolean;
  reason: string | null;
  /** Safe rebases to run first (each keeps its file's content). */
  rebases: DiskRebase[];
  /** Backup folders (mount-relative) to remove afterwards, dependents first. */
  remove: string[];
}

const refuse = (backup: string, reason: string): DeletePlan => ({ backup, proceed: false, reason, rebases: [], remove: [] });

export async function planDelete(
  vm: VmBackups,
  instance: string,
  backup: string,
  opts: { force: boolean; records?: BackupRecord[] },
): Promise<DeletePlan> {
  const rel = (f: BackupFile | string): string =>
    typeof f === 'string' ? posix.join(instance, f) : posix.join(instance, relative(vm.instanceDir, f.abs).split('\\').join('/'));
  const id = posix.join(instance, backup);
  if (!vm.backups.includes(backup)) {
    // Already gone (a retry after an interruption): nothing left to do.
    return { backup: id, proceed: true, reason: null, rebases: [], remove: [] };
  }
  const own = vm.files.filter((f) => f.backup === backup);
  const deps = new Map<BackupFile, BackupFile[]>();
  for (const f of own) deps.set(f, await dependentsOf(vm, f));
  const dependentBackups = [...new Set([...deps.values()].flat().map((d) => d.backup))].sort();

  if (opts.records) {
    const why = await crossCheck(vm, backup, instance, dependentBackups, opts.records);
    if (why) return refuse(id, why);
  }
  if (dependentBackups.length === 0) return { backup: id, proceed: true, reason: null, rebases: [], remove: [id] };

  const anchors = own.filter((f) => f.backingName === null && (deps.get(f) ?? []).length > 0);
  if (anchors.length > 0) {
    const all = await descendants(vm, own);
    if (!opts.force) {
      return refuse(
        id,
        `Backup ${id} is the full backup of ${all.length} later backup(s) (${all.join(', ')}). ` +
          'Delete those first, or use --force to remove the whole chain.',
      );
    }
    // Newest first, so no backup ever backs onto a removed one while this runs.
    return {
      backup: id,
      proceed: true,
      reason: null,
      rebases: [],
      remove: [
        ...all
          .sort()
          .reverse()
          .map((b) => rel(b)),
        id,
      ],
    };
  }

  const rebases: DiskRebase[] = [];
  for (const [f, ds] of deps) {
    if (ds.length === 0) continue;
    const parent = await backingFile(vm, f);
    if (parent === null) {
      return refuse(id, `Cannot repair the chain: ${rel(f)} backs onto ${f.backingName}, which is not a readable backup file on the NAS`);
    }
    if (parent.error) return refuse(id, `Cannot repair the chain: the parent ${rel(parent)} is unreadable (${parent.error})`);
    for (const d of ds) {
      if (d.volId !== f.volId) return refuse(id, `Cannot repair the chain: ${rel(d)} backs onto ${rel(f)}, a file of another volume`);
      if (d.error) return refuse(id, `Cannot repair the chain: ${rel(d)} is unreadable (${d.error})`);
      rebases.push({ volId: d.volId, target: rel(d), newBacking: rel(parent) });
    }
  }
  return { backup: id, proceed: true, reason: null, rebases, remove: [id] };
}

/** Backup folders that depend on any of `files`, directly or not. */
async function descendants(vm: VmBackups, files: BackupFile[]): Promise<string[]> {
  const seen = new Set<string>();
  let frontier = files;
  while (frontier.length > 0) {
    const next: BackupFile[] = [];
    for (const f of frontier) {
      for (const d of await dependentsOf(vm, f)) {
        if (!seen.has(d.backup)) {
          seen.add(d.backup);
          next.push(...vm.files.filter((x) => x.backup === d.backup));
        }
      }
    }
    frontier = next;
  }
  return [...seen];
}

/**
 * The metadata's view (chain position ±1) must match the files' view, else the
 * database and the NAS disagree and repairing from either could lose data.
 */
async function crossCheck(
  vm: VmBackups,
  backup: string,
  instance: string,
  dependentBackups: string[],
  records: BackupRecord[],
): Promise<string | null> {
  const id = posix.join(instance, backup);
  const rec = records.find((r) => r.externalId.replace(/\/+$/, '') === id);
  if (!rec) return `Metadata and NAS disagree: no backup record has externalId ${id}`;
  const chainId = rec.details[CHAIN_ID];
  if (!chainId) return null; // legacy backup: no chain metadata to compare
  const pos = chainPosition(rec);
  const members = records.filter((r) => r !== rec && r.details[CHAIN_ID] === chainId && String(r.vmId) === String(rec.vmId));
  const childRecs = members.filter((r) => chainPosition(r) === pos + 1).map((r) => posix.basename(r.externalId));
  const onDiskChildren = dependentBackups;
  const same = childRecs.length === onDiskChildren.length && childRecs.every((c) => onDiskChildren.includes(c));
  if (!same) {
    return `Metadata and NAS disagree about what depends on ${id}: records say [${childRecs.join(', ')}], the files say [${onDiskChildren.join(', ')}]`;
  }
  if (pos > 0) {
    const parentRec = members.find((r) => chainPosition(r) === pos - 1);
    const parents = new Set<string>();
    for (const f of vm.files.filter((x) => x.backup === backup)) {
      const p = await backingFile(vm, f);
      if (p) parents.add(p.backup);
    }
    if (parentRec && !parents.has(posix.basename(parentRec.externalId))) {
      return `Metadata and NAS disagree about the parent of ${id}: records say ${parentRec.externalId}, the files say [${[...parents].join(', ')}]`;
    }
  }
  return null;
}
