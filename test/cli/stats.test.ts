import { execFileSync } from 'node:child_process';
import { afterAll, describe, expect, it } from 'vitest';
import { bindNas, leftovers, makeSandbox, run } from '../helpers/cli.js';
import { removeTempDirs } from '../helpers/tmp.js';
import { HostClient } from '../../lib/clients/host.js';
import { ok, realRunner, scriptedRunner } from '../helpers/runner.js';

afterAll(removeTempDirs);

describe('-o stats', () => {
  it('prints the mount point and "<total> <used>" in 1K blocks, as df -P reports them', async () => {
    const sb = makeSandbox('stats');
    // A tmpfs NAS has a fixed size, so the numbers are stable between our run and df's.
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=8m', 'tmpfs', sb.nas]);
    try {
      execFileSync('dd', ['if=/dev/zero', `of=${sb.nas}/fill`, 'bs=1k', 'count=1000'], { stdio: 'ignore' });
      const r = await run(sb, ['-o', 'stats', ...bindNas(sb)]);
      expect(r.code).toBe(0);
      const m = /^(\S+\/csbackup\.\w{5})\n(\d+) (\d+)\n$/.exec(r.stdout);
      expect(m).not.toBeNull();
      const df = await new HostClient(realRunner().runner, 10_000).diskUsage(sb.nas);
      expect(m![2]).toBe(String(df.totalKiB));
      expect(m![3]).toBe(String(df.usedKiB));
      expect(Number(m![2])).toBe(8192);
      expect(Number(m![3])).toBeGreaterThanOrEqual(1000);
    } finally {
      execFileSync('umount', [sb.nas]);
    }
    expect(leftovers(sb)).toEqual({ dirs: [], mounts: [] });
  });

  it('parses df -P rows whose source contains spaces; an unreadable answer is STATS_FAILED', async () => {
    const text =
      'Filesystem 1024-blocks Used Available Capacity Mounted on\n//h/my share 104857600 52428800 52428800 50% /tmp/csbackup.ab cd\n';
    const df = (stdout: string) => new HostClient(scriptedRunner(() => ok(stdout)).runner, 1000).diskUsage('/m');
    expect(await df(text)).toEqual({ totalKiB: 104857600n, usedKiB: 52428800n });
    await expect(df('Filesystem\n')).rejects.toMatchObject({
      code: 'STATS_FAILED',
      message: 'Cannot parse the output of df -P',
      details: 'Filesystem',
    });
    const failing = new HostClient(scriptedRunner(() => ({ exitCode: 1, stderr: 'df: /m: No such file or directory\n' })).runner, 1000);
    await expect(failing.diskUsage('/m')).rejects.toMatchObject({
      code: 'STATS_FAILED',
      message: 'Failed to get storage stats of /m',
      details: 'df: /m: No such file or directory',
    });
  });

  it('sync through the host client: argv, and a failure with why', async () => {
    const { runner, calls } = scriptedRunner(() => ({ exitCode: null, timedOut: true, durationMs: 3000 }));
    await expect(new HostClient(runner, 3000).sync()).rejects.toMatchObject({ code: 'COMMAND_FAILED', reason: 'sync timed out after 3 s' });
    expect(calls).toEqual([{ command: 'sync', args: [], opts: { timeoutMs: 3000 } }]);
  });
});
