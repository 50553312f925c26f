// Path guard for every mount-relative path the agent sends (-p, --rebase-target,
// --rebase-new-backing, --parent-paths). The original used them unchecked and could
// `rm -rf` the whole share; here nothing resolves outside the mount root.
import { lstat, realpath, stat } from 'node:fs/promises';
import { dirname, join, relative, sep } from 'node:path';
import { NasbackupError } from './errors.js';

export interface RelativePathOptions {
  /** Name used in messages, e.g. "-p" or "--rebase-target". */
  what: string;
  /** Minimum number of components, e.g. 2 for `<instance>/<timestamp>`. */
  minDepth?: number;
}

/** Lexical checks; returns the normalized components. */
export function parseRelativePath(raw: string, opts: RelativePathOptions): string[] {
  const { what } = opts;
  if (raw === '') throw new NasbackupError('PATH_EMPTY', `${what} must not be empty`);
  if (raw.includes('\0')) throw new NasbackupError('PATH_INVALID', `${what} contains a NUL byte`);
  if (raw.startsWith('/'))
    throw new NasbackupError('PATH_ABSOLUTE', `${what} must be relative to the NAS mount, got absolute path: ${raw}`);
  const parts = raw.split('/').filter((p) => p !== '' && p !== '.');
  if (parts.includes('..')) throw new NasbackupError('PATH_TRAVERSAL', `${what} must not contain '..': ${raw}`);
  // NAME_MAX of every Linux file system we mount; PATH_MAX less room for the mount point.
  if (parts.some((p) => Buffer.byteLength(p) > 255) || Buffer.byteLength(raw) > 3840)
    throw new NasbackupError('PATH_TOO_LONG', `${what} is too long (a name over 255 bytes, or the path over 3840): ${raw.slice(0, 80)}…`);
  if (parts.length === 0) throw new NasbackupError('PATH_EMPTY', `${what} names the NAS mount root: ${raw}`);
  const min = opts.minDepth ?? 1;
  if (parts.length < min)
    throw new NasbackupError(
      'PATH_TOO_SHALLOW',
      `${what} must name something at least ${min} levels below the NAS mount root (e.g. <instance>/<timestamp>): ${raw}`,
    );
  return parts;
}

export function isWithin(root: string, candidate: string, { strict }: { strict: boolean }): boolean {
  if (candidate === root) return !strict;
  const prefix = root.endsWith(sep) ? root : root + sep;
  return candidate.startsWith(prefix);
}

async function realpathOrNull(p: string): Promise<string | null> {
  try {
    return await realpath(p);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT' || (e as NodeJS.ErrnoException).code === 'ENOTDIR') return null;
    throw e;
  }
}

/**
 * Resolve a mount-relative path to an absolute one strictly below `root`, refusing
 * anything that leaves it lexically or through a symbolic link. The returned path is
 * the lexical join (what messages and the agent see); the check is on the real path.
 */
export async function ensureWithin(root: string, raw: string, opts: RelativePathOptions): Promise<string> {
  const parts = parseRelativePath(raw, opts);
  const abs = join(root, ...parts);
  const realRoot = await realpath(root);
  // The deepest existing ancestor decides where the path really goes.
  let probe = abs;
  let real: string | null;
  for (;;) {
    real = await realpathOrNull(probe);
    if (real !== null || probe === root) break;
    probe = dirname(probe);
  }
  if (real === null || !isWithin(realRoot, real, { strict: probe !== root })) {
    throw new NasbackupError('PATH_OUTSIDE_MOUNT', `${opts.what} resolves outside the NAS mount: ${raw}`);
  }
  // A link inside the share must not shorten the path either (`self -> .` would let
  // `self/<instance>` stand for a whole instance folder).
  const min = opts.minDepth ?? 1;
  if (probe === abs && relative(realRoot, real).split(sep).length < min) {
    throw new NasbackupError('PATH_TOO_SHALLOW', `${opts.what} resolves to less than ${min} levels below the NAS mount root: ${raw}`);
  }
  return abs;
}

/** Whether something exists at `p` (the link itself, unless `follow`). */
export function exists(p: string, { follow = false }: { follow?: boolean } = {}): Promise<boolean> {
  return (follow ? stat(p) : lstat(p)).then(
    () => true,
    () => false,
  );
}

/** True when the path itself (not what it points to) is a symbolic link. */
export async function isSymlink(p: string): Promise<boolean> {
  try {
    return (await lstat(p)).isSymbolicLink();
  } catch {
    return false;
  }
}
