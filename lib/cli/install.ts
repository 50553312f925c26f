// `nasbackup install-agent-hook [--target <path>] [--node <path>] [--uninstall] [--json]`
//
// Puts a small /bin/sh launcher at the agent's script path that execs an ABSOLUTE Node.js
// with the absolute path of this program (the agent's PATH may not contain Node.js, and the
// agent runs the script with no shell: docs/agent-contract.md §2, §3). The original is kept beside it as
// `<target>.orig` (a hard link to the very same inode, so mode, owner, times and bytes are
// untouched) and `--uninstall` renames it back. Every check runs before anything is
// written; a refusal changes nothing. Never on the agent's path.
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { constants } from 'node:fs';
import { access, chmod, chown, copyFile, link, lstat, readFile, realpath, rename, stat, unlink, utimes, writeFile } from 'node:fs/promises';
import { basename, dirname, isAbsolute, join, resolve } from 'node:path';
import { exists } from '../paths.js';
import type { Stats } from 'node:fs';
import { loadConfig } from '../config.js';
import { NasbackupError, toNasbackupError } from '../errors.js';
import { createLogger } from '../log.js';
import type { Output } from '../ops/context.js';

/** Where packaged CloudStack agents keep the script (paths.script in environment.properties). */
export const DEFAULT_AGENT_SCRIPT = '/usr/share/cloudstack-common/scripts/vm/hypervisor/kvm/nasbackup.sh';
/** package.json engines (execa 9 needs 18.19); a test keeps the two equal. */
export const MIN_NODE_VERSION = '18.19.0';
/** Marks a file as our launcher: the only files install-agent-hook ever overwrites or removes. */
export const LAUNCHER_MARKER = '# nasbackup-agent-hook launcher';
export const ORIG_SUFFIX = '.orig';

const PROBE_TIMEOUT_MS = 30_000;

export interface InstallArgs {
  target: string;
  node?: string;
  uninstall: boolean;
  json: boolean;
}

export function parseInstallArgs(argv: readonly string[]): InstallArgs {
  const out: InstallArgs = { target: DEFAULT_AGENT_SCRIPT, uninstall: false, json: false };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    const eq = a.indexOf('=');
    const [flag, inline] = a.startsWith('--') && eq > 0 ? [a.slice(0, eq), a.slice(eq + 1)] : [a, undefined];
    if (flag === '--uninstall' || flag === '--json') {
      if (inline !== undefined) throw new NasbackupError('INVALID_OPTION', `Invalid option: ${a}`);
      out[flag === '--json' ? 'json' : 'uninstall'] = true;
    } else if (flag === '--target' || flag === '--node') {
      const v = inline ?? argv[++i];
      if (v === undefined) throw new NasbackupError('MISSING_OPTION_VALUE', `Option ${flag} requires a value`);
      if (v === '') throw new NasbackupError('INVALID_ARGUMENT', `Option ${flag} needs a path`);
      if (flag === '--target') out.target = v;
      else out.node = v;
    } else {
      throw new NasbackupError(
        'INVALID_OPTION',
        `Invalid option: ${a} (usage: nasbackup install-agent-hook [--target <path>] [--node <path>] [--uninstall] [--json])`,
      );
    }
  }
  return out;
}

/** --json as parsed (the value of --target/--node is a path, whatever it says), even when parsing fails. */
function wantsJson(argv: readonly string[]): boolean {
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === '--target' || argv[i] === '--node') i++;
    else if (argv[i] === '--json') return true;
  }
  return false;
}

/** POSIX sh single quotes: everything literal, a quote as '\''. */
export function shQuote(s: string): string {
  return `'${s.replace(/'/g, `'\\''`)}'`;
}

/** The launcher: no logic beyond naming the script and exec'ing Node with absolute paths. */
export function launcherText(opts: { node: string; entry: string; target: string; version: string }): string {
  const self = `${shQuote(opts.node)} ${shQuote(opts.entry)}`;
  return [
    '#!/bin/sh',
    `${LAUNCHER_MARKER} (nasbackup ${opts.version}); the original script is ${basename(opts.target)}${ORIG_SUFFIX} beside it.`,
    `# Written by install-agent-hook; do not edit. Roll back: ${self} install-agent-hook --uninstall --target ${shQuote(opts.target)}`,
    'NASBACKUP_SCRIPT_NAME=$0',
    'export NASBACKUP_SCRIPT_NAME',
    `exec ${self} "$@"`,
    '',
  ].join('\n');
}

export function isLauncher(text: string): boolean {
  return text.split('\n', 3)[1]?.startsWith(LAUNCHER_MARKER) === true;
}

export function compareVersions(a: string, b: string): number {
  const pa = a.split('.').map(Number);
  const pb = b.split('.').map(Number);
  for (let i = 0; i < 3; i++) {
    const d = (pa[i] ?? 0) - (pb[i] ?? 0);
    if (d !== 0) return Math.sign(d);
  }
  return 0;
}

function run(file: string, args: string[], env: NodeJS.ProcessEnv): Promise<{ code: number | null; stdout: string; stderr: string; error?: string }> {
  return new Promise((res) => {
    execFile(file, args, { env, timeout: PROBE_TIMEOUT_MS, maxBuffer: 1 << 20, encoding: 'utf8' }, (err, stdout, stderr) => {
      const e = err as (NodeJS.ErrnoException & { code?: unknown; killed?: boolean }) | null;
      if (!e) return res({ code: 0, stdout, stderr });
      if (typeof e.code === 'number') return res({ code: e.code, stdout, stderr });
      res({ code: null, stdout, stderr, error: e.killed ? `timed out after ${PROBE_TIMEOUT_MS / 1000} s` : e.message });
    });
  });
}

/** The Node.js the launcher will exec: absolute, executable, at least MIN_NODE_VERSION. */
export async function checkNode(node: string, env: NodeJS.ProcessEnv): Promise<string> {
  if (!isAbsolute(node)) {
    throw new NasbackupError('INVALID_ARGUMENT', `--node must be an absolute path (the agent's PATH may not contain Node.js): ${node}`);
  }
  try {
    await access(node, constants.X_OK);
    if (!(await stat(node)).isFile()) throw Object.assign(new Error('not a file'), { code: 'EISDIR' });
  } catch (e) {
    const why = (e as NodeJS.ErrnoException).code === 'ENOENT' ? 'not found' : 'not an executable file';
    throw new NasbackupError('NODE_MISSING', `Node.js ${why} at ${node}; install Node.js >= ${MIN_NODE_VERSION} or pass --node <absolute path>`);
  }
  const r = await run(node, ['-e', 'process.stdout.write(process.versions.node)'], env);
  const m = /^v?(\d+\.\d+\.\d+)/.exec(r.stdout.trim());
  if (r.code !== 0 || !m) {
    throw new NasbackupError('NODE_MISSING', `${node} does not run as Node.js (${r.error ?? `exit ${r.code}`}); pass --node <absolute path>`, {
      details: r.stderr.trim(),
    });
  }
  const version = m[1]!;
  if (compareVersions(version, MIN_NODE_VERSION) < 0) {
    throw new NasbackupError('NODE_TOO_OLD', `Node.js ${version} at ${node} is too old: nasbackup needs Node.js >= ${MIN_NODE_VERSION}`);
  }
  return version;
}

type TargetState =
  | { kind: 'missing' }
  | { kind: 'launcher'; text: string; st: Stats }
  | { kind: 'other'; st: Stats };

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
    throw new NasbackupError('INSTALL_TARGET_MISSING', `The folder of ${abs} does not exist: is the CloudStack KVM agent installed here? (or pass --target <path>)`);
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
    throw conflict(target, orig, `${target} is not a nasbackup launcher but ${orig} exists (changed by someone else, e.g. an agent package upgrade?)`);
  }
  if (state.kind === 'launcher' && !origExists) {
    throw conflict(target, orig, `${target} is a nasbackup launcher but the original ${orig} is missing`);
  }

  const nodeVersion = await checkNode(opts.node, opts.env);
  const entry = await realpath(resolve(opts.entry)).catch(() => {
    throw new NasbackupError('INSTALL_FAILED', `Cannot find the nasbackup program to launch: ${opts.entry}`);
  });
  // The exact command the launcher will exec must work before anything is written.
  const probe = await run(opts.node, [entry, '--version'], opts.env);
  if (probe.code !== 0 || !probe.stdout.startsWith('nasbackup ')) {
    throw new NasbackupError('INSTALL_FAILED', `${opts.node} ${entry} --version does not work (${probe.error ?? `exit ${probe.code}`}); nothing changed`, {
      details: (probe.stderr || probe.stdout).trim().split('\n').slice(-5).join('\n'),
    });
  }

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
    throw conflict(target, orig, `${target} is not a nasbackup launcher but ${orig} exists (changed by someone else, e.g. an agent package upgrade?)`);
  }
  if (state.kind === 'missing') {
    if (!origExists) throw new NasbackupError('INSTALL_TARGET_MISSING', `${target} does not exist and there is no ${orig}; nothing to restore`);
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

const SUMMARY: Record<InstallAction, (r: InstallResult) => string> = {
  installed: (r) => `Installed: ${r.target} now runs ${r.node} (Node.js ${r.nodeVersion}) ${r.entry}; the original is ${r.orig}`,
  updated: (r) => `Updated the launcher at ${r.target}: it runs ${r.node} (Node.js ${r.nodeVersion}) ${r.entry}; ${r.orig} untouched`,
  unchanged: (r) => `Already installed: ${r.target} runs ${r.node} (Node.js ${r.nodeVersion}) ${r.entry}; nothing changed`,
  uninstalled: (r) => `Restored the original ${r.target} from ${r.orig}`,
  'not-installed': (r) => `Not installed: ${r.target} is not a nasbackup launcher and there is no ${r.orig}; nothing changed`,
};

export interface InstallIo {
  out: Output;
  env: NodeJS.ProcessEnv;
  /** The program being run (argv[1]): what the launcher will exec. */
  selfPath: string;
  version: () => string;
  /** The Node.js running us, the launcher's default interpreter. */
  execPath?: string;
}

export async function runInstallAgentHook(argv: readonly string[], io: InstallIo): Promise<number> {
  const logger = createLogger(loadConfig(io.env).logFile);
  const json = wantsJson(argv);
  try {
    const a = parseInstallArgs(argv);
    const r = a.uninstall
      ? await uninstallAgentHook({ target: a.target })
      : await installAgentHook({ target: a.target, node: a.node ?? io.execPath ?? process.execPath, entry: io.selfPath, version: io.version(), env: io.env });
    const line = SUMMARY[r.action](r);
    logger.log(`install-agent-hook: ${line}`);
    io.out.write(json ? `${JSON.stringify({ ok: true, ...r })}\n` : `${line}\n`);
    return 0;
  } catch (e) {
    const err = toNasbackupError(e);
    logger.log(`ERROR [${err.code}] install-agent-hook: ${err.message}`);
    io.out.write(json ? `${JSON.stringify({ ok: false, errors: [err.toJSON()] })}\n` : err.toText());
    return err.exitCode;
  }
}
