// Per-VM lock on the share: `<instance>/.nasbackup.lock`, created atomically (O_EXCL),
// holding who took it. Every operation that writes a VM's backups takes it, so two
// hosts or two runs never interleave on one chain. CIFS is mounted nobrl and NFS
// byte-range locks may be off, so the lock is a file, not a lock call.
import { hostname } from 'node:os';
import { mkdir, open, readFile, rmdir, unlink, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { NasbackupError } from '../errors.js';
import type { Logger } from '../log.js';

export const LOCK_NAME = '.nasbackup.lock';

export interface LockInfo {
  host: string;
  pid: number;
  /** Start time of the holding process (from /proc), to tell a reused pid apart. */
  pidStart: string | null;
  startedAt: string;
  operation: string;
}

export interface LockOptions {
  operation: string;
  /** How long to wait for a held lock before giving up. */
  waitMs: number;
  /** A lock of another host older than this is taken to be stale. */
  staleAfterMs: number;
  /** Operator override: break any existing lock. */
  breakLock: boolean;
  logger: Logger;
  sleep?: (ms: number) => Promise<void>;
}

export async function processStart(pid: number): Promise<string | null> {
  try {
    const stat = await readFile(`/proc/${pid}/stat`, 'utf8');
    // Field 22 (starttime), counted after the parenthesised command name.
    return stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19] ?? null;
  } catch {
    return null;
  }
}

/** Why a lock is stale, or null when its holder may still be alive. */
export async function staleReason(info: LockInfo, ageMs: number, staleAfterMs: number): Promise<string | null> {
  if (info.host === hostname()) {
    const start = await processStart(info.pid);
    if (start === null) return `process ${info.pid} on this host is gone`;
    if (info.pidStart !== null && start !== info.pidStart) return `process ${info.pid} on this host was replaced`;
    return null;
  }
  return ageMs > staleAfterMs ? `held by ${info.host} for ${Math.round(ageMs / 1000)} s, longer than any operation may run` : null;
}

/** Who we are, as a lock (or another owner marker) records it. */
export async function ownerInfo(operation: string): Promise<LockInfo> {
  return { host: hostname(), pid: process.pid, pidStart: await processStart(process.pid), startedAt: new Date().toISOString(), operation };
}

/** The owner recorded in a marker file and the file's age; null when unreadable or gone. */
export async function readOwner(path: string): Promise<{ info: LockInfo; ageMs: number } | null> {
  const r = await readLock(path);
  return r === 'gone' ? null : r;
}

export class VmLock {
  private constructor(
    readonly path: string,
    private readonly logger: Logger,
    /** The instance folder, when this run created it (removed again if it stays empty). */
    private readonly createdDir: string | null,
    /** What this run wrote into the lock. */
    private readonly me: LockInfo,
  ) {}

  /** Take the lock of `instanceDir`, creating the folder if needed. */
  static async acquire(instanceDir: string, opts: LockOptions): Promise<VmLock> {
    const path = join(instanceDir, LOCK_NAME);
    const created = (await mkdir(instanceDir, { recursive: true, mode: 0o755 })) !== undefined ? instanceDir : null;
    const sleep = opts.sleep ?? ((ms: number) => new Promise<void>((r) => setTimeout(r, ms)));
    const me = await ownerInfo(opts.operation);
    const end = Date.now() + opts.waitMs;
    let delay = 100;
    for (;;) {
      try {
        const fh = await open(path, 'wx', 0o644);
        try {
          await fh.writeFile(JSON.stringify(me) + '\n');
          await fh.sync();
        } finally {
          await fh.close();
        }
        return new VmLock(path, opts.logger, created, me);
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== 'EEXIST') {
          throw new NasbackupError('LOCK_FAILED', `Cannot create the VM lock ${path}`, { details: (e as Error).message });
        }
      }
      const held = await readLock(path);
      if (held === 'gone') continue; // released meanwhile: try again at once
      const why = opts.breakLock
        ? 'the operator asked to break it'
        : held === null
          ? await unreadableStale(path, opts.staleAfterMs)
          : await staleReason(held.info, held.ageMs, opts.staleAfterMs);
      if (why !== null) {
        opts.logger.log(`Breaking lock ${path} (${held ? describe(held.info) : 'unreadable'}): ${why}`);
        await unlink(path).catch(() => {});
        continue;
      }
      if (Date.now() + delay > end) {
        if (created) await rmdir(instanceDir).catch(() => {});
        throw new NasbackupError('LOCKED', `Another operation holds the lock of this VM's backups: ${held ? describe(held.info) : path}`, {
          details: `Lock file: ${path} (set NASBACKUP_BREAK_LOCK=1 to break it if that operation is known to be dead)`,
        });
      }
      await sleep(delay);
      delay = Math.min(2000, delay * 2);
    }
  }

  async release(): Promise<void> {
    try {
      await unlink(this.path);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ENOENT')
        this.logger.log(`Warning: could not remove lock ${this.path}: ${(e as Error).message}`);
    }
    // A folder made only to hold the lock (the operation then failed) is not left behind.
    if (this.createdDir) await rmdir(this.createdDir).catch(() => {});
  }

  /**
   * After release(): whether this run's lock is still there. A lock file at the path may be
   * the next run's, taken the moment ours went (a run waiting for this VM): that one is not
   * ours to report, nor one being written (unreadable yet). A lock that cannot be read back
   * (the NAS failing) may still be ours: said so.
   */
  async stillHeld(): Promise<boolean> {
    let text: string;
    try {
      text = await readFile(this.path, 'utf8');
    } catch (e) {
      return (e as NodeJS.ErrnoException).code !== 'ENOENT';
    }
    try {
      const i = JSON.parse(text) as Partial<LockInfo>;
      return i.host === this.me.host && i.pid === this.me.pid && i.pidStart === this.me.pidStart;
    } catch {
      return false;
    }
  }
}

function describe(i: LockInfo): string {
  return `${i.operation} by pid ${i.pid} on ${i.host} since ${i.startedAt}`;
}

async function readLock(path: string): Promise<{ info: LockInfo; ageMs: number } | null | 'gone'> {
  let text: string;
  let mtime: number;
  try {
    [text, mtime] = await Promise.all([readFile(path, 'utf8'), stat(path).then((s) => s.mtimeMs)]);
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'ENOENT' ? 'gone' : null;
  }
  try {
    const info = JSON.parse(text) as LockInfo;
    if (typeof info.host !== 'string' || typeof info.pid !== 'number') return null;
    return { info, ageMs: Date.now() - mtime };
  } catch {
    return null;
  }
}

/** A lock file we cannot parse (a writer died mid-write) is stale once it is old. */
async function unreadableStale(path: string, staleAfterMs: number): Promise<string | null> {
  const st = await stat(path).catch(() => null);
  if (!st) return 'it is gone';
  return Date.now() - st.mtimeMs > Math.min(staleAfterMs, 60_000) ? 'it is unreadable and old' : null;
}
