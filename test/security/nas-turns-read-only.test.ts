// Issue 15.10: a NAS that turns read-only in the middle of a backup (a real tmpfs export,
// `mount -o remount,ro` once the copy is written, just before its commit). The run cannot
// finish nor remove its work folder and lock: it must say what is left and exit 20
// (contract §4.2: the agent marks the backup for cleanup) instead of exit 1 and silence;
// once the NAS is writable again the next run takes the dead run's lock over and works.
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { bindNas, leftovers, logText, makeSandbox, run, writeShim, type Sandbox } from '../helpers/cli.js';
import { makeImage } from '../helpers/qemu.js';
import { removeTempDirs } from '../helpers/tmp.js';
import { startGroup, waitFor } from './harness.js';

const mounted: string[] = [];
afterAll(() => {
  for (const m of mounted.reverse()) execFileSync('umount', [m]);
  removeTempDirs();
});

const VM = 'i-2-19-VM';
const M = 1 << 20;

function tmpfsNas(sb: Sandbox): void {
  execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=256m', 'nbtest-ro-nas', sb.nas]);
  mounted.push(sb.nas);
  mkdirSync(join(sb.nas, VM));
}

/** The run's own leftovers (the tmpfs export on sb.nas is the test's). */
const runLeftovers = (sb: Sandbox): { dirs: string[]; mounts: string[] } => {
  const l = leftovers(sb);
  return { dirs: l.dirs, mounts: l.mounts.filter((m) => m !== sb.nas) };
};

describe('the NAS turns read-only during a backup', () => {
  it('exit 20 naming the work folder and the lock left behind; the next run takes over', async () => {
    const sb = makeSandbox('sec-ro');
    tmpfsNas(sb);
    const disk = join(sb.root, 'vol-0c0d.qcow2');
    makeImage(disk, { size: 32 * M, writes: [{ pattern: 0x61, offset: 0, length: 8 * M }] });
    // A raw source (copied by qemu-img convert): once the copy is written, the run waits for the
    // test to flip the NAS before it goes on to the manifest and the commit (failure injection).
    execFileSync('qemu-img', ['convert', '-O', 'raw', disk, `${disk}.raw`]);
    execFileSync('mv', [`${disk}.raw`, disk]);
    writeShim(
      sb,
      'qemu-img',
      `case "$1" in convert) /usr/bin/qemu-img "$@" || exit $?; echo $$ > "$0.pid"; while [ ! -e "$0.go" ]; do sleep 0.05; done; exit 0;; esac\nexec /usr/bin/qemu-img "$@"`,
    );
    const args = (ts: string): string[] => ['-o', 'backup', ...bindNas(sb), '-v', VM, '-p', `${VM}/${ts}`, '-d', disk];

    const { done } = startGroup(sb, args('2025.09.01.00.00.00'));
    await waitFor(() => existsSync(`${sb.shims}/qemu-img.pid`), 30_000, 'the copy written, before the commit');
    execFileSync('mount', ['-o', 'remount,ro', sb.nas]);
    writeFileSync(`${sb.shims}/qemu-img.go`, '');
    const r = await done;

    const partial = `${VM}/2025.09.01.00.00.00.partial`;
    expect(r.signal).toBeNull();
    expect(r.code, r.stdout).toBe(20);
    const lines = r.stdout.split('\n');
    expect(lines[0]).toMatch(/^Failed to finish the backup \S+\/i-2-19-VM\/2025\.09\.01\.00\.00\.00: EROFS: read-only file system/);
    expect(r.stdout).toMatch(
      new RegExp(`\\nCould not remove the unfinished backup \\S+/${partial.replace(/\./g, '\\.')}: EROFS[^\\n]*\\n`),
    );
    expect(r.stdout).toMatch(/\nCould not remove the lock \S+\/i-2-19-VM\/\.nasbackup\.lock\n/);
    expect(r.stdout.endsWith('\nBackup cleanup failed\n')).toBe(true);
    expect(logText(sb)).toMatch(/ERROR \[NAS_READ_ONLY\]/);
    // What it says is left is what is left (and nothing looks finished); the mount itself was cleaned.
    expect(readdirSync(join(sb.nas, VM)).sort()).toEqual(['.nasbackup.lock', '2025.09.01.00.00.00.partial']);
    expect(runLeftovers(sb)).toEqual({ dirs: [], mounts: [] });

    // Writable again: the next backup takes the dead run's lock over and completes.
    execFileSync('mount', ['-o', 'remount,rw', sb.nas]);
    writeShim(sb, 'qemu-img', 'exec /usr/bin/qemu-img "$@"');
    const next = await run(sb, args('2025.09.02.00.00.00'));
    expect(next.code, next.stdout).toBe(0);
    expect(next.stdout).toMatch(/^\d+\n$/);
    expect(logText(sb)).toMatch(/Breaking lock \S+ \(backup by pid \d+ [^)]*\): process \d+ on this host is gone/);
    expect(existsSync(join(sb.nas, VM, '.nasbackup.lock'))).toBe(false);
    expect(existsSync(join(sb.nas, VM, '2025.09.02.00.00.00'))).toBe(true);
  }, 120_000);
});
