// restore and mount end to end on real libvirt + QEMU (TCG): the guest writes a file (through
// its guest agent) and the host writes patterns into its disk; a full and a running incremental
// backup are taken (with their manifests); the incremental is restored as raw and as qcow2 and
// compared by content with the guest's disk at that moment, and the file the guest wrote is read
// back from the restored disk and from the backup itself through `nasbackup mount`.
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  agentCommand,
  createQcow2,
  ensureLab,
  type Guest,
  guestWrite,
  loopNas,
  makeNasImage,
  mkfsExt4,
  type Outcome,
  type Sandbox,
  sandbox,
  startGuest,
  virsh,
  waitFor,
} from './lab.js';

const MiB = 1024 * 1024;
const VM = `nbe2e-rs-${process.pid}`;
const ROOT_VOL = '5a6b7c8d-1e2f-4a3b-8c4d-5e6f7a8b9c01';
const DATA_VOL = '6b7c8d9e-2f3a-4b4c-9d5e-6f7a8b9c0d02';
const FULL = `${VM}/2026.02.01.00.00.01`;
const INC = `${VM}/2026.02.01.00.00.02`;
const rootFile = (p: string) => `${p}/root.${ROOT_VOL}.qcow2`;
const dataFile = (p: string) => `${p}/datadisk.${DATA_VOL}.qcow2`;

/** A file in the guest's ext4 on vdb, written through the guest agent and synced to its disk. */
async function writeGuestFile(name: string, file: string, text: string): Promise<void> {
  const open = (await agentCommand(name, 'guest-file-open', { path: file, mode: 'w' })) as { return: number };
  const handle = open.return;
  try {
    await agentCommand(name, 'guest-file-write', { handle, 'buf-b64': Buffer.from(text).toString('base64') });
  } finally {
    await agentCommand(name, 'guest-file-close', { handle });
  }
  const exec = (await agentCommand(name, 'guest-exec', { path: '/bin/sync', arg: [] })) as { return: { pid: number } };
  await waitFor('sync in the guest', 30_000, async () => {
    const s = (await agentCommand(name, 'guest-exec-status', { pid: exec.return.pid })) as {
      return: { exited: boolean; exitcode?: number };
    };
    if (s.return.exited && s.return.exitcode !== 0) throw new Error(`sync in the guest exited ${s.return.exitcode}`);
    return s.return.exited;
  });
}

describe.sequential('restore and mount of a real guest', () => {
  let sb: Sandbox;
  let img = '';
  let out = '';
  let guest: Guest | undefined;
  let rootDisk = '';
  let dataDisk = '';
  const v1 = `written by the guest before the full backup (${process.pid})\n`;
  const v2 = `rewritten by the guest before the incremental (${process.pid})\n`;

  const nas = () => loopNas(img);
  const cli = (args: string[]): Promise<Outcome> => sb.cli(args);

  const backup = (p: string, mode: 'full' | 'incremental', bitmap: string, parent?: string): Promise<Outcome> =>
    cli([
      '-o',
      'backup',
      '-v',
      VM,
      ...nas(),
      '-p',
      p,
      '-q',
      'false',
      '-d',
      '',
      '-M',
      mode,
      '--bitmap-new',
      bitmap,
      ...(parent ? ['--bitmap-parent', 'backup-1800000001', '--parent-paths', `${rootFile(parent)},${dataFile(parent)}`] : []),
    ]);

  /** The file the guest wrote, read from a raw image of its ext4 disk (loop, read-only, no journal replay). */
  function fileInRaw(raw: string): string {
    const mnt = fs.mkdtempSync(path.join(sb.dir, 'mnt-'));
    execFileSync('mount', ['-o', 'loop,ro,noload', raw, mnt]);
    try {
      return fs.readFileSync(path.join(mnt, 'hello.txt'), 'utf8');
    } finally {
      execFileSync('umount', [mnt]);
      fs.rmdirSync(mnt);
    }
  }

  const nothingLeft = () => expect(sb.leftovers(sb.dir)).toEqual({ tmp: [], mounted: false });

  beforeAll(async () => {
    await ensureLab();
    sb = sandbox('nbe2e-rs-');
    out = path.join(sb.dir, 'out');
    fs.mkdirSync(out);
    rootDisk = path.join(sb.pool, ROOT_VOL);
    dataDisk = path.join(sb.pool, DATA_VOL);
    await createQcow2(rootDisk, 64 * MiB);
    await mkfsExt4(dataDisk, 32 * MiB);
    img = makeNasImage(path.join(sb.dir, 'nas.img'), '512M');
    guest = await startGuest({ name: VM, disks: [rootDisk, dataDisk], dir: sb.dir });
  }, 600_000);

  afterAll(async () => {
    await guest?.destroy().catch(() => {});
    sb?.remove();
  });

  it('a full and a running incremental; the incremental restored as raw and qcow2 equals the guest disk at that moment', async () => {
    await writeGuestFile(VM, '/mnt/vdb/hello.txt', v1);
    await guestWrite(VM, { target: 'vda', pattern: 0x5a, offset: 0, length: 3 * MiB });
    await guestWrite(VM, { target: 'vda', pattern: 0x6b, offset: 33 * MiB, length: 512 * 1024 });
    const full = await backup(FULL, 'full', 'backup-1800000001');
    expect(full.code, full.stdout).toBe(0);

    await writeGuestFile(VM, '/mnt/vdb/hello.txt', v2);
    await guestWrite(VM, { target: 'vda', pattern: 0x7c, offset: 2 * MiB, length: 2 * MiB }); // over the full's data
    await guestWrite(VM, { target: 'vda', pattern: 0x8d, offset: 60 * MiB, length: MiB });
    const inc = await backup(INC, 'incremental', 'backup-1800000002', FULL);
    expect(inc.code, inc.stdout).toBe(0);
    expect((await virsh(['domstate', VM], { check: true })).stdout.trim()).toBe('running');

    // The guest's disks at that moment: vda is written only from the host, so the paused live disk is it.
    await virsh(['suspend', VM], { check: true });
    try {
      for (const format of ['raw', 'qcow2'] as const) {
        const to = path.join(out, `root.${format}`);
        const r = await cli(['restore', ...nas(), '--backup', INC, '--disk', ROOT_VOL, '--to', to, '--format', format, '--json']);
        expect(r.code, r.stdout).toBe(0);
        const j = JSON.parse(r.stdout);
        // Both backups carry manifests: every layer was proven while read (no NO_MANIFEST).
        expect(j).toMatchObject({ ok: true, layers: 2, format, virtualSize: 64 * MiB, warnings: [] });
        const cmp = execFileSync('qemu-img', ['compare', '-U', '-f', format, '-F', 'qcow2', to, rootDisk], { encoding: 'utf8' });
        expect(cmp).toContain('Images are identical');
      }
    } finally {
      await virsh(['resume', VM], { check: true });
    }
    // vdb holds the guest's ext4 (its kernel may touch metadata after the backup): compare the file it wrote.
    const raw = path.join(out, 'data.raw');
    const qcow2 = path.join(out, 'data.qcow2');
    for (const [to, format] of [
      [raw, 'raw'],
      [qcow2, 'qcow2'],
    ] as const) {
      const r = await cli(['restore', ...nas(), '--backup', INC, '--disk', DATA_VOL, '--to', to, '--format', format]);
      expect(r.code, r.stdout).toBe(0);
      expect(r.stdout).toMatch(
        new RegExp(`^restored ${dataFile(INC)} \\(2 layer\\(s\\)\\) to ${to} as ${format}: ${32 * MiB} bytes, \\d+ of data\\n$`),
      );
    }
    expect(fileInRaw(raw)).toBe(v2);
    expect(execFileSync('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', qcow2, raw], { encoding: 'utf8' })).toContain(
      'Images are identical',
    );
    // The full alone: the file as it was then.
    const older = path.join(out, 'data-full.raw');
    expect((await cli(['restore', ...nas(), '--backup', FULL, '--disk', DATA_VOL, '--to', older])).code).toBe(0);
    expect(fileInRaw(older)).toBe(v1);
    nothingLeft();
  });

  it('nasbackup mount exposes each backup read-only: the file the guest wrote, as of that backup; umount undoes it all', async () => {
    for (const [p, text] of [
      [INC, v2],
      [FULL, v1],
    ] as const) {
      const mnt = path.join(sb.dir, `mount-${path.basename(p)}`);
      const m = await cli(['mount', ...nas(), '--backup', p, '--disk', DATA_VOL, mnt]);
      expect(m.code, m.stdout).toBe(0);
      try {
        expect(fs.readFileSync(path.join(mnt, 'disk', 'hello.txt'), 'utf8')).toBe(text);
        expect(() => fs.writeFileSync(path.join(mnt, 'disk', 'other.txt'), 'x')).toThrow(/EROFS|read-only/);
      } finally {
        const u = await cli(['umount', mnt]);
        expect(u.code, u.stdout).toBe(0);
      }
      expect(fs.existsSync(path.join(mnt, '.nasbackup'))).toBe(false);
    }
    nothingLeft();
  });
});
