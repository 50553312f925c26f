import { execFileSync } from 'node:child_process';
import { describe, expect, it } from 'vitest';
import { effectiveMountOptions, isMountPoint, MountClient } from '../../lib/clients/mount.js';
import { makeMountPoint } from '../../lib/nas/session.js';
import { mkdirSync, rmdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll } from 'vitest';
import { scriptedRunner } from '../helpers/runner.js';
import { removeTempDirs, tempDir } from '../helpers/tmp.js';

/** The argv MountClient.mount runs for `req`. */
async function mountArgs(req: Parameters<MountClient['mount']>[0]): Promise<readonly string[]> {
  const { runner, calls } = scriptedRunner();
  await new MountClient(runner).mount(req, 1000);
  expect(calls[0]!.command).toBe('mount');
  return calls[0]!.args;
}

afterAll(removeTempDirs);

describe('mount command line', () => {
  it('passes -o only when there are options', async () => {
    expect(await mountArgs({ type: 'nfs', source: 'h:/e', target: '/tmp/csbackup.abcde', options: '' })).toEqual([
      '-t',
      'nfs',
      'h:/e',
      '/tmp/csbackup.abcde',
    ]);
    expect(await mountArgs({ type: 'nfs', source: 'h:/e', target: '/m', options: 'vers=4.1,timeo=600' })).toEqual([
      '-t',
      'nfs',
      'h:/e',
      '/m',
      '-o',
      'vers=4.1,timeo=600',
    ]);
  });
  it('adds nobrl for cifs, never as ",nobrl"', () => {
    expect(effectiveMountOptions('cifs', '')).toBe('nobrl');
    expect(effectiveMountOptions('cifs', 'username=u,vers=3.0')).toBe('username=u,vers=3.0,nobrl');
    expect(effectiveMountOptions('cifs', 'nobrl,vers=3.0')).toBe('nobrl,vers=3.0');
    expect(effectiveMountOptions('nfs', '')).toBe('');
    expect(effectiveMountOptions('nfs', 'vers=3')).toBe('vers=3');
  });
});

describe('mount failures are coded', () => {
  const req = { type: 'nfs', source: 'h:/e', target: '/m', options: '' };
  it.each<[string, object, string, string, string]>([
    [
      'refused',
      { exitCode: 32, stderr: 'mount.nfs: access denied\n' },
      'NAS_MOUNT_FAILED',
      'Failed to mount nfs store',
      'mount.nfs: access denied',
    ],
    [
      'timed out',
      { exitCode: null, timedOut: true, durationMs: 5000 },
      'NAS_MOUNT_TIMEOUT',
      'Failed to mount nfs store',
      'mount timed out after 5 s',
    ],
    ['interrupted', { exitCode: null, canceled: true }, 'INTERRUPTED', 'Interrupted while mounting nfs store', ''],
  ])('%s', async (_name, answer, code, message, details) => {
    const client = new MountClient(scriptedRunner(() => answer).runner);
    await expect(client.mount(req, 1000)).rejects.toMatchObject({ code, message, details });
  });
  it("umount is never cancelled by a signal, -l when lazy; a failure carries umount's text", async () => {
    const { runner, calls } = scriptedRunner(() => ({ exitCode: 32, stderr: 'umount: /m: target is busy.\n' }));
    const client = new MountClient(runner);
    await expect(client.umount('/m', 1000, true)).rejects.toMatchObject({
      details: 'umount: /m: target is busy.',
      output: 'umount: /m: target is busy.\n',
    });
    expect(calls[0]).toEqual({ command: 'umount', args: ['-l', '/m'], opts: { timeoutMs: 1000, abortable: false } });
  });
});

describe('mountinfo', () => {
  it('a real mount on a path with a space and a tab (octal escapes in mountinfo) is found', async () => {
    const dir = join(tempDir('mi'), 'with space\tand tab');
    mkdirSync(dir);
    expect(await isMountPoint(dir)).toBe(false);
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', dir]);
    try {
      expect(await isMountPoint(dir)).toBe(true);
    } finally {
      execFileSync('umount', [dir]);
    }
    expect(await isMountPoint(dir)).toBe(false);
  });
});

describe('mount point', () => {
  it('is csbackup. plus five characters, mode 0700, fresh each time', async () => {
    const d = tempDir('mp');
    const a = await makeMountPoint(d);
    const b = await makeMountPoint(d);
    expect(a).toMatch(new RegExp(`^${d}/csbackup\\.[A-Za-z0-9]{5}$`));
    expect(a).not.toBe(b);
    expect(statSync(a).mode & 0o777).toBe(0o700);
    rmdirSync(a);
    rmdirSync(b);
  });
});
