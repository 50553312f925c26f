// Run bin/nasbackup as the agent does: argv array, no shell, no stdin, read stdout.
// Each sandbox has its own TMPDIR, so the mount points a run makes can be checked
// (and never confused with other processes' /tmp/csbackup.* folders).
import { spawn, type ChildProcess } from 'node:child_process';
import { chmodSync, mkdirSync, readdirSync, readFileSync, writeFileSync, existsSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { tempDir } from './tmp.js';

export const BIN = fileURLToPath(new URL('../../bin/nasbackup', import.meta.url));

export interface Sandbox {
  root: string;
  /** The "NAS export": bind-mounted by runs with -t none -s <nas> -m bind. */
  nas: string;
  tmp: string;
  shims: string;
  logFile: string;
  env: NodeJS.ProcessEnv;
}

export const GOOD_VERSION =
  'Compiled against library: libvirt 9.0.0\nUsing library: libvirt 9.0.0\nUsing API: QEMU 9.0.0\nRunning hypervisor: QEMU 7.2.0\n\n';

/** A fake program (failure injection, or a libvirt stand-in where libvirt is not the subject). */
export function writeShim(sb: Sandbox, name: string, script: string): string {
  const p = join(sb.shims, name);
  writeFileSync(p, `#!/bin/sh\n${script}\n`);
  chmodSync(p, 0o755);
  return p;
}

export function makeSandbox(tag: string): Sandbox {
  const root = tempDir(tag);
  const sb: Sandbox = {
    root,
    nas: join(root, 'nas'),
    tmp: join(root, 'tmp'),
    shims: join(root, 'shims'),
    logFile: join(root, 'agent.log'),
    env: {},
  };
  for (const d of [sb.nas, sb.tmp, sb.shims]) mkdirSync(d, { recursive: true });
  // libvirt is not what these tests are about: a stand-in answers `virsh version`.
  writeShim(sb, 'virsh', `printf '%s' '${GOOD_VERSION}'`);
  sb.env = {
    PATH: `${sb.shims}:${process.env.PATH}`,
    TMPDIR: sb.tmp,
    NASBACKUP_LOG_FILE: sb.logFile,
    LC_ALL: 'C.UTF-8',
  };
  return sb;
}

export interface RunOutcome {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

export interface StartOptions {
  /** Written to stdin, then closed (`nasbackup agent` reads the wire JSON there); none: stdin ignored. */
  input?: string;
  /** Its own process group, so a test can signal the group. */
  detached?: boolean;
  bin?: string;
}

export function start(
  sb: Sandbox,
  args: string[],
  env: NodeJS.ProcessEnv = {},
  opts: StartOptions = {},
): { child: ChildProcess; done: Promise<RunOutcome> } {
  const child = spawn(opts.bin ?? BIN, args, {
    env: { ...sb.env, ...env },
    stdio: [opts.input === undefined ? 'ignore' : 'pipe', 'pipe', 'pipe'],
    detached: opts.detached ?? false,
  });
  if (opts.input !== undefined) child.stdin!.end(opts.input);
  let stdout = '';
  let stderr = '';
  child.stdout!.on('data', (d: Buffer) => (stdout += d.toString()));
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  const done = new Promise<RunOutcome>((res) => child.on('close', (code, signal) => res({ code, signal, stdout, stderr })));
  return { child, done };
}

export function run(sb: Sandbox, args: string[], env: NodeJS.ProcessEnv = {}): Promise<RunOutcome> {
  return start(sb, args, env).done;
}

/** `nasbackup agent` as the agent's transport runs it: the wire JSON on stdin, nothing else. */
export function spawnAgent(sb: Sandbox, input: string, args: string[] = [], env: NodeJS.ProcessEnv = {}): Promise<RunOutcome> {
  return start(sb, ['agent', ...args], env, { input }).done;
}

/** The NAS flags for a local folder bind-mounted as the NAS. */
export const bindNas = (sb: Sandbox): string[] => ['-t', 'none', '-s', sb.nas, '-m', 'bind'];

/** Mount points this sandbox's runs left behind (folders or live mounts): must be none. */
export function leftovers(sb: Sandbox): { dirs: string[]; mounts: string[] } {
  const dirs = existsSync(sb.tmp) ? readdirSync(sb.tmp) : [];
  const mounts = readFileSync('/proc/self/mountinfo', 'utf8')
    .split('\n')
    .map((l) => l.split(' ')[4] ?? '')
    .filter((m) => m.startsWith(sb.tmp + '/') || m === sb.nas);
  return { dirs, mounts };
}

export function logText(sb: Sandbox): string {
  return existsSync(sb.logFile) ? readFileSync(sb.logFile, 'utf8') : '';
}
