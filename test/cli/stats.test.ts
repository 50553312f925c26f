import { execFileSync } from 'node:child_process';
import { afterAll, describe, expect, it } from 'vitest';
import { bindNas, leftovers, makeSandbox, run } from '../helpers/cli.js';
import { removeTempDirs } from '../helpers/tmp.js';
import { parseDfP } from '../../lib/ops/stats.js';

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
      const df = parseDfP(execFileSync('df', ['-P', sb.nas], { encoding: 'utf8' }))!;
      expect(m![2]).toBe(String(df.totalKiB));
      expect(m![3]).toBe(String(df.usedKiB));
      expect(Number(m![2])).toBe(8192);
      expect(Number(m![3])).toBeGreaterThanOrEqual(1000);
    } finally {
      execFileSync('umount', [sb.nas]);
    }
    expect(leftovers(sb)).toEqual({ dirs: [], mounts: [] });
  });

  it('parses df -P rows whose source contains spaces', () => {
    const text = 'Filesystem 1024-blocks Used Available Capacity Mounted on\n//h/my share 104857600 52428800 52428800 50% /tmp/csbackup.ab cd\n';
    expect(parseDfP(text)).toEqual({ totalKiB: 104857600n, usedKiB: 52428800n });
    expect(parseDfP('Filesystem\n')).toBeNull();
  });
});
