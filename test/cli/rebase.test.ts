// -o rebase end to end: bin/nasbackup as a child process, real qemu-img, the NAS a
// real bind mount of a local folder.
import { closeSync, openSync, rmSync, symlinkSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { bindNas, leftovers, logText, makeSandbox, run, writeShim, type Sandbox } from '../helpers/cli.js';
import { rootFile, seedChain, TS, VM, VOL } from '../helpers/chain.js';
import { checkExitCode, contentSha256, info } from '../helpers/qemu.js';
import { snapshotTree } from '../helpers/tree.js';
import { removeTempDirs } from '../helpers/tmp.js';

afterAll(removeTempDirs);

const rebaseArgs = (sb: Sandbox, target: string, backing: string): string[] => [
  '-o',
  'rebase',
  ...bindNas(sb),
  '--rebase-target',
  target,
  '--rebase-new-backing',
  backing,
];

function chained(tag: string): Sandbox {
  const sb = makeSandbox(tag);
  seedChain(sb.nas);
  return sb;
}

describe('-o rebase', () => {
  it('repairs the chain after the middle backup goes: same content, clean check, relative backing, empty stdout', async () => {
    const sb = chained('rb-ok');
    const inc2 = join(sb.nas, rootFile(TS[2]));
    const before = contentSha256(inc2, sb.root);
    const r = await run(sb, rebaseArgs(sb, rootFile(TS[2]), rootFile(TS[0])));
    expect(r).toMatchObject({ code: 0, stdout: '' });
    expect(info(inc2)['backing-filename']).toBe(`../${TS[0]}/root.${VOL}.qcow2`);
    expect(info(inc2)['backing-filename-format']).toBe('qcow2');
    // The middle backup can now go and the chain still reads the same.
    rmSync(join(sb.nas, VM, TS[1]), { recursive: true });
    expect(contentSha256(inc2, sb.root)).toBe(before);
    expect(checkExitCode(inc2)).toBe(0);
    expect(leftovers(sb)).toEqual({ dirs: [], mounts: [] });
    expect(logText(sb)).toMatch(/> Successfully mounted none store\n/);
    // The default engine (auto) repairs an in-chain rebase natively, without qemu-img.
    expect(logText(sb)).toMatch(/engine auto: native for \S+root\.[\w-]+\.qcow2/);
    expect(logText(sb)).not.toMatch(/exec: qemu-img rebase/);
  });

  it('--engine qemu-img (or NASBACKUP_ENGINE=qemu-img) runs qemu-img rebase', async () => {
    const sb = chained('rb-qemu');
    const inc2 = join(sb.nas, rootFile(TS[2]));
    const before = contentSha256(inc2, sb.root);
    const r = await run(sb, [...rebaseArgs(sb, rootFile(TS[2]), rootFile(TS[0])), '--engine', 'qemu-img']);
    expect(r).toMatchObject({ code: 0, stdout: '' });
    expect(logText(sb)).toMatch(
      /exec: qemu-img rebase -b \.\.\/2025\.01\.01\.00\.00\.00\/root\.[\w-]+\.qcow2 -F qcow2 \S+ -> exit 0 \(\d+ ms\)/,
    );
    expect(contentSha256(inc2, sb.root)).toBe(before);
    const bad = await run(sb, rebaseArgs(sb, rootFile(TS[2]), rootFile(TS[0])), { NASBACKUP_ENGINE: 'turbo' });
    expect(bad.code).toBe(1);
    expect(bad.stdout).toMatch(/Invalid NASBACKUP_ENGINE: turbo/);
  });

  it('is idempotent: a retry after success changes nothing', async () => {
    const sb = chained('rb-idem');
    expect((await run(sb, rebaseArgs(sb, rootFile(TS[2]), rootFile(TS[0])))).code).toBe(0);
    const snap = snapshotTree(sb.nas);
    const r = await run(sb, rebaseArgs(sb, rootFile(TS[2]), rootFile(TS[0])));
    expect(r).toMatchObject({ code: 0, stdout: '' });
    expect(snapshotTree(sb.nas)).toEqual(snap);
    expect(logText(sb)).toMatch(/nothing to do/);
  });

  it('rebases onto a backing that is not in the chain (slow path), content kept', async () => {
    const sb = chained('rb-slow');
    const inc2 = join(sb.nas, rootFile(TS[2]));
    const before = contentSha256(inc2, sb.root);
    // A stand-alone full copy elsewhere in the VM folder.
    const { qemuImg } = await import('../helpers/qemu.js');
    qemuImg(['convert', '-O', 'qcow2', join(sb.nas, rootFile(TS[0])), join(sb.nas, VM, 'copy.qcow2')]);
    const r = await run(sb, rebaseArgs(sb, rootFile(TS[2]), `${VM}/copy.qcow2`));
    expect(r).toMatchObject({ code: 0, stdout: '' });
    expect(info(inc2)['backing-filename']).toBe('../copy.qcow2');
    expect(contentSha256(inc2, sb.root)).toBe(before);
    expect(logText(sb)).toMatch(/not in the current chain/);
  });

  describe('every failure leaves the NAS exactly as it was and nothing mounted', () => {
    const cases: Array<[string, (sb: Sandbox) => string[], number, RegExp]> = [
      [
        'missing --rebase-target',
        (sb) => ['-o', 'rebase', ...bindNas(sb), '--rebase-new-backing', rootFile(TS[0])],
        1,
        /^rebase requires --rebase-target and --rebase-new-backing\n$/,
      ],
      [
        'missing --rebase-new-backing',
        (sb) => ['-o', 'rebase', ...bindNas(sb), '--rebase-target', rootFile(TS[2])],
        1,
        /^rebase requires --rebase-target and --rebase-new-backing\n$/,
      ],
      [
        'target absent',
        (sb) => rebaseArgs(sb, `${VM}/2099.01.01.00.00.00/root.${VOL}.qcow2`, rootFile(TS[0])),
        1,
        /^Rebase target file does not exist: \S+\/csbackup\.\w{5}\/i-2-10-VM\/2099/,
      ],
      [
        'backing absent',
        (sb) => rebaseArgs(sb, rootFile(TS[2]), `${VM}/2099.01.01.00.00.00/root.${VOL}.qcow2`),
        1,
        /^New backing file does not exist: /,
      ],
      ['absolute target', (sb) => rebaseArgs(sb, '/etc/passwd', rootFile(TS[0])), 1, /^--rebase-target must be relative/],
      [
        'traversal in backing',
        (sb) => rebaseArgs(sb, rootFile(TS[2]), `${VM}/../../etc/x.qcow2`),
        1,
        /^--rebase-new-backing must not contain '\.\.'/,
      ],
      ['empty target', (sb) => rebaseArgs(sb, '', rootFile(TS[0])), 1, /^rebase requires --rebase-target/],
      ['target onto itself', (sb) => rebaseArgs(sb, rootFile(TS[2]), rootFile(TS[2])), 1, /same file/],
      ['backing loop', (sb) => rebaseArgs(sb, rootFile(TS[0]), rootFile(TS[2])), 1, /backing loop/],
      ['target a directory', (sb) => rebaseArgs(sb, `${VM}/${TS[2]}`, rootFile(TS[0])), 1, /not a regular file/],
    ];
    it.each(cases)('%s', async (_name, argv, code, stdout) => {
      const sb = chained('rb-fail');
      const snap = snapshotTree(sb.nas);
      const r = await run(sb, argv(sb));
      expect(r.code).toBe(code);
      expect(r.stdout).toMatch(stdout);
      expect(snapshotTree(sb.nas)).toEqual(snap);
      expect(leftovers(sb)).toEqual({ dirs: [], mounts: [] });
    });

    it('corrupt target (qcow2 version 9): names the file, nothing else touched', async () => {
      const sb = chained('rb-corrupt');
      const f = join(sb.nas, rootFile(TS[2]));
      const fd = openSync(f, 'r+');
      writeSync(fd, Buffer.from([0, 0, 0, 9]), 0, 4, 4);
      closeSync(fd);
      const snap = snapshotTree(sb.nas);
      const r = await run(sb, rebaseArgs(sb, rootFile(TS[2]), rootFile(TS[0])));
      expect(r.code).toBe(1);
      expect(r.stdout).toMatch(/^Rebase target is not a usable qcow2 image: \S+root\.[\w-]+\.qcow2\n.*Unsupported qcow2 version 9\n$/);
      expect(snapshotTree(sb.nas)).toEqual(snap);
      expect(leftovers(sb)).toEqual({ dirs: [], mounts: [] });
    });

    it('broken old chain: refuses (safe rebase needs the old view), nothing touched', async () => {
      const sb = chained('rb-broken');
      rmSync(join(sb.nas, VM, TS[1]), { recursive: true });
      const snap = snapshotTree(sb.nas);
      const r = await run(sb, rebaseArgs(sb, rootFile(TS[2]), rootFile(TS[0])));
      expect(r.code).toBe(1);
      expect(r.stdout).toMatch(
        /^Rebase target has an unreadable backing chain, refusing to rebase: .*\n.*2025\.01\.02\.00\.00\.00\/root\.[\w-]+\.qcow2 .*does not exist/,
      );
      expect(snapshotTree(sb.nas)).toEqual(snap);
    });

    it('qemu-img itself fails: its error text reaches stdout, nothing else touched', async () => {
      const sb = chained('rb-qifail');
      // A sound chain, and a qemu-img that fails (failure injection: a chain qemu-img would
      // refuse is now refused by the chain safety check before qemu-img runs).
      writeShim(sb, 'qemu-img', `echo "qemu-img: Could not open '$6': injected failure" >&2; exit 1`);
      const snap = snapshotTree(sb.nas);
      const r = await run(sb, [...rebaseArgs(sb, rootFile(TS[2]), rootFile(TS[0])), '--engine', 'qemu-img'], {
        NASBACKUP_QEMU_IMG: join(sb.shims, 'qemu-img'),
      });
      expect(r.code).toBe(1);
      expect(r.stdout).toMatch(
        /^qemu-img rebase failed for \S+\/root\.[\w-]+\.qcow2 onto \.\.\/2025\.01\.01\.00\.00\.00\/root\.[\w-]+\.qcow2\nqemu-img: Could not open '\S+': injected failure\n$/,
      );
      expect(snapshotTree(sb.nas)).toEqual(snap);
      expect(leftovers(sb)).toEqual({ dirs: [], mounts: [] });
    });

    it('a symlink escaping the share is refused', async () => {
      const sb = chained('rb-link');
      symlinkSync('/etc', join(sb.nas, VM, 'evil'));
      const snap = snapshotTree(sb.nas);
      const r = await run(sb, rebaseArgs(sb, `${VM}/evil/passwd`, rootFile(TS[0])));
      expect(r.code).toBe(1);
      expect(r.stdout).toMatch(/^--rebase-target resolves outside the NAS mount/);
      expect(snapshotTree(sb.nas)).toEqual(snap);
    });
  });
});
