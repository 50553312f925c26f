// Before a launcher is written, the Node.js it will exec, and the exact command it will
// run, are tried for real: through the Runner (the program's one spawn point: a deadline,
// argv only, a log line per call), never a child process of our own.
import { constants } from 'node:fs';
import { access, stat } from 'node:fs/promises';
import { isAbsolute } from 'node:path';
import { NasbackupError } from '../errors.js';
import type { Runner, RunResult } from '../exec.js';

/** package.json engines (execa 9 needs 18.19); a test keeps the two equal. */
export const MIN_NODE_VERSION = '18.19.0';
/** Deadline of each probe: a Node.js start-up, far less on any sane host. */
export const PROBE_TIMEOUT_MS = 30_000;

/** All a probe needs of the Runner (tests inject failures through a stand-in). */
export type ProbeRunner = Pick<Runner, 'run'>;

/** Numeric major.minor.patch order: -1, 0 or 1. */
export function compareVersions(a: string, b: string): number {
  const pa = a.split('.').map(Number);
  const pb = b.split('.').map(Number);
  for (let i = 0; i < 3; i++) {
    const d = (pa[i] ?? 0) - (pb[i] ?? 0);
    if (d !== 0) return Math.sign(d);
  }
  return 0;
}

function probe(runner: ProbeRunner, file: string, args: string[], env: NodeJS.ProcessEnv): Promise<RunResult> {
  return runner.run(file, args, { timeoutMs: PROBE_TIMEOUT_MS, env });
}

/** Why a probe failed, for the parenthesis of the refusal ("exit 1", "timed out after 30 s"). */
export function probeFailure(r: RunResult): string {
  if (r.timedOut) return `timed out after ${PROBE_TIMEOUT_MS / 1000} s`;
  if (r.spawnError) return `spawn ${r.command} ${r.spawnError}`; // Node's own wording for a failed start
  if (r.canceled) return 'interrupted';
  if (r.signal) return `killed by ${r.signal}`;
  return `exit ${r.exitCode}`;
}

/** The Node.js the launcher will exec: absolute, executable, at least MIN_NODE_VERSION. Returns its version. */
export async function checkNode(runner: ProbeRunner, node: string, env: NodeJS.ProcessEnv): Promise<string> {
  if (!isAbsolute(node)) {
    throw new NasbackupError('INVALID_ARGUMENT', `--node must be an absolute path (the agent's PATH may not contain Node.js): ${node}`);
  }
  try {
    await access(node, constants.X_OK);
    if (!(await stat(node)).isFile()) throw Object.assign(new Error('not a file'), { code: 'EISDIR' });
  } catch (e) {
    const why = (e as NodeJS.ErrnoException).code === 'ENOENT' ? 'not found' : 'not an executable file';
    throw new NasbackupError(
      'NODE_MISSING',
      `Node.js ${why} at ${node}; install Node.js >= ${MIN_NODE_VERSION} or pass --node <absolute path>`,
    );
  }
  const r = await probe(runner, node, ['-e', 'process.stdout.write(process.versions.node)'], env);
  const m = /^v?(\d+\.\d+\.\d+)/.exec(r.stdout.trim());
  if (r.exitCode !== 0 || r.timedOut || !m) {
    throw new NasbackupError('NODE_MISSING', `${node} does not run as Node.js (${probeFailure(r)}); pass --node <absolute path>`, {
      details: r.stderr.trim(),
    });
  }
  const version = m[1]!;
  if (compareVersions(version, MIN_NODE_VERSION) < 0) {
    throw new NasbackupError('NODE_TOO_OLD', `Node.js ${version} at ${node} is too old: nasbackup needs Node.js >= ${MIN_NODE_VERSION}`);
  }
  return version;
}

/** `<node> <entry> --version` must answer as nasbackup: the exact command the launcher will exec. */
export async function checkLaunch(runner: ProbeRunner, node: string, entry: string, env: NodeJS.ProcessEnv): Promise<void> {
  const r = await probe(runner, node, [entry, '--version'], env);
  if (r.exitCode !== 0 || r.timedOut || !r.stdout.startsWith('nasbackup ')) {
    throw new NasbackupError('INSTALL_FAILED', `${node} ${entry} --version does not work (${probeFailure(r)}); nothing changed`, {
      details: (r.stderr || r.stdout).trim().split('\n').slice(-5).join('\n'),
    });
  }
}
