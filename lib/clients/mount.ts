// `mount`/`umount` behind a small typed client (coded ToolErrors, never a raw process
// result), plus a reader of the kernel's mount table so cleanup can check what is
// really still mounted.
import { readFileSync } from 'node:fs';
import { describeFailure, failureText, succeeded, type Runner } from '../exec.js';
import { ToolError } from './failure.js';

export interface MountRequest {
  type: string;
  source: string;
  target: string;
  /** Passed as `-o <options>` only when non-empty, like the original. */
  options: string;
}

/** The original's command line: `mount -t <type> <source> <target> [-o <options>]`. */
function mountArgs(req: MountRequest): string[] {
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

  /** A failure may still have mounted (a timeout, a signal): the caller checks the mount table. */
  async mount(req: MountRequest, timeoutMs: number): Promise<void> {
    const r = await this.runner.run('mount', mountArgs(req), { timeoutMs });
    if (succeeded(r)) return;
    if (r.canceled) throw new ToolError('INTERRUPTED', `Interrupted while mounting ${req.type} store`, r, '');
    const output = [r.stderr, r.stdout].filter(Boolean).join('');
    throw new ToolError(
      r.timedOut ? 'NAS_MOUNT_TIMEOUT' : 'NAS_MOUNT_FAILED',
      `Failed to mount ${req.type} store`,
      r,
      output.trim() || describeFailure(r),
    );
  }

  /** Never cancelled by a signal: unmounting is part of cleanup. */
  async umount(target: string, timeoutMs: number, lazy = false): Promise<void> {
    const r = await this.runner.run('umount', lazy ? ['-l', target] : [target], { timeoutMs, abortable: false });
    if (!succeeded(r)) throw new ToolError('NAS_CLEANUP_FAILED', `Failed to unmount ${target}`, r, failureText(r));
  }

  /**
   * For a NAS that stopped answering: `-f` aborts the requests waiting on it (NFS, CIFS,
   * FUSE), so our own stuck calls return; `-c` keeps umount from resolving the path,
   * which would wait on the NAS too. `lazy` then detaches what is still busy.
   */
  async umountDead(target: string, timeoutMs: number, lazy: boolean): Promise<void> {
    const r = await this.runner.run('umount', [lazy ? '-l' : '-f', '-c', target], { timeoutMs, abortable: false });
    if (!succeeded(r)) throw new ToolError('NAS_CLEANUP_FAILED', `Failed to unmount ${target}`, r, failureText(r));
  }
}

/** Decode the octal escapes (\040 for space, …) the kernel uses in mountinfo. */
function unescapeMountPath(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
}

function mountPointsFromMountinfo(text: string): string[] {
  const out: string[] = [];
  for (const line of text.split('\n')) {
    const f = line.split(' ');
    if (f.length > 4) out.push(unescapeMountPath(f[4]!));
  }
  return out;
}

/**
 * Synchronous read on purpose: procfs answers at once, and libuv's threads may all be
 * stuck in calls on a NAS that stopped answering (cleanup must still see the mount table).
 */
export function isMountPoint(path: string): Promise<boolean> {
  try {
    return Promise.resolve(mountPointsFromMountinfo(readFileSync('/proc/self/mountinfo', 'utf8')).includes(path));
  } catch (e) {
    return Promise.reject(e instanceof Error ? e : new Error(String(e)));
  }
}
