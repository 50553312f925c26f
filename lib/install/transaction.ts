// Installing and removing the launcher at the agent's script path. The original is kept
// beside it as `<target>.orig` (a hard link to the very same inode, so mode, owner, times
// and bytes are untouched) and uninstall renames it back. Every check runs before anything
// is written; a refusal changes nothing. The launcher itself is written to a temp file in
// the same folder and renamed over the target, so the agent never sees half a script.
import { randomBytes } from 'node:crypto';
import { constants } from 'node:fs';
import type { Stats } from 'node:fs';
import { chmod, chown, copyFile, link, lstat, readFile, realpath, rename, stat, unlink, utimes, writeFile } from 'node:fs/promises';
import { basename, dirname, join, resolve } from 'node:path';
import { NasbackupError } from '../errors.js';
import { exists } from '../paths.js';
import { isLauncher, launcherText, ORIG_SUFFIX } from './launcher.js';
import { checkLaunch, checkNode, type ProbeRunner } from './node-probe.js';

/** What is at the script path: nothing, our launcher, or anything else (the original, a link, …). */
type TargetState = { kind: 'missing' } | { kind: 'launcher'; text: string; st: Stats } | { kind: 'other'; st: Stats };

async function targetState(target: string): Promise<TargetState> {
  const st = await lstat(target).catch((e: NodeJS.ErrnoException) => {
    if (e.code === 'ENOENT') return null;
    throw e;
  });
  if (st === null) return { kind: 'missing' };
  if (st.isDirectory()) throw new NasbackupError('INSTALL_TARGET_MISSING', `${target} is a directory, not the agent's nasbackup.sh`);
  if (st.isFile()) {
    const text = await readFile(target, 'utf8');
    if (isLauncher(text)) return { kind: 'launcher', text, st };
  }
  return { kind: 'other', st };
}

export type InstallAction = 'installed' | 'updated' | 'unchanged' | 'uninstalled' | 'not-installed';

export interface InstallResult {
  action: InstallAction;
  target: string;
  orig: string;
  node?: string;
  nodeVersion?: string;
  entry?: string;
}

export interface InstallOptions {
  target: string;
  /** Absolute Node.js binary for the launcher. */
  node: string;
  /** The file the launcher runs with it (the bundle or bin/nasbackup). */
  entry: string;
  version: string;
  env: NodeJS.ProcessEnv;
  /** Runs the Node.js probes (lib/exec.ts Runner). */
  runner: ProbeRunner;
}

function conflict(target: string, orig: string, what: string): NasbackupError {
  return new NasbackupError(
    'INSTALL_CONFLICT',
    `${what}; nothing changed. Compare ${target} and ${orig}, keep the one you want as ${target}, remove the other, and run again`,
  );
}

async function preflight(target: string): Promise<{ target: string; orig: string; state: TargetState; origExists: boolean }> {
  const abs = resolve(target);
  const dir = dirname(abs);
  const dst = await stat(dir).catch(() => null);
  if (!dst?.isDirectory()) {
    throw new NasbackupError(
      'INSTALL_TARGET_MISSING',
      `The folder of ${abs} does not exist: is the CloudStack KVM agent installed here? (or pass --target <path>)`,
    );
  }
  const orig = abs + ORIG_SUFFIX;
  return { target: abs, orig, state: await targetState(abs), origExists: await exists(orig) };
}

const ownedByUs = (st: Stats): boolean => st.uid === process.getuid?.() && st.gid === process.getgid?.();

/** Write `text` to `target` atomically (temp file in the same folder, then rename) with `like`'s mode and owner. */
async function writeLike(target: string, text: string, like: Stats, before?: () => Promise<void>): Promise<void> {
  const tmp = join(dirname(target), `.${basename(target)}.nasbackup-${randomBytes(4).toString('hex')}.tmp`);
  await writeFile(tmp, text, { mode: 0o600, flag: 'wx' });
  try {
    if (!ownedByUs(like)) await chown(tmp, like.uid, like.gid);
    await chmod(tmp, like.mode & 0o7777);
    await before?.();
    await rename(tmp, target);
  } catch (e) {
    await unlink(tmp).catch(() => {});
    throw e;
  }
}

/** Keep the original at `orig`: the same inode when possible, else a copy with its mode, owner and times. */
async function keepOriginal(target: string, orig: string, st: Stats): Promise<void> {
  try {
    await link(target, orig);
    return;
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'EEXIST' || !st.isFile()) throw e;
  }
  await copyFile(target, orig, constants.COPYFILE_EXCL);
  try {
    if (!ownedByUs(st)) await chown(orig, st.uid, st.gid);
    await chmod(orig, st.mode & 0o7777);
    await utimes(orig, st.atime, st.mtime);
  } catch (e) {
    await unlink(orig).catch(() => {});
    throw e;
  }
}

export async function installAgentHook(opts: InstallOptions): Promise<InstallResult> {
  const { target, orig, state, origExists } = await preflight(opts.target);
  if (state.kind === 'missing') {
    throw new NasbackupError(
      'INSTALL_TARGET_MISSING',
      origExists
        ? `${target} is missing but ${orig} exists; nothing changed. Restore it with: mv ${orig} ${target}`
        : `${target} does not exist: is the CloudStack KVM agent installed here? (or pass --target <path>)`,
    );
  }
  if (state.kind === 'other' && origExists) {
    throw conflict(
      target,
      orig,
      `${target} is not a nasbackup launcher but ${orig} exists (changed by someone else, e.g. an agent package upgrade?)`,
    );
  }
  if (state.kind === 'launcher' && !origExists) {
    throw conflict(target, orig, `${target} is a nasbackup launcher but the original ${orig} is missing`);
  }

  const nodeVersion = await checkNode(opts.runner, opts.node, opts.env);
  const entry = await realpath(resolve(opts.entry)).catch(() => {
    throw new NasbackupError('INSTALL_FAILED', `Cannot find the nasbackup program to launch: ${opts.entry}`);
  });
  // The exact command the launcher will exec must work before anything is written.
  await checkLaunch(opts.runner, opts.node, entry, opts.env);

  const text = launcherText({ node: opts.node, entry, target, version: opts.version });
  const result: InstallResult = { action: 'installed', target, orig, node: opts.node, nodeVersion, entry };
  try {
    if (state.kind === 'launcher') {
      if (state.text === text) return { ...result, action: 'unchanged' };
      await writeLike(target, text, state.st); // .orig is never touched again
      return { ...result, action: 'updated' };
    }
    const st = state.st.isSymbolicLink() ? await stat(target) : state.st;
    let kept = false;
    await writeLike(target, text, st, async () => {
      await keepOriginal(target, orig, state.st);
      kept = true;
    }).catch(async (e) => {
      if (kept) await unlink(orig).catch(() => {}); // the original is still at target
      throw e;
    });
    return result;
  } catch (e) {
    throw new NasbackupError('INSTALL_FAILED', `Cannot write the launcher at ${target}: ${(e as Error).message}`, { cause: e });
  }
}

export async function uninstallAgentHook(opts: { target: string }): Promise<InstallResult> {
  const { target, orig, state, origExists } = await preflight(opts.target);
  if (state.kind === 'other' && !origExists) return { action: 'not-installed', target, orig };
  if (state.kind === 'other') {
    throw conflict(
      target,
      orig,
      `${target} is not a nasbackup launcher but ${orig} exists (changed by someone else, e.g. an agent package upgrade?)`,
    );
  }
  if (state.kind === 'missing') {
    if (!origExists)
      throw new NasbackupError('INSTALL_TARGET_MISSING', `${target} does not exist and there is no ${orig}; nothing to restore`);
    throw conflict(target, orig, `${target} is missing but ${orig} exists`);
  }
  if (!origExists) throw conflict(target, orig, `${target} is a nasbackup launcher but the original ${orig} is missing`);
  try {
    await rename(orig, target); // the original inode back in place: bytes, mode, owner, times
  } catch (e) {
    throw new NasbackupError('INSTALL_FAILED', `Cannot restore ${orig} to ${target}: ${(e as Error).message}`, { cause: e });
  }
  return { action: 'uninstalled', target, orig };
}
