// -o delete: remove exactly one backup directory below the mount root, printing
// `rm -v` style lines. Never follows symbolic links, never crosses into another
// mounted filesystem, and a directory already gone is success (retries are safe).
import { lstat, readdir, rmdir, unlink } from 'node:fs/promises';
import { join } from 'node:path';
import { removedDirectoryLine, removedFileLine } from '../agent-output.js';
import { NasbackupError } from '../errors.js';
import { ensureWithin, exists, parseRelativePath } from '../paths.js';
import type { NasTarget } from '../nas/session.js';
import { syncAfter, type OpContext } from './context.js';

export interface DeleteArgs {
  nas: NasTarget;
  path: string;
}

/** `<instance>/<timestamp>` at least: never the root, never an instance folder as a whole. */
export const DELETE_MIN_DEPTH = 2;

export function validateDeleteArgs(a: { path?: string }): void {
  if (a.path === undefined) throw new NasbackupError('MISSING_ARGUMENT', 'delete requires -p <backup path>');
  parseRelativePath(a.path, { what: '-p', minDepth: DELETE_MIN_DEPTH });
}

export async function deleteOperation(ctx: OpContext, args: DeleteArgs): Promise<void> {
  validateDeleteArgs(args);
  const nas = await ctx.openNas(args.nas);
  const abs = await ensureWithin(nas.mountPoint, args.path, { what: '-p', minDepth: DELETE_MIN_DEPTH });
  const instance = parseRelativePath(args.path, { what: '-p' })[0]!;
  if (await exists(await ensureWithin(nas.mountPoint, instance, { what: '-p' }))) {
    await ctx.lockVm(nas.mountPoint, instance, 'delete');
  }
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
      await removeTree(ctx, abs, st.dev);
    } catch (e) {
      if (e instanceof NasbackupError) throw e;
      throw new NasbackupError('DELETE_FAILED', `Failed to delete ${abs}`, { details: (e as Error).message });
    }
  }
  await syncAfter(ctx, 'delete');
}

/** Depth-first removal: contents first, each directory after what it held. */
export async function removeTree(ctx: OpContext, path: string, dev: number): Promise<void> {
  ctx.checkpoint();
  const st = await lstat(path);
  if (!st.isDirectory()) {
    await unlink(path);
    ctx.out.write(removedFileLine(path));
    return;
  }
  if (st.dev !== dev) {
    throw new NasbackupError('DELETE_FAILED', `Refusing to delete ${path}: another filesystem is mounted there`);
  }
  for (const name of await readdir(path)) {
    await removeTree(ctx, join(path, name), dev);
  }
  await rmdir(path);
  ctx.out.write(removedDirectoryLine(path));
}
