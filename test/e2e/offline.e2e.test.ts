// The offline incremental proven on a real guest (libvirt + QEMU, TCG): a running full
// backup, known data written, the VM shut down (QEMU stores its dirty bitmaps into the
// qcow2 disks), the offline incremental of the stopped VM, the VM started again, more data,
// a running incremental on top. Each point restored (`qemu-img convert` of its chain) equals
// the guest disks captured at that moment. One guest boot besides the first.
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
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
} from './lab.js';

const MiB = 1024 * 1024;
const VM = `nbe2e-off-${process.pid}`;
const ROOT_VOL = '3a4b5c6d-7e8f-4a0b-9c1d-2e3f4a5b6c7d';
const DATA_VOL = '8d9e0f1a-2b3c-4d5e-8f6a-7b8c9d0e1f2a';
const BITMAPS = ['backup-1700000101', 'backup-1700000102', 'backup-1700000103'];

describe.sequential('offline incremental of a real guest between running backups', () => {
  let sb: Sandbox;
  let img = '';
  let captures = '';
  let guest: Guest | undefined;
  let rootDisk = '';
  let dataDisk = '';

  const points = { full: `${VM}/2026.02.01.00.00.01`, offline: `${VM}/2026.02.01.00.00.02`, running: `${VM}/2026.02.01.00.00.03` };
  const rootFile = (p: string) => `${p}/root.${ROOT_VOL}.qcow2`;
  const dataFile = (p: string) => `${p}/datadisk.${DATA_VOL}.qcow2`;

  const cli = (args: string[]): Promise<Outcome> => sb.cli(args);

  const backupArgs = (p: string, disks: string, tail: string[]): string[] => [
    '-o',
    'backup',
    '-v',
    VM,
    ...loopNas(img),
    '-p',
    p,
    '-q',
    'false',
    '-d',
    disks,
    ...tail,
  ];

  const withNas = <T>(fn: (root: string) => T): T => sb.withNas(img, fn);

  /** The guest disks as they are now, as raw files (the VM paused or stopped meanwhile). */
  function capture(name: string): void {
    for (const [disk, tag] of [
      [rootDisk, 'root'],
      [dataDisk, 'data'],
    ] as const)
      execFileSync('qemu-img', ['convert', '-U', '-O', 'raw', disk, path.join(captures, `${name}.${tag}.raw`)]);
  }

  async function capturePaused(name: string): Promise<void> {
    await virsh(['suspend', VM], { check: true });
    try {
      capture(name);
    } finally {
      await virsh(['resume', VM], { check: true });
    }
  }

  /** Restore each disk of backup point `p` (convert of its whole chain) and compare with the capture. */
  function expectRestoresTo(p: string, name: string): void {
    withNas((root) => {
      for (const [file, tag] of [
        [rootFile(p), 'root'],
        [dataFile(p), 'data'],
      ] as const) {
        const restored = path.join(captures, `${name}.${tag}.restored.raw`);
        execFileSync('qemu-img', ['convert', '-O', 'raw', path.join(root, file), restored]);
        const r = execFileSync('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', restored, path.join(captures, `${name}.${tag}.raw`)], {
          encoding: 'utf8',
        });
        expect(r).toContain('Images are identical');
        fs.rmSync(restored);
      }
    });
  }

  const info = (root: string, file: string) =>
    JSON.parse(execFileSync('qemu-img', ['info', '--output=json', '-U', path.join(root, file)], { encoding: 'utf8' })) as Record<
      string,
      unknown
    >;

  beforeAll(async () => {
    await ensureLab();
    sb = sandbox('nbe2e-off-');
    captures = path.join(sb.dir, 'captures');
    fs.mkdirSync(captures);
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

  it('1. running full backup with a checkpoint', async () => {
    await guestWrite(VM, { target: 'vda', pattern: 0x11, offset: 0, length: 2 * MiB });
    await guestWrite(VM, { target: 'vda', pattern: 0x12, offset: 40 * MiB, length: 256 * 1024 });
    const out = await cli(backupArgs(points.full, '', ['-M', 'full', '--bitmap-new', BITMAPS[0]!]));
    expect(out.code).toBe(0);
    await capturePaused('full');
    expectRestoresTo(points.full, 'full');
  });

  it('2. known data, shut down, offline incremental: only the dirty clusters, no fallback, restores to the disks', async () => {
    await guestWrite(VM, { target: 'vda', pattern: 0x21, offset: 8 * MiB, length: 1 * MiB });
    await guestWrite(VM, { target: 'vda', pattern: 0x22, offset: 50 * MiB + 4096, length: 8192 });
    await guestWrite(VM, { target: 'vdb', pattern: 0x23, offset: 24 * MiB, length: 64 * 1024 });
    // The transient domain goes away; QEMU writes its persistent bitmaps into the qcow2 files.
    await guest!.destroy();
    guest = undefined;
    capture('offline');
    const out = await cli(
      backupArgs(points.offline, `${rootDisk},${dataDisk}`, [
        '-M',
        'incremental',
        '--bitmap-new',
        BITMAPS[1]!,
        '--bitmap-parent',
        BITMAPS[0]!,
        '--parent-paths',
        `${rootFile(points.full)},${dataFile(points.full)}`,
      ]),
    );
    expect(out.code).toBe(0);
    // Stopped-VM format (rebase-era profile): BITMAP_CREATED, then one size per file; no fallback marker.
    expect(out.stdout).toMatch(new RegExp(`^BITMAP_CREATED=${BITMAPS[1]}\\n\\d+\\n\\d+\\n$`));
    const log = fs.readFileSync(sb.logFile, 'utf8');
    expect(log).not.toContain('not possible');
    expect(log).toContain(`Offline incremental (from ${BITMAPS[0]}) of stopped VM ${VM}`);
    withNas((root) => {
      expect(info(root, rootFile(points.offline))['backing-filename']).toBe(`../${path.basename(points.full)}/root.${ROOT_VOL}.qcow2`);
      // Thin: about the 1 MiB + 64 KiB written, nowhere near the 2 MiB+ of the full.
      expect(fs.statSync(path.join(root, rootFile(points.offline))).size).toBeLessThan(2 * MiB);
    });
    expectRestoresTo(points.offline, 'offline');
    // The parent bitmap is retired, the new one records.
    const bitmaps = JSON.parse(execFileSync('qemu-img', ['info', '--output=json', rootDisk], { encoding: 'utf8' })) as {
      'format-specific': { data: { bitmaps?: Array<{ name: string; flags: string[] }> } };
    };
    expect(bitmaps['format-specific'].data.bitmaps).toEqual([{ name: BITMAPS[1], flags: ['auto'], granularity: 65536 }]);
  });

  it('3. started again, more data, running incremental on the offline one: restores to the disks', async () => {
    guest = await startGuest({ name: VM, disks: [rootDisk, dataDisk], dir: sb.dir });
    await guestWrite(VM, { target: 'vda', pattern: 0x31, offset: 30 * MiB, length: 1 * MiB });
    await guestWrite(VM, { target: 'vdb', pattern: 0x32, offset: 20 * MiB, length: 128 * 1024 });
    const out = await cli(
      backupArgs(points.running, '', [
        '-M',
        'incremental',
        '--bitmap-new',
        BITMAPS[2]!,
        '--bitmap-parent',
        BITMAPS[1]!,
        '--parent-paths',
        `${rootFile(points.offline)},${dataFile(points.offline)}`,
      ]),
    );
    expect(out.code).toBe(0);
    expect(out.stdout).not.toContain('INCREMENTAL_FALLBACK');
    await capturePaused('running');
    withNas((root) =>
      expect(info(root, rootFile(points.running))['backing-filename']).toBe(`../${path.basename(points.offline)}/root.${ROOT_VOL}.qcow2`),
    );
    expectRestoresTo(points.running, 'running');
    // The earlier points still restore to their moments.
    expectRestoresTo(points.offline, 'offline');
    expectRestoresTo(points.full, 'full');
  });
});
