// `mount`/`umount` behind a small typed client, plus a reader of the kernel's
// mount table so cleanup can check what is really still mounted.
import { readFileSync } from 'node:fs';
import type { Runner, RunResult } from '../exec.js';

export interface MountRequest {
  type: string;
  source: string;
  target: string;
  /** Passed as `-o <options>` only when non-empty, like the original. */
  options: string;
}

/** The original's command line: `mount -t <type> <source> <target> [-o <options>]`. */
export function mountArgs(req: MountRequest): string[] {
  const args = ['-t', req.type, req.source, req.target];
  if (req.options !== '') args.push('-o', req.options);
  return args;
}

/** CIFS needs `nobrl` (byte-range locks break qemu-img on SMB); never produce `-o ,nobrl`. */
export function effectiveMountOptions(type: string, options: string): string {
  if (type !== 'cifs') return options;
  const parts = options.split(',').filter((p) => p !== '');
  if (!parts.includes('nobrl')) parts.push('nobrl');
  return parts.join(',');
}

export class MountClient {
  constructor(private readonly runner: Runner) {}

  mount(req: MountRequest, timeoutMs: number): Promise<RunResult> {
    return this.runner.run('mount', mountArgs(req), { timeoutMs });
  }

  /** Never cancelled by a signal: unmounting is part of cleanup. */
  umount(target: string, timeoutMs: number, lazy = false): Promise<RunResult> {
    return this.runner.run('umount', lazy ? ['-l', target] : [target], { timeoutMs, abortable: false });
  }

  /**
   * For a NAS that stopped answering: `-f` aborts the requests waiting on it (NFS, CIFS,
   * FUSE), so our own stuck calls return; `-c` keeps umount from resolving the path,
   * which would wait on the NAS too. `lazy` then detaches what is still busy.
   */
  umountDead(target: string, timeoutMs: number, lazy: boolean): Promise<RunResult> {
    return this.runner.run('umount', [lazy ? '-l' : '-f', '-c', target], { timeoutMs, abortable: false });
  }
}

/** Decode the octal escapes (\040 for space, …) the kernel uses in mountinfo. */
export function unescapeMountPath(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
}

export function mountPointsFromMountinfo(text: string): string[] {
  const out: string[] = [];
  for (const line of text.split('\n')) {
    const f = line.split(' ');
    if (f.length > 4) out.push(unescapeMountPath(f[4]!));
  }
  return out;
}

/**
 * Synchronous on purpose: procfs answers at once, and libuv's threads may all be stuck
 * in calls on a NAS that stopped answering (cleanup must still see the mount table).
 */
export function isMountPoint(path: string): Promise<boolean> {
  try {
    return Promise.resolve(mountPointsFromMountinfo(readFileSync('/proc/self/mountinfo', 'utf8')).includes(path));
  } catch (e) {
    return Promise.reject(e instanceof Error ? e : new Error(String(e)));
  }
}
