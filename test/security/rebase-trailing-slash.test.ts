// Issue 15 item 10 (rebase arguments): `--rebase-target x.qcow2/` was accepted and rebased
// x.qcow2. Both rebase paths name files, so a trailing `/` is refused (PATH_INVALID) before
// anything is mounted.
import { afterAll, describe, expect, it } from 'vitest';
import { leftovers, logText } from '../helpers/cli.js';
import { rootFile, TS } from '../helpers/chain.js';
import { snapshotTree } from '../helpers/tree.js';
import { removeTempDirs } from '../helpers/tmp.js';
import { chained, rebaseArgs, runBounded } from './fixtures.js';

afterAll(removeTempDirs);

describe('a trailing / on a rebase path is refused', () => {
  it.each([
    ['--rebase-target', `${rootFile(TS[2])}/`, rootFile(TS[0])],
    ['--rebase-new-backing', rootFile(TS[2]), `${rootFile(TS[0])}/`],
  ])('%s', async (flag, target, backing) => {
    const sb = chained('sec-slash');
    const before = snapshotTree(sb.nas);
    const r = await runBounded(sb, rebaseArgs(sb, target, backing));
    expect(r.code).toBe(1);
    expect(r.stdout).toBe(`${flag} must name a file, not end with '/': ${flag === '--rebase-target' ? target : backing}\n`);
    expect(logText(sb)).toContain('ERROR [PATH_INVALID]');
    expect(logText(sb)).not.toMatch(/Successfully mounted/);
    expect(snapshotTree(sb.nas)).toEqual(before);
    expect(leftovers(sb)).toEqual({ dirs: [], mounts: [] });
  });
});
