// The work folder both backup paths write into: it becomes the backup only when it is
// complete, and byte sizes computed with stat (never from `ls` columns).
import { lstat, mkdir, readdir, rename, rm, open } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { NasbackupError, toNasbackupError } from '../../errors.js';
import { ensureWithin, exists } from '../../paths.js';

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

  static async create(mountPoint: string, relPath: string): Promise<WorkDir> {
    const final = await ensureWithin(mountPoint, relPath, { what: '-p', minDepth: 2 });
    const w = new WorkDir(final, `${final}.partial`);
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
    } catch (e) {
      throw new NasbackupError('NAS_WRITE_FAILED', `Failed to create backup directory ${final}`, { details: (e as Error).message });
    }
    w.created = true;
    return w;
  }

  file(name: string): string {
    return join(this.path, name);
  }

  /** Make it the backup: flush, rename into place, flush the rename. */
  async commit(): Promise<void> {
    try {
      for (const name of await readdir(this.path)) await fsyncPath(join(this.path, name));
      await fsyncPath(this.path);
      await rename(this.path, this.final);
    } catch (e) {
      const code = toNasbackupError(e).code;
      throw new NasbackupError(code === 'INTERNAL' ? 'NAS_WRITE_FAILED' : code, `Failed to finish the backup ${this.final}: ${(e as Error).message}`);
    }
    this.done = true;
    await fsyncPath(dirname(this.final));
  }

  /** Remove what this run wrote (only ever our own work folder). */
  async discard(): Promise<void> {
    if (this.created && !this.done) await rm(this.path, { recursive: true, force: true });
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
