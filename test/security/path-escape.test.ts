// Threat: a mount-relative path from the management server (`-p`, `--rebase-target`,
// `--rebase-new-backing`, `--parent-paths`) that leaves the NAS: absolute, with `..`, or
// through a symbolic link. Each is refused before anything is read or written, on every
// operation, and nothing inside or outside the share changes.
import { mkdirSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { rootFile, seedChain, TS, VM } from '../helpers/chain.js';
import { bindNas, leftovers, makeSandbox, run, type Sandbox } from '../helpers/cli.js';
import { removeTempDirs } from '../helpers/tmp.js';
import { snapshotTree } from '../helpers/tree.js';

afterAll(removeTempDirs);

/** A share with a chain, a link leading out of it, and a file outside it worth protecting. */
function share(tag: string): Sandbox {
  const sb = makeSandbox(tag);
  seedChain(sb.nas);
  mkdirSync(join(sb.root, 'outside', TS[0]), { recursive: true });
  writeFileSync(join(sb.root, 'outside', TS[0], 'precious'), 'keep');
  symlinkSync(join(sb.root, 'outside'), join(sb.nas, VM, 'out'));
  return sb;
}

const BAD: Array<[string, string, RegExp]> = [
  ['absolute', '/etc/passwd', /must be relative/],
  ['dot-dot', `${VM}/../../outside/${TS[0]}`, /must not contain '\.\.'/],
  ['dot-dot in the middle', `${VM}/${TS[0]}/../../../x`, /must not contain '\.\.'/],
  ['a link out of the share', `${VM}/out/${TS[0]}`, /resolves outside the NAS mount/],
];

async function refused(sb: Sandbox, args: string[], msg: RegExp): Promise<void> {
  const nas = snapshotTree(sb.nas);
  const outside = snapshotTree(join(sb.root, 'outside'));
  const r = await run(sb, args);
  expect(r.code).toBe(1);
  expect(r.stdout).toMatch(msg);
  expect(r.stdout.trim().split('\n')).toHaveLength(1);
  expect(snapshotTree(sb.nas)).toEqual(nas);
  expect(snapshotTree(join(sb.root, 'outside'))).toEqual(outside);
  expect(leftovers(sb)).toEqual({ dirs: [], mounts: [] });
}

describe.each(BAD)('%s path', (_name, bad, msg) => {
  it('delete -p', async () => {
    const sb = share('esc-delete');
    await refused(sb, ['-o', 'delete', ...bindNas(sb), '-p', bad], msg);
  });

  it('rebase --rebase-target', async () => {
    const sb = share('esc-rebase-target');
    await refused(
      sb,
      ['-o', 'rebase', ...bindNas(sb), '--rebase-target', `${bad}/root.qcow2`, '--rebase-new-backing', rootFile(TS[0])],
      msg,
    );
  });

  it('rebase --rebase-new-backing', async () => {
    const sb = share('esc-rebase-backing');
    await refused(
      sb,
      ['-o', 'rebase', ...bindNas(sb), '--rebase-target', rootFile(TS[2]), '--rebase-new-backing', `${bad}/root.qcow2`],
      msg,
    );
  });

  it('backup -p (stopped VM)', async () => {
    const sb = share('esc-backup-p');
    writeFileSync(join(sb.root, 'disk.raw'), Buffer.alloc(1 << 20));
    await refused(sb, ['-o', 'backup', '-v', VM, ...bindNas(sb), '-p', bad, '-q', 'false', '-d', join(sb.root, 'disk.raw')], msg);
  });
});
