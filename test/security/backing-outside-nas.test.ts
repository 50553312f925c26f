// Issue 15 item 3: a layer whose backing name points outside the VM's folder (an absolute host
// path, or a relative name that climbs into another VM's folder) was followed: its data was
// read and copied into the backup. Every operation that opens a chain now refuses it
// (CHAIN_UNSAFE) before anything past the reference is opened: rebase with every engine,
// chain delete, and an incremental backup's parents. Real qemu-img images.
import { execFileSync } from 'node:child_process';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { logText, type Sandbox } from '../helpers/cli.js';
import { rootFile, TS, VM } from '../helpers/chain.js';
import { makeImage, qemuImg } from '../helpers/qemu.js';
import { snapshotTree } from '../helpers/tree.js';
import { removeTempDirs } from '../helpers/tmp.js';
import { backup, incrementalFlags, PARENT_BITMAP, PARENT_TS, rootFile as parentRootFile, scenario } from '../backup/scenario.js';
import { chainArgs, chained, ENGINES, expectRefused, onNas, rebaseArgs, runBounded } from './fixtures.js';

afterAll(removeTempDirs);

/** A "secret" image (0x5e at 8 MiB, where no backup has data) backed by the full backup. */
function secret(sb: Sandbox, at: string): string {
  makeImage(at, { backing: onNas(sb, TS[0]), size: 16 << 20, writes: [{ pattern: 0x5e, offset: 8 << 20, length: 256 << 10 }] });
  return at;
}

/** Point the middle backup (inc1) at `name` (header only). */
function repoint(sb: Sandbox, name: string): void {
  qemuImg(['rebase', '-u', '-b', name, '-F', 'qcow2', onNas(sb, TS[1])]);
}

const placements: Array<[string, (sb: Sandbox) => void, RegExp]> = [
  [
    'an absolute host path outside the NAS',
    (sb) => repoint(sb, secret(sb, join(sb.root, 'outside', 'secret.qcow2'))),
    /has an absolute backing name \(\/\S+\/outside\/secret\.qcow2\)/,
  ],
  [
    "a relative name into another VM's folder",
    (sb) => {
      secret(sb, join(sb.nas, 'i-9-99-VM', 'secret.qcow2'));
      repoint(sb, '../../i-9-99-VM/secret.qcow2');
    },
    /i-9-99-VM\/secret\.qcow2 of \S+ is outside the VM folder/,
  ],
  [
    'a relative name that climbs out to /proc',
    (sb) => repoint(sb, `${'../'.repeat(24)}proc/self/environ`),
    /proc\/self\/environ of \S+ is outside the VM folder \(\/proc\/\d+\/environ\)/,
  ],
];

describe('a backing reference outside the VM folder is never followed', () => {
  describe.each(placements)('%s', (_name, place, why) => {
    it.each(ENGINES)('rebase --engine %s: CHAIN_UNSAFE, nothing copied', async (engine) => {
      const sb = chained(`sec-out-${engine}`);
      place(sb);
      const before = snapshotTree(sb.nas);
      const r = await runBounded(sb, rebaseArgs(sb, rootFile(TS[2]), rootFile(TS[0]), engine));
      expectRefused(sb, r, 'CHAIN_UNSAFE', before);
      expect(r.stdout).toMatch(/^The chain of the rebase target is unsafe to open, refusing: /);
      expect(r.stdout).toMatch(why);
      expect(logText(sb)).not.toMatch(/exec: qemu-img rebase/);
    });
  });

  it('chain delete: the repair of a chain that leads outside (the full backed by a host file) is refused', async () => {
    const sb = chained('sec-out-delete');
    const outside = join(sb.root, 'outside');
    mkdirSync(outside, { recursive: true });
    makeImage(join(outside, 'host.qcow2'), { size: 16 << 20, writes: [{ pattern: 0x5e, offset: 8 << 20, length: 256 << 10 }] });
    qemuImg(['rebase', '-u', '-b', join(outside, 'host.qcow2'), '-F', 'qcow2', onNas(sb, TS[0])]);
    const before = snapshotTree(sb.nas);
    const r = await runBounded(sb, chainArgs(sb, 'delete', '--backup', `${VM}/${TS[1]}`));
    expectRefused(sb, r, 'CHAIN_UNSAFE', before);
    expect(r.stdout).toMatch(/has an absolute backing name \(\/\S+\/outside\/host\.qcow2\)/);
  });

  it('a symbolic link in the VM folder that leads out is not followed either', async () => {
    const sb = chained('sec-out-link');
    const s = secret(sb, join(sb.root, 'outside', 'secret.qcow2'));
    execFileSync('ln', ['-s', s, join(sb.nas, VM, 'link.qcow2')]);
    repoint(sb, '../link.qcow2');
    const before = snapshotTree(sb.nas);
    const r = await runBounded(sb, rebaseArgs(sb, rootFile(TS[2]), rootFile(TS[0])));
    expectRefused(sb, r, 'CHAIN_UNSAFE', before);
    expect(r.stdout).toMatch(/link\.qcow2 of \S+ is outside the VM folder \(\S+\/outside\/secret\.qcow2\)/);
  });
});

describe("an incremental backup's parent whose chain leads outside the VM folder", () => {
  it('is refused before backup-begin (CHAIN_UNSAFE), the share untouched', async () => {
    const s = scenario('sec-out-parent', {
      parentOnNas: true,
      domain: { checkpoints: [{ name: PARENT_BITMAP, creationTime: 1735689600 }], disks: [{ bitmaps: [PARENT_BITMAP] }] },
    });
    const outside = join(s.sb.root, 'outside');
    mkdirSync(outside, { recursive: true });
    makeImage(join(outside, 'secret.qcow2'), { size: 16 << 20, writes: [{ pattern: 0x5e, offset: 8 << 20, length: 256 << 10 }] });
    qemuImg(['rebase', '-u', '-b', join(outside, 'secret.qcow2'), '-F', 'qcow2', join(s.sb.nas, parentRootFile(PARENT_TS))]);
    const before = snapshotTree(s.sb.nas);
    const r = await backup(s, { extra: incrementalFlags([parentRootFile(PARENT_TS)]) });
    expect(r.code).toBe(1);
    expect(r.stdout).toMatch(/^The chain of parent backup file \S+ is unsafe to open, refusing: .*absolute backing name/);
    expect(logText(s.sb)).toContain('ERROR [CHAIN_UNSAFE]');
    expect(s.fake.names()).not.toContain('backup-begin');
    expect(snapshotTree(s.sb.nas)).toEqual(before);
  });
});
