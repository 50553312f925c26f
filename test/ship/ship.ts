// Shared by the ship tests: a fresh single-file bundle built into a folder of its own
// (nothing beside it: no node_modules, no dist/lib, no package.json), and running it.
import { execFileSync, spawn } from 'node:child_process';
import { mkdirSync, readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { tempDir } from '../helpers/tmp.js';
import type { RunOutcome } from '../helpers/cli.js';

export const REPO = fileURLToPath(new URL('../..', import.meta.url));
export const PKG = JSON.parse(readFileSync(join(REPO, 'package.json'), 'utf8')) as { version: string; engines: { node: string } };

/** Build the bundle from the current sources with `scripts/bundle.mjs --outfile` into `<dir>/<sub>/nasbackup.cjs`. */
export function buildBundle(tag: string, sub = 'opt'): string {
  const dir = join(tempDir(tag), sub);
  mkdirSync(dir, { recursive: true });
  const out = join(dir, 'nasbackup.cjs');
  execFileSync(process.execPath, [join(REPO, 'scripts', 'bundle.mjs'), '--outfile', out], { cwd: REPO, stdio: 'pipe' });
  return out;
}

/** Run a program (argv array, no shell, no stdin unless given) and collect stdout/stderr. */
export function runProgram(
  file: string,
  args: string[],
  env: NodeJS.ProcessEnv,
  opts: { cwd?: string; stdin?: string } = {},
): Promise<RunOutcome> {
  const child = spawn(file, args, { env, cwd: opts.cwd, stdio: [opts.stdin === undefined ? 'ignore' : 'pipe', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout!.on('data', (d: Buffer) => (stdout += d.toString()));
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  if (opts.stdin !== undefined) child.stdin!.end(opts.stdin);
  return new Promise((res) => child.on('close', (code, signal) => res({ code, signal, stdout, stderr })));
}

/** Every NASBACKUP_* environment variable the program's sources mention (lib/, compat/). */
export function envVars(): string[] {
  const names = new Set<string>();
  const walk = (dir: string): void => {
    for (const e of readdirSync(dir, { withFileTypes: true })) {
      const p = join(dir, e.name);
      if (e.isDirectory()) walk(p);
      else if (e.name.endsWith('.ts'))
        for (const m of readFileSync(p, 'utf8').matchAll(/\bNASBACKUP_[A-Z]+(?:_[A-Z]+)*\b/g)) names.add(m[0]);
    }
  };
  for (const d of ['lib', 'compat']) walk(join(REPO, d));
  return [...names].sort();
}
