// The work folder both backup paths write into: it becomes the backup only when it is
// complete, and byte sizes computed with stat (never from `ls` columns).
import { lstat, mkdir, readdir, rename, rm, open, stat, unlink, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { NasbackupError, toNasbackupError } from '../../errors.js';
import { ensureWithin, exists } from '../../paths.js';
import { ownerInfo, readOwner, staleReason } from '../../nas/lock.js';

/**
 * The backup is written into `<timestamp>.partial` and renamed into place only when it
 * is complete, so an interrupted run never leaves something that looks finished.
 */
export class WorkDir {
  private created = false;
  private done = false;

  private constructor(
    readonly final: string,
    readonly path: string,
  ) {}

  /**
   * Call with the VM's lock held: unfinished folders that a dead run of this VM left
   * (its owner marker proves it) are removed first.
   */
  static async create(mountPoint: string, relPath: string, sweep?: { staleAfterMs: number; log: (m: string) => void }): Promise<WorkDir> {
    const final = await ensureWithin(mountPoint, relPath, { what: '-p', minDepth: 2 });
    const w = new WorkDir(final, `${final}.partial`);
    if (sweep) await removeDeadPartials(dirname(final), sweep.staleAfterMs, sweep.log);
    for (const p of [final, w.path]) {
      if (await exists(p)) {
        throw new NasbackupError(
          'BACKUP_EXISTS',
          p === final
            ? `Backup directory already exists: ${final}; refusing to overwrite it`
            : `An unfinished backup from an interrupted run exists: ${w.path}; delete it first`,
        );
      }
    }
    try {
      await mkdir(dirname(final), { recursive: true, mode: 0o755 });
      await mkdir(w.path, { mode: 0o755 });
      w.created = true;
      await writeFile(join(w.path, OWNER_MARKER), JSON.stringify(await ownerInfo('backup')) + '\n');
    } catch (e) {
      await w.discard().catch(() => {});
      throw new NasbackupError('NAS_WRITE_FAILED', `Failed to create backup directory ${final}`, { details: (e as Error).message });
    }
    return w;
  }

  file(name: string): string {
    return join(this.path, name);
  }

  /** Make it the backup: flush, rename into place, flush the rename. */
  async commit(): Promise<void> {
    try {
      await unlink(join(this.path, OWNER_MARKER)).catch(() => {});
      for (const name of await readdir(this.path)) await fsyncPath(join(this.path, name));
      await fsyncPath(this.path);
      await rename(this.path, this.final);
    } catch (e) {
      const code = toNasbackupError(e).code;
      throw new NasbackupError(
        code === 'INTERNAL' ? 'NAS_WRITE_FAILED' : code,
        `Failed to finish the backup ${this.final}: ${(e as Error).message}`,
      );
    }
    this.done = true;
    await fsyncPath(dirname(this.final));
  }

  /** Remove what this run wrote (only ever our own work folder). */
  async discard(): Promise<void> {
    if (this.created && !this.done) await rm(this.path, { recursive: true, force: true });
  }
}

/** Inside a work folder while it is written: who writes it (so a later run can tell it is dead). */
export const OWNER_MARKER = '.nasbackup-owner';

/** `*.partial` folders whose marker names a writer that is gone (never one without a marker). */
export async function removeDeadPartials(instanceDir: string, staleAfterMs: number, log: (m: string) => void): Promise<void> {
  const names = await readdir(instanceDir).catch(() => [] as string[]);
  for (const name of names) {
    if (!name.endsWith('.partial')) continue;
    const p = join(instanceDir, name);
    const st = await lstat(p).catch(() => null);
    if (!st?.isDirectory()) continue;
    const owner = await readOwner(join(p, OWNER_MARKER));
    if (!owner) continue;
    const why = await staleReason(owner.info, owner.ageMs, staleAfterMs);
    if (why === null) continue;
    log(
      `Removing ${p}, the unfinished backup of a dead run (${owner.info.operation} by pid ${owner.info.pid} on ${owner.info.host}): ${why}`,
    );
    await rm(p, { recursive: true, force: true });
  }
}

async function fsyncPath(p: string): Promise<void> {
  const fh = await open(p, 'r').catch(() => null);
  if (!fh) return;
  try {
    await fh.sync();
  } catch {
    // Some filesystems refuse fsync on directories; the data files were synced.
  } finally {
    await fh.close();
  }
}

/** `du -sb` of a folder: the sizes of the folder itself and everything below it. */
export async function apparentSize(path: string): Promise<bigint> {
  const st = await lstat(path, { bigint: true });
  let total = st.size;
  if (st.isDirectory()) for (const name of await readdir(path)) total += await apparentSize(join(path, name));
  return total;
}

/** What tolerantApparentSize reads (tests inject failures here). */
export interface SizeFs {
  lstat(path: string, opts: { bigint: true }): Promise<{ size: bigint; isDirectory(): boolean }>;
  readdir(path: string): Promise<string[]>;
}

/**
 * Sizes reported after the commit point (#13424): computed tolerantly, since a finished
 * backup must never be reported as failed because a size could not be read. What
 * cannot be read counts 0 and is logged (the newest agent records 0 and warns, too).
 */
export async function reportedSize(what: () => Promise<bigint>, name: string, log: (m: string) => void): Promise<bigint> {
  try {
    return await what();
  } catch (e) {
    log(`Warning: cannot read the size of ${name} (${(e as Error).message}); reporting 0 for it`);
    return 0n;
  }
}

/** Each finished file's size, tolerantly (reportedSize): what both backup paths report per disk. */
export function reportedSizes(dir: string, names: string[], log: (m: string) => void): Promise<Array<{ name: string; size: bigint }>> {
  return Promise.all(
    names.map(async (name) => ({
      name,
      size: await reportedSize(async () => (await stat(join(dir, name), { bigint: true })).size, name, log),
    })),
  );
}

/** `du -sb` that never fails: an entry that cannot be read (gone, EIO) counts 0 and is logged. */
export async function tolerantApparentSize(path: string, log: (m: string) => void, fs: SizeFs = { lstat, readdir }): Promise<bigint> {
  const st = await fs.lstat(path, { bigint: true }).catch((e: Error) => {
    log(`Warning: cannot read the size of ${path} (${e.message}); counting 0 for it`);
    return null;
  });
  if (!st) return 0n;
  let total = st.size;
  if (!st.isDirectory()) return total;
  const names = await fs.readdir(path).catch((e: Error) => {
    log(`Warning: cannot list ${path} (${e.message}); counting only the folder itself`);
    return [] as string[];
  });
  for (const name of names) total += await tolerantApparentSize(join(path, name), log, fs);
  return total;
}
