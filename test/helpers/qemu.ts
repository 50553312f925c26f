// Real qemu-img/qemu-io helpers for building backup chains in tests.
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdirSync, readFileSync, rmSync } from 'node:fs';
import { dirname, join } from 'node:path';

export function qemuImg(args: string[]): string {
  return execFileSync('qemu-img', args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
}

export interface Write {
  pattern: number;
  offset: number;
  length: number;
}

/** Create a qcow2 (optionally with a relative backing) and write patterns into it. */
export function makeImage(path: string, opts: { size?: number; backing?: string; writes?: Write[]; extra?: string[] } = {}): void {
  mkdirSync(dirname(path), { recursive: true });
  const args = ['create', '-q', '-f', 'qcow2', ...(opts.extra ?? [])];
  if (opts.backing) args.push('-b', opts.backing, '-F', 'qcow2');
  args.push(path);
  if (!opts.backing || opts.size !== undefined) args.push(String(opts.size ?? 16 * 1024 * 1024));
  qemuImg(args);
  for (const w of opts.writes ?? []) {
    execFileSync('qemu-io', ['-f', 'qcow2', '-c', `write -P 0x${w.pattern.toString(16)} ${w.offset} ${w.length}`, path], {
      stdio: 'ignore',
    });
  }
}

/** Guest-visible content hash of a whole chain (what the golden fixtures call contentSha256). */
export function contentSha256(path: string, scratch: string): string {
  const raw = join(scratch, `flat-${process.pid}-${Math.random().toString(36).slice(2)}.raw`);
  qemuImg(['convert', '-U', '-O', 'raw', path, raw]);
  try {
    return createHash('sha256').update(readFileSync(raw)).digest('hex');
  } finally {
    rmSync(raw, { force: true });
  }
}

export function info(path: string): Record<string, unknown> {
  return JSON.parse(qemuImg(['info', '--output=json', '-U', path])) as Record<string, unknown>;
}

export function checkExitCode(path: string): number {
  try {
    execFileSync('qemu-img', ['check', path], { stdio: 'ignore' });
    return 0;
  } catch (e) {
    return (e as { status: number }).status;
  }
}
