// The real chains of a VM, read from the NAS itself: every backup disk file under
// `<instance>/`, its qcow2 header, and its backing resolved relative to its folder.
// The ground truth for repair and verification; no database needed.
import { lstat, readdir, realpath, stat } from 'node:fs/promises';
import { join, relative, sep } from 'node:path';
import { volumeIdOfBackupFile } from './disks.js';
import type { Stats } from 'node:fs';
import { isFollowableBackingName, resolveBackingName, readHeader, type Qcow2Header } from '../qcow2/index.js';
import { isWithin } from '../paths.js';

export interface BackupFile {
  /** Backup folder name (the timestamp), e.g. 2025.01.02.00.00.00. */
  backup: string;
  /** File name, e.g. root.<vol>.qcow2. */
  name: string;
  abs: string;
  volId: string;
  kind: 'root' | 'datadisk';
  virtualSize: bigint | null;
  /** Backing name as stored in the header, or null for a full. */
  backingName: string | null;
  backingFormat: string | null;
  /** The backing resolved to an absolute path (null when none or not a file name). */
  backingAbs: string | null;
  /** Set when the header could not be read. */
  error: string | null;
  /** dev:ino, to match backing references to files whatever their spelling. */
  key: string;
}

export interface VmBackups {
  instanceDir: string;
  /** Backup folder names, oldest first (timestamps sort lexically). */
  backups: string[];
  files: BackupFile[];
  /** Unfinished folders of interrupted runs (`*.partial`). */
  partials: string[];
  /**
   * What discover() found each sound file to be (by `abs`), for a chain walk of the same run
   * not to look again (lib/store/safety.ts InspectOptions.looks).
   */
  looked?: Map<string, DiscoveredLayer>;
}

/** A backup file as discover() read it: where it really is, its stat and header. */
export interface DiscoveredLayer {
  real: string;
  st: Stats;
  header: Qcow2Header;
}

export async function discover(instanceDir: string): Promise<VmBackups> {
  const entries = await readdir(instanceDir, { withFileTypes: true }).catch((e: NodeJS.ErrnoException) => {
    if (e.code === 'ENOENT') return [];
    throw e;
  });
  const backups: string[] = [];
  const partials: string[] = [];
  for (const e of entries) {
    if (!e.isDirectory() || e.name.startsWith('.')) continue;
    (e.name.endsWith('.partial') ? partials : backups).push(e.name);
  }
  backups.sort();
  const realDir = await realpath(instanceDir).catch(() => instanceDir);
  // A few folders and files at once (a chain of 50 read one by one waits on 50 × 5 small
  // reads in turn); the lists keep their order.
  const names = await mapLimit(DISCOVER_IN_FLIGHT, backups, async (b) => (await readdir(join(instanceDir, b))).sort());
  const all = backups.flatMap((b, i) => names[i]!.map((name) => ({ b, name })));
  const looked = new Map<string, DiscoveredLayer>();
  const found = await mapLimit(DISCOVER_IN_FLIGHT, all, ({ b, name }) =>
    readBackupFile(realDir, b, name, join(instanceDir, b, name), looked),
  );
  const files = found.filter((f): f is BackupFile => f !== null);
  return { instanceDir, backups, files, partials, looked };
}

const DISCOVER_IN_FLIGHT = 8;

/** `work` on every item, `n` at a time; the results in the items' order. */
export async function mapLimit<T, R>(n: number, items: readonly T[], work: (item: T) => Promise<R>): Promise<R[]> {
  const out: R[] = new Array<R>(items.length);
  let next = 0;
  await Promise.all(
    Array.from({ length: Math.max(1, Math.min(n, items.length)) }, async () => {
      while (next < items.length) {
        const i = next++;
        out[i] = await work(items[i]!);
      }
    }),
  );
  return out;
}

/**
 * One backup disk file as discover() sees it (null: not a backup disk file by its name).
 * `backup` is the folder name it is listed under; `abs` where it is (a backup being
 * written is still in its `.partial` folder, a sibling, so backing names resolve alike).
 */
export async function readBackupFile(
  realInstanceDir: string,
  backup: string,
  name: string,
  abs: string,
  looked?: Map<string, DiscoveredLayer>,
): Promise<BackupFile | null> {
  const volId = volumeIdOfBackupFile(name);
  if (volId === null) return null;
  const st = (await stat(abs).catch(() => null)) ?? (await lstat(abs));
  const f: BackupFile = {
    backup,
    name,
    abs,
    volId,
    kind: name.startsWith('root.') ? 'root' : 'datadisk',
    virtualSize: null,
    backingName: null,
    backingFormat: null,
    backingAbs: null,
    error: null,
    key: `${st.dev}:${st.ino}`,
  };
  // Nothing outside the VM folder is read, and nothing that could block (a FIFO).
  const real = await realpath(abs).catch(() => null);
  if (real === null || !isWithin(realInstanceDir, real, { strict: true })) {
    f.error = real === null ? 'a link to nothing' : `resolves outside the VM folder (${real})`;
  } else if (!st.isFile()) {
    f.error = 'not a regular file';
  } else {
    try {
      const h = await readHeader(abs);
      f.virtualSize = h.size;
      f.backingName = h.backingFile;
      f.backingFormat = h.backingFormat;
      if (h.backingFile !== null && isFollowableBackingName(h.backingFile)) f.backingAbs = resolveBackingName(abs, h.backingFile);
      looked?.set(abs, { real, st, header: h });
    } catch (e) {
      f.error = (e as Error).message;
    }
  }
  return f;
}

/** The file a backing reference points at, if it is one of the VM's backup files. */
export async function backingFile(vm: VmBackups, f: BackupFile): Promise<BackupFile | null> {
  if (f.backingAbs === null) return null;
  const st = await stat(f.backingAbs).catch(() => null);
  if (!st) return null;
  return vm.files.find((o) => o.key === `${st.dev}:${st.ino}`) ?? null;
}

/** Files whose backing is `f` (its direct dependents). */
export async function dependentsOf(vm: VmBackups, f: BackupFile): Promise<BackupFile[]> {
  const out: BackupFile[] = [];
  for (const o of vm.files) if (o !== f && (await backingFile(vm, o)) === f) out.push(o);
  return out;
}

/** True when `abs` lies inside the instance folder. */
export function insideInstance(vm: VmBackups, abs: string): boolean {
  const rel = relative(vm.instanceDir, abs);
  return rel !== '' && !rel.startsWith('..') && !rel.startsWith(sep);
}
