// Real faults for the security tests: processes found by their exact argv in /proc,
// a bounded wait for a run (a hang fails the test instead of stalling the suite), and
// a tiny FUSE passthrough server (python3-fusepy) that the tests can SIGSTOP.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { RunOutcome } from '../helpers/cli.js';

/** Pids whose argv is exactly `argv`. */
export function pidsWithArgv(argv: string[]): number[] {
  const want = argv.join('\0') + '\0';
  const out: number[] = [];
  for (const name of readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    try {
      if (readFileSync(`/proc/${name}/cmdline`, 'latin1') === want) out.push(Number(name));
    } catch {
      // gone meanwhile
    }
  }
  return out;
}

/** Pids whose argv mentions `text` (e.g. a sandbox path). */
export function pidsMentioning(text: string): number[] {
  const out: number[] = [];
  for (const name of readdirSync('/proc')) {
    if (!/^\d+$/.test(name) || Number(name) === process.pid) continue;
    try {
      if (readFileSync(`/proc/${name}/cmdline`, 'latin1').includes(text)) out.push(Number(name));
    } catch {
      // gone meanwhile
    }
  }
  return out;
}

/** Lazily detach whatever a failed run left mounted below `dir` (so removing the temp folder cannot reach into it). */
export function detachMountsBelow(dir: string): void {
  for (const line of readFileSync('/proc/self/mountinfo', 'utf8').split('\n')) {
    const m = line.split(' ')[4] ?? '';
    if (m.startsWith(dir + '/')) spawnSync('umount', ['-l', '-c', m], { stdio: 'ignore', timeout: 10_000 });
  }
}

export function killAll(pids: number[]): void {
  for (const p of pids) {
    try {
      process.kill(p, 'SIGKILL');
    } catch {
      // already gone
    }
  }
}

/** A unique `sleep N` argv: N is large and random, so only our own fault matches it. */
export function uniqueSleep(): string[] {
  return ['sleep', String(100_000 + Math.floor(Math.random() * 800_000))];
}

export async function waitFor(cond: () => boolean, ms: number, stepMs = 50): Promise<boolean> {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if (cond()) return true;
    await new Promise((r) => setTimeout(r, stepMs));
  }
  return cond();
}

/** The run's outcome, or 'hung' after `ms` (the run is then SIGKILLed). */
export async function within(run: { child: ChildProcess; done: Promise<RunOutcome> }, ms: number): Promise<RunOutcome | 'hung'> {
  let timer: NodeJS.Timeout | undefined;
  const hung = new Promise<'hung'>((r) => (timer = setTimeout(() => r('hung'), ms)));
  const r = await Promise.race([run.done, hung]);
  clearTimeout(timer);
  if (r === 'hung') {
    run.child.kill('SIGKILL');
    await run.done;
  }
  return r;
}

const FUSE_SERVER = String.raw`
import os, sys, errno
from fusepy import FUSE, FuseOSError, Operations

class Passthrough(Operations):
    def __init__(self, root):
        self.root = root
    def _p(self, path):
        return os.path.join(self.root, path.lstrip('/'))
    def access(self, path, mode):
        if not os.access(self._p(path), mode):
            raise FuseOSError(errno.EACCES)
    def chmod(self, path, mode):
        return os.chmod(self._p(path), mode)
    def chown(self, path, uid, gid):
        return os.chown(self._p(path), uid, gid)
    def getattr(self, path, fh=None):
        st = os.lstat(self._p(path))
        return {k: getattr(st, k) for k in ('st_atime', 'st_ctime', 'st_gid', 'st_mode', 'st_mtime', 'st_nlink', 'st_size', 'st_uid')}
    def readdir(self, path, fh):
        return ['.', '..'] + os.listdir(self._p(path))
    def readlink(self, path):
        return os.readlink(self._p(path))
    def mknod(self, path, mode, dev):
        return os.mknod(self._p(path), mode, dev)
    def rmdir(self, path):
        return os.rmdir(self._p(path))
    def mkdir(self, path, mode):
        return os.mkdir(self._p(path), mode)
    def statfs(self, path):
        st = os.statvfs(self._p(path))
        return {k: getattr(st, k) for k in ('f_bavail', 'f_bfree', 'f_blocks', 'f_bsize', 'f_favail', 'f_ffree', 'f_files', 'f_flag', 'f_frsize', 'f_namemax')}
    def unlink(self, path):
        return os.unlink(self._p(path))
    def symlink(self, name, target):
        return os.symlink(target, self._p(name))
    def rename(self, old, new):
        return os.rename(self._p(old), self._p(new))
    def link(self, target, name):
        return os.link(self._p(name), self._p(target))
    def utimens(self, path, times=None):
        return os.utime(self._p(path), times)
    def open(self, path, flags):
        return os.open(self._p(path), flags)
    def create(self, path, mode, fi=None):
        return os.open(self._p(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    def read(self, path, length, offset, fh):
        os.lseek(fh, offset, os.SEEK_SET)
        return os.read(fh, length)
    def write(self, path, buf, offset, fh):
        os.lseek(fh, offset, os.SEEK_SET)
        return os.write(fh, buf)
    def truncate(self, path, length, fh=None):
        with open(self._p(path), 'r+') as f:
            f.truncate(length)
    def flush(self, path, fh):
        return 0
    def release(self, path, fh):
        return os.close(fh)
    def fsync(self, path, fdatasync, fh):
        return os.fsync(fh)

if __name__ == '__main__':
    FUSE(Passthrough(sys.argv[1]), sys.argv[2], foreground=True, nothreads=True, allow_other=True, default_permissions=True)
`;

export interface FuseNas {
  server: ChildProcess;
  stop(): void;
  cont(): void;
  /** Resume, unmount and wait for the server to end. */
  close(): Promise<void>;
}

const mounted = (mp: string): boolean =>
  readFileSync('/proc/self/mountinfo', 'utf8')
    .split('\n')
    .some((l) => l.split(' ')[4] === mp);

/** Serve `backing` at `mountPoint` through a FUSE passthrough filesystem. */
export async function fuseNas(dir: string, backing: string, mountPoint: string): Promise<FuseNas> {
  const script = join(dir, 'passthrough.py');
  if (!existsSync(script)) writeFileSync(script, FUSE_SERVER);
  const server = spawn('/usr/bin/python3', [script, backing, mountPoint], { stdio: ['ignore', 'ignore', 'inherit'] });
  if (!(await waitFor(() => mounted(mountPoint), 10_000))) {
    server.kill('SIGKILL');
    throw new Error(`the FUSE server did not mount ${mountPoint}`);
  }
  const ended = new Promise<void>((r) => server.on('exit', () => r()));
  return {
    server,
    stop: () => process.kill(server.pid!, 'SIGSTOP'),
    cont: () => process.kill(server.pid!, 'SIGCONT'),
    async close() {
      try {
        process.kill(server.pid!, 'SIGCONT');
      } catch {
        // gone
      }
      spawn('fusermount3', ['-u', '-z', mountPoint], { stdio: 'ignore' });
      if (!(await waitFor(() => server.exitCode !== null || server.signalCode !== null, 5000))) server.kill('SIGKILL');
      await ended;
    },
  };
}
