// A mounted NAS for the length of one operation. The mount point is named like the
// original's (`$TMPDIR/csbackup.XXXXX`), and it is unmounted and removed on every
// path: success, error, and signals (the CLI's lifecycle calls close()).
import { randomInt } from 'node:crypto';
import { mkdir, rmdir } from 'node:fs/promises';
import { join } from 'node:path';
import { NasbackupError } from '../errors.js';
import type { Runner } from '../exec.js';
import { softly, ToolError } from '../clients/failure.js';
import { effectiveMountOptions, isMountPoint, MountClient } from '../clients/mount.js';
import type { Config } from '../config.js';
import type { Logger } from '../log.js';

export interface NasTarget {
  type: string;
  address: string;
  /** Raw -m value; may be empty. */
  options: string;
}

const ALNUM = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789';

/** `mktemp -d -t csbackup.XXXXX`: 5 random characters, mode 0700, never an existing dir. */
export async function makeMountPoint(tmpdir: string = process.env.TMPDIR || '/tmp'): Promise<string> {
  for (let attempt = 0; attempt < 100; attempt++) {
    let suffix = '';
    for (let i = 0; i < 5; i++) suffix += ALNUM[randomInt(ALNUM.length)];
    const dir = join(tmpdir, `csbackup.${suffix}`);
    try {
      await mkdir(dir, { mode: 0o700 });
      return dir;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST')
        throw new NasbackupError('TMPDIR_UNUSABLE', `Cannot create a mount point in ${tmpdir} (TMPDIR): ${(e as Error).message}`);
    }
  }
  throw new NasbackupError('NAS_MOUNT_FAILED', `Cannot create a mount point in ${tmpdir}`);
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export class NasSession {
  private closed = false;
  private mounted = false;
  private readonly mounts: MountClient;

  private constructor(
    readonly mountPoint: string,
    private readonly target: NasTarget,
    runner: Runner,
    private readonly config: Config,
    private readonly logger: Logger,
  ) {
    this.mounts = new MountClient(runner);
  }

  /**
   * Create the mount point and mount. `onCreated` is called as soon as the mount point
   * exists, so a signal arriving during `mount` still finds something to clean.
   */
  static async open(
    target: NasTarget,
    ctx: { runner: Runner; config: Config; logger: Logger },
    onCreated: (s: NasSession) => void = () => {},
  ): Promise<NasSession> {
    const mp = await makeMountPoint();
    const s = new NasSession(mp, target, ctx.runner, ctx.config, ctx.logger);
    onCreated(s);
    try {
      await s.mount();
    } catch (e) {
      await s.close().catch(() => {}); // the mount error is the one to report
      throw e;
    }
    return s;
  }

  private async mount(): Promise<void> {
    const { type, address } = this.target;
    const options = effectiveMountOptions(type, this.target.options);
    try {
      await this.mounts.mount({ type, source: address, target: this.mountPoint, options }, this.config.mountTimeoutMs);
      this.mounted = true;
    } catch (e) {
      // A mount that timed out or was interrupted may still have happened.
      this.mounted = await isMountPoint(this.mountPoint);
      throw e;
    }
    this.logger.log(`Successfully mounted ${type} store`);
  }

  /** Unmount (retrying while busy, then lazily) and remove the mount point. Idempotent. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    const problems: string[] = [];
    if (this.mounted || (await isMountPoint(this.mountPoint).catch(() => false))) {
      const err = await this.unmount();
      if (err) problems.push(err);
    }
    try {
      // rmdir, never a recursive remove: if anything is left, it is not ours to delete.
      await rmdir(this.mountPoint);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ENOENT')
        problems.push(`Failed to remove mount point ${this.mountPoint}: ${(e as Error).message}`);
    }
    if (problems.length > 0) {
      throw new NasbackupError('NAS_CLEANUP_FAILED', problems.join('\n'), { details: 'Backup cleanup failed' });
    }
  }

  private async unmount(): Promise<string | null> {
    const { umountAttempts, umountTimeoutMs, umountRetryDelayMs } = this.config;
    let last = '';
    for (let attempt = 1; attempt <= umountAttempts; attempt++) {
      const failed = await softly(this.mounts.umount(this.mountPoint, umountTimeoutMs));
      if (failed === null || !(await isMountPoint(this.mountPoint))) {
        this.mounted = false;
        return null;
      }
      last = failed;
      this.logger.log(`umount ${this.mountPoint} failed (attempt ${attempt}/${umountAttempts}): ${last}`);
      if (attempt < umountAttempts) await sleep(umountRetryDelayMs * attempt);
    }
    // Still busy (CIFS "target is busy"): detach it so nothing is left mounted on the host.
    const lazy = await this.mounts.umount(this.mountPoint, umountTimeoutMs, true).then(
      () => '',
      (e: unknown) => {
        if (e instanceof ToolError) return e.output;
        throw e;
      },
    );
    if (!(await isMountPoint(this.mountPoint))) {
      this.mounted = false;
      this.logger.log(`Warning: ${this.mountPoint} was busy; detached with a lazy unmount`);
      return null;
    }
    return `Failed to unmount ${this.mountPoint}: ${(lazy || last).trim()}`;
  }
}
