// A mounted NAS for the length of one operation. The mount point is named like the
// original's (`$TMPDIR/csbackup.XXXXX`), and it is unmounted and removed on every
// path: success, error, and signals (the CLI's lifecycle calls close()).
import { randomInt } from 'node:crypto';
import { rmdirSync, unlinkSync } from 'node:fs';
import { mkdir, readdir, writeFile } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { NasbackupError } from '../errors.js';
import { resolveProgram, spawnWatchdog, type Runner, type Watchdog } from '../exec.js';
import { softly, ToolError } from '../clients/failure.js';
import { effectiveMountOptions, isMountPoint, MountClient } from '../clients/mount.js';
import type { Config } from '../config.js';
import type { Logger } from '../log.js';
import { ownerInfo, readOwner, staleReason } from './lock.js';
import { PROBE_SCRIPT, type NasWatch } from './watch.js';

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

/**
 * Beside each mount point while it exists: who made it. A run that was killed (SIGKILL,
 * power cut of the agent) leaves its mount; the next run unmounts it only when this
 * marker proves the mount ours and its maker dead.
 */
export const ownerMarker = (mountPoint: string): string => join(dirname(mountPoint), `.${basename(mountPoint)}.owner`);
const MARKER = /^\.(csbackup\.[A-Za-z0-9]{5})\.owner$/;

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export class NasSession {
  private closed = false;
  private mounted = false;
  private readonly mounts: MountClient;
  /** The process that probes the NAS (see PROBE_SCRIPT). */
  private prober: Watchdog | null = null;

  private constructor(
    readonly mountPoint: string,
    private readonly target: NasTarget,
    runner: Runner,
    private readonly config: Config,
    private readonly logger: Logger,
    private readonly watch: NasWatch | undefined = undefined,
  ) {
    this.mounts = new MountClient(runner);
  }

  /**
   * Create the mount point and mount. `onCreated` is called as soon as the mount point
   * exists, so a signal arriving during `mount` still finds something to clean.
   */
  static async open(
    target: NasTarget,
    ctx: { runner: Runner; config: Config; logger: Logger; watch?: NasWatch },
    onCreated: (s: NasSession) => void = () => {},
  ): Promise<NasSession> {
    await NasSession.sweepDead(ctx);
    const mp = await makeMountPoint();
    const s = new NasSession(mp, target, ctx.runner, ctx.config, ctx.logger, ctx.watch);
    onCreated(s);
    await writeFile(ownerMarker(mp), JSON.stringify(await ownerInfo('mount')) + '\n', { mode: 0o600 });
    try {
      await s.mount();
    } catch (e) {
      await s.close().catch(() => {}); // the mount error is the one to report
      throw e;
    }
    return s;
  }

  /** Unmount and remove what killed runs of ours left in $TMPDIR (conservatively: see ownerMarker). */
  static async sweepDead(
    ctx: { runner: Runner; config: Config; logger: Logger },
    tmpdir: string = process.env.TMPDIR || '/tmp',
  ): Promise<void> {
    const names = await readdir(tmpdir).catch(() => [] as string[]);
    for (const name of names) {
      const m = MARKER.exec(name);
      if (!m) continue;
      const owner = await readOwner(join(tmpdir, name));
      if (!owner) continue;
      const why = await staleReason(owner.info, owner.ageMs, Number.POSITIVE_INFINITY);
      if (why === null) continue;
      ctx.logger.log(`Cleaning up ${join(tmpdir, m[1]!)}, left by a dead run (pid ${owner.info.pid}): ${why}`);
      // Nobody uses a dead run's mount: one plain attempt, then lazily (its NAS may be the hung one).
      const config = { ...ctx.config, umountAttempts: 1 };
      const s = new NasSession(join(tmpdir, m[1]!), { type: '', address: '', options: '' }, ctx.runner, config, ctx.logger);
      s.mounted = true;
      await s.close().catch((e: Error) => ctx.logger.log(`Warning: could not clean up ${s.mountPoint}: ${e.message}`));
    }
  }

  private async mount(): Promise<void> {
    const { type, address } = this.target;
    const options = effectiveMountOptions(type, this.target.options);
    // Watched from before the mount: the log line that follows it may already block on the NAS.
    if (this.watch) this.startProbe(this.watch);
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

  /** Watch the NAS from another process (see PROBE_SCRIPT) while this session exists. */
  private startProbe(watch: NasWatch): void {
    const { nasTimeoutMs, nasProbeIntervalMs, umountTimeoutMs } = this.config;
    const stat = resolveProgram('stat', process.env.PATH);
    const umount = resolveProgram('umount', process.env.PATH);
    const tenths = (ms: number): string => String(Math.max(1, Math.ceil(ms / 100)));
    const w =
      stat === null || umount === null
        ? null
        : spawnWatchdog(
            PROBE_SCRIPT,
            [
              this.mountPoint,
              stat,
              umount,
              String(nasProbeIntervalMs / 1000),
              tenths(nasTimeoutMs),
              tenths(umountTimeoutMs),
              resolveProgram('setpriv', '/usr/bin:/bin:/usr/sbin:/sbin') ?? '',
              resolveProgram('sleep', '/usr/bin:/bin') ?? 'sleep',
            ],
            (line) => {
              if (line === 'tripped') {
                this.logger.log(`The NAS at ${this.mountPoint} did not answer a statfs within ${Math.round(nasTimeoutMs / 1000)} s`);
                watch.trip(this.mountPoint, `${this.target.type} ${this.target.address}`, nasTimeoutMs);
              } else if (line.startsWith('forced ')) {
                this.logger.log(`umount -f -c ${this.mountPoint} (abort what waits on the NAS) -> exit ${line.slice('forced '.length)}`);
              }
            },
            (code) => {
              if (!watch.unresponsive)
                this.logger.log(`Warning: the NAS watch ended (exit ${code}); the NAS is no longer watched for a hang`);
            },
          );
    if (w === null) {
      this.logger.log('Warning: sh, stat or umount not found; the NAS is not watched for a hang');
      return;
    }
    this.prober = w;
  }

  /** Unmount (retrying while busy, then lazily) and remove the mount point. Idempotent. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.prober?.stop();
    const problems: string[] = [];
    if (this.mounted || (await isMountPoint(this.mountPoint).catch(() => false))) {
      const err = await this.unmount();
      if (err) problems.push(err);
    }
    try {
      // rmdir, never a recursive remove: if anything is left, it is not ours to delete.
      // Synchronous: a local folder, and libuv's threads may be stuck on a dead NAS.
      rmdirSync(this.mountPoint);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ENOENT')
        problems.push(`Failed to remove mount point ${this.mountPoint}: ${(e as Error).message}`);
    }
    // The marker goes with the mount point; while a mount is left, it stays for the next run.
    if (problems.length === 0) {
      try {
        unlinkSync(ownerMarker(this.mountPoint));
      } catch {
        // a session of a dead run swept without its marker, or already gone
      }
    }
    if (problems.length > 0) {
      throw new NasbackupError('NAS_CLEANUP_FAILED', problems.join('\n'), { details: 'Backup cleanup failed' });
    }
  }

  private async unmount(): Promise<string | null> {
    if (this.watch?.unresponsive) return this.unmountDead();
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

  /** A NAS that does not answer: force (abort its waiting requests), then detach lazily. */
  private async unmountDead(): Promise<string | null> {
    const { umountTimeoutMs } = this.config;
    const force = await softly(this.mounts.umountDead(this.mountPoint, umountTimeoutMs, false));
    if (force === null || !(await isMountPoint(this.mountPoint))) {
      this.mounted = false;
      this.logger.log(`Warning: ${this.mountPoint} did not answer; unmounted by force`);
      return null;
    }
    const lazy = await softly(this.mounts.umountDead(this.mountPoint, umountTimeoutMs, true));
    if (!(await isMountPoint(this.mountPoint))) {
      this.mounted = false;
      this.logger.log(`Warning: ${this.mountPoint} did not answer; detached with a lazy unmount`);
      return null;
    }
    return `Failed to unmount ${this.mountPoint}: ${(lazy ?? force).trim()}`;
  }
}
