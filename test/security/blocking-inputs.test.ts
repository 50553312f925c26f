// Issue 15 item 9: inputs that block. A FIFO as a layer's backing (or as a backup file) made
// `chain verify` and the rebase block forever in open() — ignoring SIGTERM, with the NAS
// mounted and the VM lock held; a layer that is its own backing made `chain verify` run
// `qemu-img check`, which reopens the image without end. Our reader never opens a FIFO (type
// checked first, O_NONBLOCK), and a chain it rejected is never handed to qemu-img. Each run
// here is bounded: one still running after 30 s (everything takes a second or two) is a hang,
// killed with what it started.
import { execFileSync } from 'node:child_process';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { leftovers, logText, type Sandbox } from '../helpers/cli.js';
import { rootFile, TS, VM, VOL } from '../helpers/chain.js';
import { qemuImg } from '../helpers/qemu.js';
import { snapshotTree } from '../helpers/tree.js';
import { removeTempDirs, tempDir } from '../helpers/tmp.js';
import { chainArgs, chained, ENGINES, expectRefused, onNas, rebaseArgs, runBounded } from './fixtures.js';

afterAll(removeTempDirs);

const FILE = `root.${VOL}.qcow2`;
const HANG = 120_000;

/** The middle backup (inc1) backs onto a FIFO in the full backup's folder. */
function fifoBacking(sb: Sandbox): void {
  execFileSync('mkfifo', [join(sb.nas, VM, TS[0], 'held.fifo')]);
  qemuImg(['rebase', '-u', '-b', `../${TS[0]}/held.fifo`, '-F', 'qcow2', onNas(sb, TS[1])]);
}

/** The middle backup (inc1) is its own backing file. */
function selfBacked(sb: Sandbox): void {
  qemuImg(['rebase', '-u', '-b', FILE, '-F', 'qcow2', onNas(sb, TS[1])]);
}

describe('a FIFO never blocks', () => {
  it.each(ENGINES)(
    'rebase --engine %s through a FIFO backing: CHAIN_UNSAFE at once, lock and mount released',
    async (engine) => {
      const sb = chained(`sec-fifo-${engine}`);
      fifoBacking(sb);
      const before = snapshotTree(sb.nas);
      const r = await runBounded(sb, rebaseArgs(sb, rootFile(TS[2]), rootFile(TS[0]), engine));
      expectRefused(sb, r, 'CHAIN_UNSAFE', before);
      expect(r.stdout).toMatch(/held\.fifo of \S+ is a FIFO, not a regular file/);
    },
    HANG,
  );

  it(
    'chain verify with a FIFO backing: reports it, runs no qemu-img on that chain',
    async () => {
      const sb = chained('sec-fifo-verify');
      fifoBacking(sb);
      const r = await runBounded(sb, chainArgs(sb, 'verify'));
      expect(r.hung, 'chain verify hung').toBe(false);
      expect(r.code).toBe(1);
      expect(r.stdout).toMatch(
        new RegExp(`FAIL ${VM}/${TS[1]}/${FILE}: backing file ${TS[0]}/held\\.fifo of ${TS[1]}/${FILE} is a FIFO, not a regular file`),
      );
      expect(r.stdout).toMatch(new RegExp(`FAIL ${VM}/${TS[2]}/${FILE}: chain unsafe: `));
      expect(logText(sb)).not.toMatch(new RegExp(`(?:exec: qemu-img check|Structural check of) .*(${TS[1]}|${TS[2]})`));
      expect(leftovers(sb)).toEqual({ dirs: [], mounts: [] });
    },
    HANG,
  );

  it(
    'chain verify with a FIFO in place of a backup file: reports it',
    async () => {
      const sb = chained('sec-fifo-file');
      execFileSync('mkdir', [join(sb.nas, VM, '2025.01.04.00.00.00')]);
      execFileSync('mkfifo', [join(sb.nas, VM, '2025.01.04.00.00.00', FILE)]);
      const r = await runBounded(sb, chainArgs(sb, 'verify'));
      expect(r.hung, 'chain verify hung').toBe(false);
      expect(r.code).toBe(1);
      expect(r.stdout).toMatch(new RegExp(`FAIL ${VM}/2025\\.01\\.04\\.00\\.00\\.00/${FILE}: unreadable header: not a regular file`));
      expect(leftovers(sb)).toEqual({ dirs: [], mounts: [] });
    },
    HANG,
  );

  it(
    'a device node as backing is refused the same way',
    async () => {
      const sb = chained('sec-dev');
      execFileSync('mknod', [join(sb.nas, VM, TS[0], 'zero.dev'), 'c', '1', '5']);
      qemuImg(['rebase', '-u', '-b', `../${TS[0]}/zero.dev`, '-F', 'qcow2', onNas(sb, TS[1])]);
      const before = snapshotTree(sb.nas);
      const r = await runBounded(sb, rebaseArgs(sb, rootFile(TS[2]), rootFile(TS[0])));
      expectRefused(sb, r, 'CHAIN_UNSAFE', before);
      expect(r.stdout).toMatch(/zero\.dev of \S+ is a device, not a regular file/);
    },
    HANG,
  );
});

describe('the qcow2 reader itself', () => {
  it('opening a FIFO as an image fails at once with QCOW2_NOT_A_FILE (header reader and image open)', async () => {
    const { readHeader } = await import('../../lib/qcow2/header.js');
    const { Qcow2Image } = await import('../../lib/qcow2/image.js');
    const fifo = join(tempDir('sec-fifo-lib'), 'fifo.qcow2');
    execFileSync('mkfifo', [fifo]);
    // Bounded so that a blocking open fails the test instead of hanging it.
    const bounded = <T>(p: Promise<T>): Promise<T | 'blocked'> =>
      Promise.race([p, new Promise<'blocked'>((r) => setTimeout(() => r('blocked'), 10_000).unref())]);
    await expect(bounded(readHeader(fifo))).rejects.toMatchObject({ code: 'QCOW2_NOT_A_FILE' });
    await expect(bounded(Qcow2Image.open(fifo))).rejects.toMatchObject({ code: 'QCOW2_NOT_A_FILE' });
  });
});

describe('a layer that is its own backing is never handed to qemu-img', () => {
  it(
    'chain verify: reported, no qemu-img check on any chain through it',
    async () => {
      const sb = chained('sec-self-verify');
      selfBacked(sb);
      const r = await runBounded(sb, chainArgs(sb, 'verify'));
      expect(r.hung, 'chain verify hung').toBe(false);
      expect(r.code).toBe(1);
      expect(r.stdout).toMatch(new RegExp(`FAIL ${VM}/${TS[1]}/${FILE}: .*${TS[1]}/${FILE} is its own backing file`));
      expect(r.stdout).toMatch(new RegExp(`FAIL ${VM}/${TS[2]}/${FILE}: chain unsafe: ${TS[1]}/${FILE} is its own backing file`));
      // The full backup is sound and still checked; nothing above it is.
      expect(logText(sb)).toMatch(new RegExp(`(?:exec: qemu-img check|Structural check of) .*${TS[0]}/${FILE.replace(/\./g, '\\.')}`));
      expect(logText(sb)).not.toMatch(new RegExp(`(?:exec: qemu-img check|Structural check of) .*(${TS[1]}|${TS[2]})`));
      expect(leftovers(sb)).toEqual({ dirs: [], mounts: [] });
    },
    HANG,
  );

  it.each(ENGINES)(
    'rebase --engine %s: CHAIN_UNSAFE',
    async (engine) => {
      const sb = chained(`sec-self-${engine}`);
      selfBacked(sb);
      const before = snapshotTree(sb.nas);
      const r = await runBounded(sb, rebaseArgs(sb, rootFile(TS[2]), rootFile(TS[0]), engine));
      expectRefused(sb, r, 'CHAIN_UNSAFE', before);
      expect(r.stdout).toMatch(/is its own backing file/);
    },
    HANG,
  );
});
