// The programs that expose a backup file read-only as block devices (`nasbackup mount`):
// qemu-nbd serves the qcow2 chain on a unix socket, nbdfuse makes it a file, losetup
// attaches a partition of that file, mount mounts it. Both servers are daemons on purpose
// (they must outlive the command): qemu-nbd by its own --fork, nbdfuse (which has no
// daemon mode) through util-linux `setsid -f`. No kernel nbd module is involved.
import { readdirSync, readFileSync, readlinkSync } from 'node:fs';
import { open, readFile } from 'node:fs/promises';
import { basename } from 'node:path';
import { NasbackupError } from '../errors.js';
import { failureText, resolveProgram, succeeded, type Runner } from '../exec.js';
import { ToolError, toolFailure } from './failure.js';

/** Each program we need and the Debian package that has it. */
export const BLOCK_PROGRAMS = {
  'qemu-nbd': 'qemu-utils',
  nbdfuse: 'libnbd-bin',
  sfdisk: 'fdisk',
  losetup: 'mount',
  mount: 'mount',
  umount: 'mount',
  setsid: 'util-linux',
} as const;

export interface Partition {
  /** Partition number (1 for the first), or 0 for a filesystem on the whole disk. */
  number: number;
  offset: number;
  size: number;
}

/** The first sectors of a disk: does it carry an MBR (or GPT's protective MBR) signature? */
export function hasPartitionSignature(sector0: Buffer): boolean {
  return sector0.length >= 512 && sector0[510] === 0x55 && sector0[511] === 0xaa;
}

/** Extended (container) partitions of an MBR: they hold logical partitions, not a filesystem. */
const EXTENDED = new Set(['5', 'f', '85']);

function parseSfdiskJson(text: string): Partition[] {
  const j = JSON.parse(text) as {
    partitiontable?: { sectorsize?: number; partitions?: { node?: string; start?: number; size?: number; type?: string }[] };
  };
  const t = j.partitiontable;
  const sector = t?.sectorsize ?? 512;
  const out: Partition[] = [];
  for (const [i, p] of (t?.partitions ?? []).entries()) {
    if (typeof p.start !== 'number' || typeof p.size !== 'number' || p.size === 0) continue;
    if (EXTENDED.has((p.type ?? '').toLowerCase())) continue;
    const n = /(\d+)$/.exec(p.node ?? '');
    out.push({ number: n ? Number(n[1]) : i + 1, offset: p.start * sector, size: p.size * sector });
  }
  return out;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** The argv of a live process, or null when it is gone. */
function cmdline(pid: number): string[] | null {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
  } catch {
    return null;
  }
}

/** Is `pid` alive and the `program` we started (its argv names `mark`: our socket or our file)? */
export function isOurProcess(pid: number, program: string, mark: string): boolean {
  const argv = cmdline(pid);
  return argv !== null && basename(argv[0] ?? '') === program && argv.includes(mark);
}

/** The live `program` whose argv names `mark` (a start interrupted before its pid was known). */
export function findOurProcess(program: string, mark: string): number | null {
  let pids: string[];
  try {
    pids = readdirSync('/proc');
  } catch {
    return null;
  }
  for (const p of pids) if (/^\d+$/.test(p) && isOurProcess(Number(p), program, mark)) return Number(p);
  return null;
}

export class BlockClient {
  constructor(
    private readonly runner: Runner,
    private readonly timeoutMs: number,
  ) {}

  /** The programs missing on this host, each with its Debian package. */
  missing(): { program: string; pkg: string }[] {
    return Object.entries(BLOCK_PROGRAMS)
      .filter(([program]) => resolveProgram(program, process.env.PATH) === null)
      .map(([program, pkg]) => ({ program, pkg }));
  }

  /**
   * `qemu-nbd --read-only --persistent --fork`: returns once the socket listens, with the
   * server's pid. The server reads the chain only; it outlives us until `stop`.
   */
  async serve(image: string, socket: string, pidFile: string, log: string): Promise<number> {
    const r = await this.runner.run(
      'qemu-nbd',
      ['--read-only', '--persistent', '--fork', `--pid-file=${pidFile}`, '--socket', socket, '--format', 'qcow2', image],
      { timeoutMs: this.timeoutMs, daemonLog: log, cwd: '/' },
    );
    if (r.canceled) throw new ToolError('INTERRUPTED', 'Interrupted while starting qemu-nbd', r, failureText(r));
    if (!succeeded(r)) throw toolFailure('MOUNT_FAILED', `qemu-nbd on ${basename(image)}`, r);
    return this.readPid(pidFile, 'qemu-nbd');
  }

  /**
   * nbdfuse exposing the server as the read-only file `file` (inside its own mount
   * point); returns its pid once it serves (it writes the pid file then).
   */
  async fuse(file: string, socket: string, pidFile: string, log: string): Promise<number> {
    const r = await this.runner.run('setsid', ['--fork', 'nbdfuse', '--readonly', '--pidfile', pidFile, file, '--unix', socket], {
      timeoutMs: this.timeoutMs,
      daemonLog: log,
      cwd: '/',
    });
    if (r.canceled) throw new ToolError('INTERRUPTED', 'Interrupted while starting nbdfuse', r, failureText(r));
    if (!succeeded(r)) throw toolFailure('MOUNT_FAILED', 'nbdfuse', r);
    // setsid returns at once: the pid file says nbdfuse serves; its log, that it gave up.
    const deadline = Date.now() + Math.min(this.timeoutMs, 30_000);
    let failedSince: number | null = null;
    while (Date.now() < deadline) {
      if (this.runner.aborted) throw new NasbackupError('INTERRUPTED', 'Interrupted while starting nbdfuse');
      const pid = await readFile(pidFile, 'utf8').then(
        (t) => Number(t.trim()),
        () => 0,
      );
      if (pid > 0) return pid;
      const said = await readFile(log, 'utf8').catch(() => '');
      if (said.trim() !== '') {
        failedSince ??= Date.now();
        if (Date.now() - failedSince > 1000) throw new NasbackupError('MOUNT_FAILED', 'nbdfuse failed to start', { details: said.trim() });
      }
      await sleep(50);
    }
    const said = await readFile(log, 'utf8').catch(() => '');
    throw new NasbackupError('MOUNT_FAILED', 'nbdfuse did not start in time', { details: said.trim() });
  }

  private async readPid(pidFile: string, what: string): Promise<number> {
    const pid = Number((await readFile(pidFile, 'utf8').catch(() => '')).trim());
    if (!Number.isInteger(pid) || pid <= 0) throw new NasbackupError('MOUNT_FAILED', `${what} started but wrote no pid to ${pidFile}`);
    return pid;
  }

  /** The partitions of a disk image (sfdisk --json), or the whole disk when it has no table. */
  async partitions(file: string): Promise<Partition[]> {
    const fh = await open(file, 'r');
    const head = Buffer.alloc(512);
    let size: number;
    try {
      await fh.read(head, 0, 512, 0);
      size = (await fh.stat()).size;
    } finally {
      await fh.close();
    }
    const whole: Partition[] = [{ number: 0, offset: 0, size }];
    if (!hasPartitionSignature(head)) return whole;
    const r = await this.runner.run('sfdisk', ['--json', file], { timeoutMs: this.timeoutMs });
    if (r.canceled) throw new ToolError('INTERRUPTED', 'Interrupted while reading the partition table', r, failureText(r));
    // A boot sector signature without a table sfdisk knows (a bare FAT filesystem): the whole disk.
    if (!succeeded(r)) return whole;
    try {
      return parseSfdiskJson(r.stdout);
    } catch {
      throw new ToolError('MOUNT_FAILED', 'Cannot parse the output of sfdisk --json', r, r.stdout);
    }
  }

  /** `losetup --read-only` of one byte range of `file`; returns the loop device. */
  async attach(file: string, offset: number, size: number): Promise<string> {
    const r = await this.runner.run(
      'losetup',
      ['--read-only', '--offset', String(offset), '--sizelimit', String(size), '--find', '--show', file],
      { timeoutMs: this.timeoutMs },
    );
    if (r.canceled) throw new ToolError('INTERRUPTED', 'Interrupted while attaching a loop device', r, failureText(r));
    if (!succeeded(r)) throw toolFailure('MOUNT_FAILED', 'losetup', r);
    const dev = r.stdout.trim();
    if (!/^\/dev\/loop\d+$/.test(dev)) throw new ToolError('MOUNT_FAILED', `losetup printed no loop device`, r, r.stdout);
    return dev;
  }

  /** The file a loop device is attached to, or null when it is free. */
  backingFile(dev: string): string | null {
    try {
      return readFileSync(`/sys/block/${basename(dev)}/loop/backing_file`, 'utf8').trim();
    } catch {
      return null;
    }
  }

  /** Never cancelled by a signal: detaching is part of the undo. */
  async detach(dev: string): Promise<void> {
    const r = await this.runner.run('losetup', ['--detach', dev], { timeoutMs: this.timeoutMs, abortable: false });
    if (!succeeded(r)) throw toolFailure('MOUNT_CLEANUP_FAILED', `losetup --detach ${dev}`, r);
  }

  /**
   * Mount read-only, never replaying a journal (the device is read-only): ext3/4 take
   * `noload`, XFS `norecovery`; anything else plain `ro`. The first that mounts wins.
   */
  async mountReadOnly(dev: string, target: string): Promise<string> {
    let last = '';
    for (const options of ['ro,noload', 'ro,norecovery', 'ro']) {
      const r = await this.runner.run('mount', ['-o', options, dev, target], { timeoutMs: this.timeoutMs });
      if (r.canceled) throw new ToolError('INTERRUPTED', 'Interrupted while mounting a partition', r, failureText(r));
      if (succeeded(r)) return options;
      last = failureText(r);
    }
    throw new NasbackupError('MOUNT_FAILED', `Cannot mount ${dev} read-only`, { details: last });
  }

  /** Never cancelled by a signal: unmounting is part of the undo. */
  async umount(target: string): Promise<void> {
    const r = await this.runner.run('umount', [target], { timeoutMs: this.timeoutMs, abortable: false });
    if (!succeeded(r)) throw toolFailure('MOUNT_CLEANUP_FAILED', `umount ${target}`, r);
  }

  /**
   * End a daemon we started (checked by its argv naming `mark`, so a reused pid is never
   * signalled): wait for it to go (it may be leaving on its own), then SIGTERM, then SIGKILL.
   */
  async stop(pid: number, program: string, mark: string, graceMs: number): Promise<void> {
    const gone = async (ms: number): Promise<boolean> => {
      const until = Date.now() + ms;
      while (isOurProcess(pid, program, mark)) {
        if (Date.now() >= until) return false;
        await sleep(50);
      }
      return true;
    };
    if (await gone(graceMs)) return;
    for (const sig of ['SIGTERM', 'SIGKILL'] as const) {
      try {
        process.kill(pid, sig);
      } catch {
        return; // gone meanwhile
      }
      if (await gone(this.timeoutMs > 5000 ? 5000 : this.timeoutMs)) return;
    }
    throw new NasbackupError('MOUNT_CLEANUP_FAILED', `Process ${pid} (${readlinkSafe(pid)}) did not exit`);
  }
}

function readlinkSafe(pid: number): string {
  try {
    return readlinkSync(`/proc/${pid}/exe`);
  } catch {
    return 'gone';
  }
}
