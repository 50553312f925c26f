// -o delete: remove exactly one backup directory below the mount root, printing
// `rm -v` style lines. Never follows symbolic links, never crosses into another
// mounted filesystem, and a directory already gone is success (retries are safe).
import { lstat, readdir, rmdir, unlink } from 'node:fs/promises';
import { join } from 'node:path';
import { NasbackupError, withResult } from '../errors.js';
import { ensureWithin, exists } from '../paths.js';
import type { NasTarget } from '../nas/session.js';
import type { DeleteResult, RemovedEntry } from './results.js';
import { syncAfter, type OpContext } from './context.js';

/** Checked by lib/cli/validate.ts. */
export interface DeleteArgs {
  nas: NasTarget;
  /** Mount-relative `<instance>/<timestamp>`. */
  path: string;
  /** Its first component: the VM lock. */
  instance: string;
}

/** `<instance>/<timestamp>` at least: never the root, never an instance folder as a whole. */
export const DELETE_MIN_DEPTH = 2;

export async function deleteOperation(ctx: OpContext, args: DeleteArgs): Promise<DeleteResult> {
  const nas = await ctx.openNas(args.nas);
  const abs = await ensureWithin(nas.mountPoint, args.path, { what: '-p', minDepth: DELETE_MIN_DEPTH });
  const instance = args.instance;
  if (await exists(await ensureWithin(nas.mountPoint, instance, { what: '-p' }))) {
    await ctx.lockVm(nas.mountPoint, instance, 'delete');
  }
  const removed: RemovedEntry[] = [];
  const result: DeleteResult = { path: args.path, removed };
  const st = await lstat(abs).catch((e: NodeJS.ErrnoException) => {
    if (e.code === 'ENOENT') return null;
    throw e;
  });
  if (st === null) {
    ctx.logger.log(`Delete: ${abs} does not exist; nothing to do`);
  } else if (st.isSymbolicLink()) {
    throw new NasbackupError('PATH_INVALID', `Refusing to delete ${abs}: it is a symbolic link, not a backup`);
  } else {
    try {
      await removeTree(ctx, abs, st.dev, removed);
    } catch (e) {
      // What was removed before the failure is still reported (as `rm -v` would have).
      const err =
        e instanceof NasbackupError ? e : new NasbackupError('DELETE_FAILED', `Failed to delete ${abs}`, { details: (e as Error).message });
      throw withResult(err, result);
    }
  }
  await syncAfter(ctx, 'delete', { fileSystemOf: nas.mountPoint }); // syncfs of the NAS, not every disk of the host
  return result;
}

/** Depth-first removal: contents first, each directory after what it held; each entry is added to `removed` once gone. */
export async function removeTree(ctx: OpContext, path: string, dev: number, removed: RemovedEntry[]): Promise<void> {
  ctx.checkpoint();
  const st = await lstat(path);
  if (!st.isDirectory()) {
    await unlink(path);
    removed.push({ path, directory: false });
    return;
  }
  if (st.dev !== dev) {
    throw new NasbackupError('DELETE_FAILED', `Refusing to delete ${path}: another filesystem is mounted there`);
  }
  for (const name of await readdir(path)) {
    await removeTree(ctx, join(path, name), dev, removed);
  }
  await rmdir(path);
  removed.push({ path, directory: true });
}
