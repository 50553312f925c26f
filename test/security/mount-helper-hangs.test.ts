// Issue 15 item 7: a mount helper that hangs while holding our pipes (a stuck
// mount.nfs). mount(8) runs /sbin/mount.<type>; ours execs a long sleep. The deadline
// (NASBACKUP_MOUNT_TIMEOUT) must end the run, and no part of the mount's process
// group may be left behind. Also a hung `umount` during cleanup: bounded, lazy
// unmount as the last resort.
import { chmodSync, rmSync, writeFileSync } from 'node:fs';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { bindNas, leftovers, makeSandbox, start, writeShim } from '../helpers/cli.js';
import { removeTempDirs } from '../helpers/tmp.js';
import { Runner } from '../../lib/exec.js';
import { memoryLogger } from '../../lib/log.js';
import { detachMountsBelow, killAll, pidsWithArgv, uniqueSleep, waitFor, within } from './faults.js';

const helpers: string[] = [];
const sleeps: string[][] = [];
const sandboxes: string[] = [];
afterEach(() => {
  for (const s of sleeps.splice(0)) killAll(pidsWithArgv(s));
  for (const h of helpers.splice(0)) rmSync(h, { force: true });
  for (const d of sandboxes.splice(0)) detachMountsBelow(d);
});
afterAll(removeTempDirs);

describe('a mount helper that hangs', () => {
  it('NASBACKUP_MOUNT_TIMEOUT ends the run; the helper and its sleep are killed with the mount', async () => {
    const sb = makeSandbox('sec-mount-hang');
    const sleep = uniqueSleep();
    sleeps.push(sleep);
    // A file system type of our own, so mount(8) runs our helper (it looks only in /sbin).
    const type = `nbhang${process.pid}${Math.floor(Math.random() * 1e6)}`;
    const helper = `/sbin/mount.${type}`;
    helpers.push(helper);
    writeFileSync(helper, `#!/bin/sh\necho "mount.${type}: connecting" >&2\nexec ${sleep.join(' ')}\n`);
    chmodSync(helper, 0o755);

    const t0 = Date.now();
    const r = await within(
      start(sb, ['-o', 'stats', '-t', type, '-s', 'nas.example:/export', '-m', ''], { NASBACKUP_MOUNT_TIMEOUT: '2' }),
      60_000,
    );
    expect(r).not.toBe('hung');
    if (r === 'hung') return;
    expect(r.code).toBe(1);
    expect(r.stdout).toMatch(new RegExp(`^Failed to mount ${type} store\nmount.${type}: connecting\n`));
    // Deadline, then SIGTERM and SIGKILL of the group with a short grace each; never the 60 s of the watchdog.
    expect(Date.now() - t0).toBeLessThan(30_000);
    // The helper (now the sleep) went with the mount: nothing orphaned.
    expect(await waitFor(() => pidsWithArgv(sleep).length === 0, 2000)).toBe(true);
    expect(leftovers(sb)).toEqual({ dirs: [], mounts: [] });
  }, 90_000);

  it('a program that exits but leaves a helper holding its pipes: its output is kept, the helper killed, no wait for the pipes', async () => {
    const sleep = uniqueSleep();
    sleeps.push(sleep);
    const runner = new Runner(memoryLogger());
    const r = await runner.run('sh', ['-c', `${sleep.join(' ')} & echo started`], { timeoutMs: 60_000 });
    expect(r).toMatchObject({ exitCode: 0, stdout: 'started\n', timedOut: false });
    expect(r.durationMs).toBeLessThan(30_000);
    expect(await waitFor(() => pidsWithArgv(sleep).length === 0, 2000)).toBe(true);
  }, 90_000);

  it('a hung umount is bounded: killed at its deadline, then a lazy unmount detaches the NAS', async () => {
    const sb = makeSandbox('sec-umount-hang');
    sandboxes.push(sb.tmp);
    const sleep = uniqueSleep();
    sleeps.push(sleep);
    // umount hangs unless it is the lazy one (the last resort); the sleep is its child
    // and holds our pipes after the shell is killed.
    writeShim(sb, 'umount', `case "$1" in -l) exec /bin/umount "$@";; esac\n${sleep.join(' ')}\nexit 0`);
    const r = await within(
      start(sb, ['-o', 'stats', ...bindNas(sb)], {
        NASBACKUP_UMOUNT_TIMEOUT: '1',
        NASBACKUP_UMOUNT_ATTEMPTS: '2',
        NASBACKUP_UMOUNT_RETRY_DELAY: '0.1',
      }),
      60_000,
    );
    expect(r).not.toBe('hung');
    if (r === 'hung') return;
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/^\S+\/csbackup\.\w{5}\n\d+ \d+\n$/);
    expect(await waitFor(() => pidsWithArgv(sleep).length === 0, 2000)).toBe(true);
    expect(leftovers(sb)).toEqual({ dirs: [], mounts: [] });
  }, 90_000);
});
