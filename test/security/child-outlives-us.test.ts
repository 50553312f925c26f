// Issue 15 item 6: a child must not outlive us. SIGKILL the program while its
// `qemu-img convert` runs: the convert must die with it (the kernel's parent-death
// signal; SIGKILL cannot be caught). The next backup of the VM then cleans up what the
// killed run left — its mount, its stale lock and its `.partial` — and only what a
// marker proves to be ours and dead.
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { leftovers, logText, writeShim } from '../helpers/cli.js';
import { removeTempDirs } from '../helpers/tmp.js';
import { backup, rootDiskAsRaw, scenario, startBackup, VM, TS } from '../backup/scenario.js';
import { killAll, pidsMentioning, pidsWithArgv, uniqueSleep, waitFor } from './faults.js';

const sleeps: string[][] = [];
const mounts: string[] = [];
afterEach(() => {
  for (const s of sleeps.splice(0)) killAll(pidsWithArgv(s));
  for (const m of mounts.splice(0)) {
    try {
      execFileSync('umount', ['-l', m], { stdio: 'ignore' });
    } catch {
      // not mounted
    }
  }
});
afterAll(removeTempDirs);

const TS2 = '2025.01.05.00.00.00';
const mountsIn = (dir: string): string[] =>
  readFileSync('/proc/self/mountinfo', 'utf8')
    .split('\n')
    .map((l) => l.split(' ')[4] ?? '')
    .filter((m) => m.startsWith(dir + '/'));

describe('a child outlives us', () => {
  it('SIGKILL of the program kills its qemu-img convert; the next backup cleans up the leftovers', async () => {
    const s = scenario('sec-child', { state: 'shut off' });
    rootDiskAsRaw(s); // a raw source is copied by qemu-img convert, the child this test is about
    const sleep = uniqueSleep();
    sleeps.push(sleep);
    // qemu-img whose convert never ends (a copy to a slow NAS); the rest is the real one.
    const slow = writeShim(s.sb, 'qemu-img-slow', `case "$1" in convert) exec ${sleep.join(' ')};; esac\nexec qemu-img "$@"`);
    const run = startBackup(s, { disks: s.rootDisk }, { NASBACKUP_QEMU_IMG: slow });
    expect(await waitFor(() => pidsWithArgv(sleep).length === 1, 30_000)).toBe(true);
    const leftMount = mountsIn(s.sb.tmp);
    mounts.push(...leftMount);
    // The NAS watch is a process of its own (its argv names the mount point).
    const watchers = (): number[] => pidsMentioning('nasbackup-watch').filter((p) => pidsMentioning(s.sb.tmp).includes(p));
    expect(watchers()).toHaveLength(1);
    run.child.kill('SIGKILL');
    const r = await run.done;
    expect(r.signal).toBe('SIGKILL');

    // The convert died with us instead of writing on into the NAS, and so did the watch.
    expect(await waitFor(() => pidsWithArgv(sleep).length === 0, 5000)).toBe(true);
    expect(await waitFor(() => watchers().length === 0, 5000)).toBe(true);

    // What a killed run leaves: its mount, its lock (a dead pid), its unfinished folder.
    expect(leftMount).toHaveLength(1);
    expect(mountsIn(s.sb.tmp)).toEqual(leftMount);
    expect(existsSync(join(s.sb.nas, VM, '.nasbackup.lock'))).toBe(true);
    expect(existsSync(join(s.sb.nas, VM, `${TS}.partial`))).toBe(true);

    // The next backup of the VM (the agent retries with a new timestamp) cleans all three.
    const next = await backup(s, { disks: s.rootDisk, path: `${VM}/${TS2}` });
    expect(next.code).toBe(0);
    expect(next.stdout).toMatch(/^\d+\n$/);
    expect(readdirSync(join(s.sb.nas, VM)).sort()).toEqual([TS2]);
    expect(leftovers(s.sb)).toEqual({ dirs: [], mounts: [] });
    expect(watchers()).toEqual([]); // a run that ends stops its watch
    const log = logText(s.sb);
    expect(log).toMatch(/Cleaning up \S+\/csbackup\.\w{5}, left by a dead run/);
    expect(log).toMatch(/Breaking lock .*process \d+ on this host is gone/);
    expect(log).toContain(`/${VM}/${TS}.partial, the unfinished backup of a dead run`);
  }, 90_000);

  it('leaves alone what it cannot prove ours and dead: a mount without our marker, a .partial without an owner, a live owner', async () => {
    const s = scenario('sec-child-keep', { state: 'shut off' });
    // A csbackup-like mount of someone else (no marker) in the same TMPDIR.
    const foreign = join(s.sb.tmp, 'csbackup.zZzZz');
    mkdirSync(foreign);
    mkdirSync(join(s.sb.root, 'foreign-src'));
    execFileSync('mount', ['--bind', join(s.sb.root, 'foreign-src'), foreign]);
    mounts.push(foreign);
    // An unfinished folder with no owner marker (an older version), and one whose owner lives (this test process).
    mkdirSync(join(s.sb.nas, VM, '2025.01.01.00.00.00.partial'), { recursive: true });
    const live = join(s.sb.nas, VM, '2025.01.02.00.00.00.partial');
    mkdirSync(live);
    const me = readFileSync(`/proc/${process.pid}/stat`, 'utf8');
    const pidStart = me.slice(me.lastIndexOf(')') + 2).split(' ')[19];
    writeFileSync(
      join(live, '.nasbackup-owner'),
      JSON.stringify({
        host: execFileSync('hostname', { encoding: 'utf8' }).trim(),
        pid: process.pid,
        pidStart,
        startedAt: new Date().toISOString(),
        operation: 'backup',
      }),
    );
    const runs = await backup(s, { disks: s.rootDisk });
    expect(runs.code).toBe(0);
    expect(mountsIn(s.sb.tmp)).toEqual([foreign]);
    expect(readdirSync(join(s.sb.nas, VM)).sort()).toEqual(['2025.01.01.00.00.00.partial', '2025.01.02.00.00.00.partial', TS]);
  }, 90_000);
});
