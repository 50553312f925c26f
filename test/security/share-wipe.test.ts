// Threat: the original script wiped the whole NAS (`rm -rf` of the mount) on a failed rebase,
// and an empty `-p` made its delete remove everything under the mount. Every failure path of
// every operation must leave the share exactly as it was.
import { symlinkSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { rootFile, seedChain, TS, VM } from '../helpers/chain.js';
import { bindNas, leftovers, makeSandbox, run, type Sandbox } from '../helpers/cli.js';
import { removeTempDirs } from '../helpers/tmp.js';
import { snapshotTree } from '../helpers/tree.js';

afterAll(removeTempDirs);

function seeded(tag: string): Sandbox {
  const sb = makeSandbox(tag);
  seedChain(sb.nas);
  return sb;
}

async function expectShareUntouched(sb: Sandbox, args: string[], env: NodeJS.ProcessEnv = {}): Promise<string> {
  const before = snapshotTree(sb.nas);
  const r = await run(sb, args, env);
  expect(r.code).not.toBe(0);
  expect(r.stdout.trim().split('\n').length).toBeGreaterThan(0);
  expect(snapshotTree(sb.nas)).toEqual(before);
  expect(leftovers(sb)).toEqual({ dirs: [], mounts: [] });
  return r.stdout;
}

describe('the share is never wiped', () => {
  it('delete with an empty -p removes nothing', async () => {
    const sb = seeded('wipe-empty-p');
    expect(await expectShareUntouched(sb, ['-o', 'delete', ...bindNas(sb), '-p', ''])).toMatch(/^-p must not be empty\n$/);
  });

  it('delete of a whole VM folder (one level) removes nothing', async () => {
    const sb = seeded('wipe-vm-folder');
    expect(await expectShareUntouched(sb, ['-o', 'delete', ...bindNas(sb), '-p', VM])).toMatch(/at least 2 levels/);
  });

  it('delete through a link that names the mount root removes nothing', async () => {
    const sb = seeded('wipe-root-link');
    symlinkSync('..', join(sb.nas, VM, 'up'));
    const before = snapshotTree(sb.nas);
    const r = await run(sb, ['-o', 'delete', ...bindNas(sb), '-p', `${VM}/up`]);
    expect(r.code).toBe(1);
    expect(snapshotTree(sb.nas)).toEqual(before);
  });

  it.each([
    [
      'the target is not qcow2',
      (_sb: Sandbox) => ['--rebase-target', `${VM}/${TS[2]}/domain-config.xml`, '--rebase-new-backing', rootFile(TS[0])],
    ],
    [
      'the new backing is missing',
      () => ['--rebase-target', rootFile(TS[2]), '--rebase-new-backing', `${VM}/2030.01.01.00.00.00/root.x.qcow2`],
    ],
    ['the target is missing', () => ['--rebase-target', `${VM}/${TS[2]}/root.nope.qcow2`, '--rebase-new-backing', rootFile(TS[0])]],
  ])('a failed rebase (%s) changes nothing on the share, with either engine', async (_what, args) => {
    for (const engine of ['native', 'qemu-img']) {
      const sb = seeded(`wipe-rebase-${engine}`);
      await expectShareUntouched(sb, ['-o', 'rebase', ...bindNas(sb), ...args(sb)], { NASBACKUP_ENGINE: engine });
    }
  });
});
