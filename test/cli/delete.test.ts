import { mkdirSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { bindNas, leftovers, logText, makeSandbox, run, type Sandbox } from '../helpers/cli.js';
import { seedChain, TS, VM } from '../helpers/chain.js';
import { snapshotTree } from '../helpers/tree.js';
import { removeTempDirs } from '../helpers/tmp.js';

afterAll(removeTempDirs);

const del = (sb: Sandbox, p: string): string[] => ['-o', 'delete', ...bindNas(sb), '-p', p];

describe('-o delete', () => {
  it('removes exactly the backup directory, printing rm -v lines', async () => {
    const sb = makeSandbox('del-ok');
    seedChain(sb.nas);
    const before = snapshotTree(sb.nas);
    const r = await run(sb, del(sb, `${VM}/${TS[1]}`));
    expect(r.code).toBe(0);
    const lines = r.stdout.split('\n').filter(Boolean);
    const mp = /^removed '(\S+\/csbackup\.\w{5})\//.exec(lines[0]!)![1];
    const prefix = `${mp}/${VM}/${TS[1]}`;
    expect(lines.at(-1)).toBe(`removed directory '${prefix}'`);
    expect(lines.slice(0, -1).sort()).toEqual(
      ['domain-config.xml', 'domblklist.xml', 'domiflist.xml', 'dominfo.xml', 'root.b3f4c2a0-6d1e-4f7a-9c2b-1e5d8a7f3c01.qcow2'].map(
        (f) => `removed '${prefix}/${f}'`,
      ),
    );
    const expected = before.filter((e) => !e.path.startsWith(`${VM}/${TS[1]}`));
    expect(snapshotTree(sb.nas)).toEqual(expected);
    expect(leftovers(sb)).toEqual({ dirs: [], mounts: [] });
    // Flushed: the NAS only (syncfs), not every filesystem of the host.
    expect(logText(sb)).toContain(`exec: sync -f ${mp} -> exit 0`);
  });

  it('prints nested directories after their contents', async () => {
    const sb = makeSandbox('del-nest');
    mkdirSync(join(sb.nas, VM, TS[0], 'sub'), { recursive: true });
    writeFileSync(join(sb.nas, VM, TS[0], 'sub', 'f'), 'x');
    const r = await run(sb, del(sb, `${VM}/${TS[0]}`));
    expect(r.code).toBe(0);
    const lines = r.stdout
      .split('\n')
      .filter(Boolean)
      .map((l) => l.replace(/'\S+\/csbackup\.\w{5}/, "'<MP>"));
    expect(lines).toEqual([
      `removed '<MP>/${VM}/${TS[0]}/sub/f'`,
      `removed directory '<MP>/${VM}/${TS[0]}/sub'`,
      `removed directory '<MP>/${VM}/${TS[0]}'`,
    ]);
  });

  it('a directory already gone is success with no output (retries are idempotent)', async () => {
    const sb = makeSandbox('del-gone');
    seedChain(sb.nas);
    const before = snapshotTree(sb.nas);
    const r = await run(sb, del(sb, `${VM}/2099.01.01.00.00.00`));
    expect(r).toMatchObject({ code: 0, stdout: '' });
    expect(snapshotTree(sb.nas)).toEqual(before);
    expect(leftovers(sb)).toEqual({ dirs: [], mounts: [] });
  });

  it('does not follow symbolic links inside the backup', async () => {
    const sb = makeSandbox('del-innerlink');
    const outside = join(sb.root, 'precious');
    mkdirSync(outside);
    writeFileSync(join(outside, 'keep'), 'keep');
    mkdirSync(join(sb.nas, VM, TS[0]), { recursive: true });
    symlinkSync(outside, join(sb.nas, VM, TS[0], 'link'));
    const r = await run(sb, del(sb, `${VM}/${TS[0]}`));
    expect(r.code).toBe(0);
    expect(snapshotTree(outside)).toHaveLength(1);
    expect(snapshotTree(sb.nas)).toEqual([{ path: VM, type: 'dir', mode: '0755' }]);
  });

  describe('refusals change nothing and leave nothing mounted', () => {
    const cases: Array<[string, string, RegExp]> = [
      ['empty -p (the original wipes the share)', '', /^-p must not be empty\n$/],
      ['the instance folder', VM, /at least 2 levels/],
      ['absolute', '/etc', /must be relative/],
      ['traversal', `${VM}/../..`, /must not contain '\.\.'/],
      ['dot', '.', /names the NAS mount root/],
      ['symlink out of the share', `${VM}/out/x`, /resolves outside the NAS mount/],
      ['the backup dir itself a symlink', `${VM}/alias`, /symbolic link/],
      ['a link that shortens the path', 'self/i-2-10-VM', /resolves to less than 2 levels/],
    ];
    it.each(cases)('%s', async (_n, p, msg) => {
      const sb = makeSandbox('del-refuse');
      seedChain(sb.nas);
      symlinkSync(sb.root, join(sb.nas, VM, 'out'));
      symlinkSync(TS[0], join(sb.nas, VM, 'alias'));
      symlinkSync('.', join(sb.nas, 'self'));
      const before = snapshotTree(sb.nas);
      const rootBefore = snapshotTree(sb.root).filter((e) => !e.path.startsWith('tmp') && e.path !== 'agent.log');
      const r = await run(sb, del(sb, p));
      expect(r.code).toBe(1);
      expect(r.stdout).toMatch(msg);
      expect(snapshotTree(sb.nas)).toEqual(before);
      expect(snapshotTree(sb.root).filter((e) => !e.path.startsWith('tmp') && e.path !== 'agent.log')).toEqual(rootBefore);
      expect(leftovers(sb)).toEqual({ dirs: [], mounts: [] });
    });
  });

  it('never deletes into another filesystem mounted inside the backup', async () => {
    const sb = makeSandbox('del-xdev');
    mkdirSync(join(sb.nas, VM, TS[0], 'nested'), { recursive: true });
    const other = join(sb.root, 'other');
    mkdirSync(other);
    writeFileSync(join(other, 'keep'), 'keep');
    const { execFileSync } = await import('node:child_process');
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', join(sb.nas, VM, TS[0], 'nested')]);
    writeFileSync(join(sb.nas, VM, TS[0], 'nested', 'onfs'), 'x');
    try {
      const r = await run(sb, del(sb, `${VM}/${TS[0]}`));
      expect(r.code).toBe(1);
      // Through a plain bind mount the nested mount shows as a busy, empty folder.
      expect(r.stdout).toMatch(/^Failed to delete \S+\n.*(EBUSY|another filesystem)/);
      expect(snapshotTree(join(sb.nas, VM, TS[0], 'nested'))).toHaveLength(1);
    } finally {
      execFileSync('umount', [join(sb.nas, VM, TS[0], 'nested')]);
    }
    expect(leftovers(sb)).toEqual({ dirs: [], mounts: [] });
  });
});

describe('per-VM lock', () => {
  it('a delete waits for the VM lock held by a live operation, then fails without deleting', async () => {
    const sb = makeSandbox('del-locked');
    seedChain(sb.nas);
    const { hostname } = await import('node:os');
    const { processStart } = await import('../../lib/nas/lock.js');
    const pidStart = await processStart(process.pid);
    writeFileSync(
      join(sb.nas, VM, '.nasbackup.lock'),
      JSON.stringify({ host: hostname(), pid: process.pid, pidStart, startedAt: 'now', operation: 'backup' }),
    );
    const before = snapshotTree(sb.nas);
    const r = await run(sb, del(sb, `${VM}/${TS[1]}`), { NASBACKUP_LOCK_WAIT: '0.5' });
    expect(r.code).toBe(1);
    expect(r.stdout).toMatch(/^Another operation holds the lock of this VM's backups: backup by pid \d+ on /);
    expect(snapshotTree(sb.nas)).toEqual(before);
    expect(leftovers(sb)).toEqual({ dirs: [], mounts: [] });
  });
});
