// The block-device client of `nasbackup mount`: daemons started through their own daemon
// modes (Runner's daemonLog), the partition list, and stopping only processes of ours.
import { spawn } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { BlockClient, findOurProcess, isOurProcess } from '../../lib/clients/nbd.js';
import { ok, realRunner, scriptedRunner } from '../helpers/runner.js';
import { removeTempDirs, tempDir } from '../helpers/tmp.js';

afterAll(removeTempDirs);

const alive = (pid: number): boolean => {
  try {
    process.kill(pid, 0);
    return readFileSync(`/proc/${pid}/stat`, 'utf8').split(' ')[2] !== 'Z';
  } catch {
    return false;
  }
};

describe('Runner daemonLog', () => {
  it('waits for the starter only: the daemon it leaves lives on, its output goes to the log file', async () => {
    const d = tempDir('daemonlog');
    const log = join(d, 'log');
    const { runner } = realRunner();
    const secs = `30.${process.pid}`; // an argv no other process has
    const r = await runner.run('setsid', ['--fork', 'sh', '-c', `echo started >&2; exec sleep ${secs}`], {
      timeoutMs: 10_000,
      daemonLog: log,
    });
    expect(r.exitCode).toBe(0);
    let pid: number | null = null;
    for (let i = 0; i < 100 && pid === null; i++) {
      pid = findOurProcess('sleep', secs);
      if (pid === null) await new Promise((res) => setTimeout(res, 20));
    }
    // `sh -c …` became `sleep <secs>` (exec): find it by its argv, then end it.
    expect(pid).not.toBeNull();
    expect(alive(pid!)).toBe(true);
    process.kill(pid!, 'SIGKILL');
    expect(readFileSync(log, 'utf8')).toBe('started\n');
  });

  it("a starter that fails: its message is read back from the log as the result's stderr", async () => {
    const d = tempDir('daemonlog-fail');
    const client = new BlockClient(realRunner().runner, 10_000);
    const err = await client.serve(join(d, 'missing.qcow2'), join(d, 'sock'), join(d, 'pid'), join(d, 'log')).then(
      () => null,
      (e: unknown) => e,
    );
    expect(err).toMatchObject({ code: 'MOUNT_FAILED', message: 'qemu-nbd on missing.qcow2 failed (qemu-nbd exited with code 1)' });
    expect((err as { details: string }).details).toContain('missing.qcow2');
  });
});

describe('BlockClient', () => {
  it('lists partitions from sfdisk --json in bytes (its sector size), skipping extended containers and empty slots', async () => {
    const d = tempDir('sfdisk');
    const disk = join(d, 'disk');
    const mbr = Buffer.alloc(4096);
    mbr[510] = 0x55;
    mbr[511] = 0xaa;
    writeFileSync(disk, mbr);
    const json = JSON.stringify({
      partitiontable: {
        label: 'dos',
        sectorsize: 4096,
        partitions: [
          { node: `${disk}1`, start: 256, size: 1024, type: '83' },
          { node: `${disk}2`, start: 2048, size: 4096, type: '5' },
          { node: `${disk}5`, start: 2304, size: 512, type: '82' },
          { node: `${disk}6`, start: 4096, size: 0, type: '83' },
        ],
      },
    });
    const { runner, calls } = scriptedRunner(() => ok(json));
    const parts = await new BlockClient(runner, 1000).partitions(disk);
    expect(calls.map((c) => [c.command, ...c.args])).toEqual([['sfdisk', '--json', disk]]);
    expect(parts).toEqual([
      { number: 1, offset: 256 * 4096, size: 1024 * 4096 },
      { number: 5, offset: 2304 * 4096, size: 512 * 4096 },
    ]);
  });

  it('a disk without the boot sector signature is one filesystem on the whole disk (sfdisk is not asked)', async () => {
    const d = tempDir('sfdisk-bare');
    const disk = join(d, 'disk');
    writeFileSync(disk, Buffer.alloc(8192));
    const { runner, calls } = scriptedRunner();
    expect(await new BlockClient(runner, 1000).partitions(disk)).toEqual([{ number: 0, offset: 0, size: 8192 }]);
    expect(calls).toEqual([]);
  });

  it('stop() signals only a process of ours: a pid whose argv does not name our mark is left alone', async () => {
    const child = spawn('sleep', ['30'], { stdio: 'ignore' });
    const pid = child.pid!;
    try {
      expect(isOurProcess(pid, 'sleep', '30')).toBe(true);
      expect(isOurProcess(pid, 'qemu-nbd', '30')).toBe(false);
      await new BlockClient(realRunner().runner, 1000).stop(pid, 'qemu-nbd', '/tmp/some.sock', 0);
      expect(alive(pid)).toBe(true);
      const exited = new Promise((res) => child.on('exit', res));
      await new BlockClient(realRunner().runner, 1000).stop(pid, 'sleep', '30', 0);
      await exited;
      expect(alive(pid)).toBe(false);
    } finally {
      child.kill('SIGKILL');
    }
  });

  it('names each missing program with its Debian package', () => {
    const saved = process.env.PATH;
    process.env.PATH = '/nonexistent';
    try {
      expect(new BlockClient(scriptedRunner().runner, 1000).missing()).toEqual([
        { program: 'qemu-nbd', pkg: 'qemu-utils' },
        { program: 'nbdfuse', pkg: 'libnbd-bin' },
        { program: 'sfdisk', pkg: 'fdisk' },
        { program: 'losetup', pkg: 'mount' },
        { program: 'mount', pkg: 'mount' },
        { program: 'umount', pkg: 'mount' },
        { program: 'setsid', pkg: 'util-linux' },
      ]);
    } finally {
      process.env.PATH = saved;
    }
  });
});
