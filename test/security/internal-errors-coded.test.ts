// Issue 15.10 (non-chain part): failures of the host or the NAS used to surface as
// "Internal error: …" (the code for our own bugs). Each gets a coded, one-line answer,
// exit 1, and nothing changed: a name longer than the file system allows (ENAMETOOLONG),
// a TMPDIR that does not exist (no mount point can be made), and a backing file whose
// blocks return EIO (a real FUSE mount, test/security/eio-fs.py, failing those reads).
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { mkdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import { bindNas, leftovers, logText, makeSandbox, run, type Sandbox } from '../helpers/cli.js';
import { makeImage } from '../helpers/qemu.js';
import { removeTempDirs } from '../helpers/tmp.js';
import { snapshotTree } from '../helpers/tree.js';
import { waitFor } from './harness.js';

const undo: Array<() => void> = [];
afterAll(() => {
  for (const u of undo.reverse()) {
    try {
      u();
    } catch {
      // best effort: the next undo still runs
    }
  }
  removeTempDirs();
});

const VM = 'i-2-20-VM';
const M = 1 << 20;

function expectCoded(sb: Sandbox, r: { code: number | null; stdout: string }, code: string, message: RegExp): void {
  expect(r.code, r.stdout).toBe(1);
  expect(r.stdout).not.toMatch(/Internal error/);
  expect(r.stdout).toMatch(message);
  expect(logText(sb)).toMatch(new RegExp(`ERROR \\[${code}\\]`));
}

describe('host and NAS failures get their own error codes', () => {
  it.each([
    ['a 300-byte folder name in -p of a backup', ['-o', 'backup', '-v', VM, '-p', `${VM}/${'a'.repeat(300)}`]],
    ['a 256-byte name in -p of a delete', ['-o', 'delete', '-p', `${VM}/${'b'.repeat(256)}`]],
    [
      'a 5000-byte path of short names in --rebase-target',
      ['-o', 'rebase', '--rebase-target', `${VM}/${Array(20).fill('c'.repeat(250)).join('/')}`, '--rebase-new-backing', `${VM}/x/y`],
    ],
  ])('ENAMETOOLONG: %s is refused before anything is touched', async (_name, args) => {
    const sb = makeSandbox('sec-long');
    mkdirSync(join(sb.nas, VM, '2025.10.01.00.00.00'), { recursive: true });
    const snap = snapshotTree(sb.nas);
    const r = await run(sb, [...args, ...bindNas(sb)]);
    expectCoded(sb, r, 'PATH_TOO_LONG', /^(-p|--rebase-target) is too long/);
    expect(snapshotTree(sb.nas)).toEqual(snap);
    expect(leftovers(sb)).toEqual({ dirs: [], mounts: [] });
  });

  it('a TMPDIR that does not exist: no mount point can be made, said so', async () => {
    const sb = makeSandbox('sec-tmpdir');
    const missing = join(sb.root, 'no-such-tmp');
    const r = await run(sb, ['-o', 'stats', ...bindNas(sb)], { TMPDIR: missing });
    expectCoded(sb, r, 'TMPDIR_UNUSABLE', new RegExp(`^Cannot create a mount point in ${missing} \\(TMPDIR\\): ENOENT`));
    expect(readFileSync('/proc/self/mountinfo', 'utf8')).not.toContain(missing);
  });

  it.each(['native', 'qemu-img'])(
    'a backing file that returns EIO (engine %s): a coded failure, the target unchanged',
    async (engine) => {
      const sb = makeSandbox(`sec-eio-${engine}`);
      const f = (ts: string): string => `${VM}/${ts}/root.qcow2`;
      // The backups on a real FUSE mount whose reads of the base fail with EIO (a dying disk).
      const src = join(sb.root, 'disk');
      makeImage(join(src, f('2025.10.01.00.00.00')), { size: 16 * M, writes: [{ pattern: 1, offset: 0, length: 2 * M }] });
      makeImage(join(src, f('2025.10.02.00.00.00')), {
        size: 16 * M,
        backing: '../2025.10.01.00.00.00/root.qcow2',
        writes: [{ pattern: 2, offset: 1 * M, length: 2 * M }],
      });
      makeImage(join(src, f('2025.10.03.00.00.00')), {
        size: 16 * M,
        backing: '../2025.10.02.00.00.00/root.qcow2',
        writes: [{ pattern: 3, offset: 4 * M, length: 1 * M }],
      });
      const fs = spawn(
        '/usr/bin/python3',
        [fileURLToPath(new URL('./eio-fs.py', import.meta.url)), src, sb.nas, f('2025.10.01.00.00.00')],
        { stdio: 'ignore' },
      );
      const gone = new Promise((r) => fs.on('exit', r));
      undo.push(() => {
        spawnSync('umount', [sb.nas]);
        fs.kill('SIGKILL');
      });
      const isMounted = (): boolean =>
        readFileSync('/proc/self/mountinfo', 'utf8')
          .split('\n')
          .some((l) => l.split(' ')[4] === sb.nas);
      await waitFor(() => isMounted(), 20_000, 'the FUSE mount');
      expect(() => readFileSync(join(sb.nas, f('2025.10.01.00.00.00')))).toThrow(/EIO/);
      const target = join(sb.nas, f('2025.10.03.00.00.00'));
      const before = readFileSync(target);

      const r = await run(
        sb,
        ['-o', 'rebase', ...bindNas(sb), '--rebase-target', f('2025.10.03.00.00.00'), '--rebase-new-backing', f('2025.10.01.00.00.00')],
        { NASBACKUP_ENGINE: engine },
      );
      expect(r.code, r.stdout).toBe(1);
      expect(r.stdout).not.toMatch(/Internal error/);
      expect(r.stdout.split('\n')[0]).toMatch(/EIO|I\/O error|Input\/output error/i);
      expect(logText(sb)).toMatch(/ERROR \[(IO_ERROR|NOT_QCOW2|CHAIN_BROKEN|QEMU_IMG_FAILED|NATIVE_REBASE_FAILED)\]/);
      expect(readFileSync(target).equals(before)).toBe(true);
      expect(leftovers(sb).mounts.filter((m) => m !== sb.nas)).toEqual([]);
      execFileSync('umount', [sb.nas]);
      await gone;
    },
    60_000,
  );
});
