// -o backup end to end on real libvirt + QEMU (TCG) with a guest agent, the NAS a
// loop-mounted ext4 image that bin/nasbackup mounts itself (`-t ext4 -s <img> -m loop`).
// After every backup the flattened chain must equal the live disk (VM paused).
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  agentCommand,
  checkpointNames,
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
const VM = `nbe2e-bk-${process.pid}`;
const ROOT_VOL = '0d1e2f3a-4b5c-4d6e-8f70-8192a3b4c5d6';
const DATA_VOL = 'c9e8d7f6-2a3b-4c5d-8e9f-0a1b2c3d4e02';

describe.sequential('-o backup on a real guest', () => {
  let sb: Sandbox;
  let img = '';
  let guest: Guest | undefined;
  let rootDisk = '';
  let dataDisk = '';
  let ts = 0;

  const nas = () => loopNas(img);
  const cli = (args: string[], env: NodeJS.ProcessEnv = {}): Promise<Outcome> => sb.cli(args, env);

  const nextPath = () => `${VM}/2026.01.01.00.00.${String(++ts).padStart(2, '0')}`;
  const rootFile = (p: string) => `${p}/root.${ROOT_VOL}.qcow2`;
  const dataFile = (p: string) => `${p}/datadisk.${DATA_VOL}.qcow2`;

  /** Look at the NAS between runs (never while bin/nasbackup has it mounted). */
  const withNas = <T>(fn: (root: string) => T): T => sb.withNas(img, fn);

  async function start(): Promise<void> {
    guest = await startGuest({ name: VM, disks: [rootDisk, dataDisk], dir: sb.dir });
  }

  /**
   * Pause the VM and compare each backup file (its whole chain) with the live disk.
   * After a freeze/thaw the guest's ext4 updates its superblock on vdb, so quiesced
   * runs compare the raw root disk only.
   */
  async function expectChainEqualsLive(backupDir: string, { rootOnly = false } = {}): Promise<void> {
    await virsh(['suspend', VM], { check: true });
    try {
      withNas((root) => {
        const pairs: Array<[string, string]> = [[rootFile(backupDir), rootDisk]];
        if (!rootOnly) pairs.push([dataFile(backupDir), dataDisk]);
        for (const [file, live] of pairs) {
          const out = execFileSync('qemu-img', ['compare', '-U', path.join(root, file), live], { encoding: 'utf8' });
          expect(out).toContain('Images are identical');
        }
      });
    } finally {
      await virsh(['resume', VM], { check: true });
    }
  }

  function backingOf(file: string): string | undefined {
    return withNas((root) => {
      const info = JSON.parse(execFileSync('qemu-img', ['info', '--output=json', '-U', path.join(root, file)], { encoding: 'utf8' }));
      return info['backing-filename'] as string | undefined;
    });
  }

  function nothingLeft(): void {
    expect(sb.leftovers()).toEqual({ tmp: [], mounted: false });
    expect(withNas((root) => fs.readdirSync(path.join(root, VM)).filter((n) => n.endsWith('.partial')))).toEqual([]);
  }

  async function expectRunning(): Promise<void> {
    expect((await virsh(['domstate', VM], { check: true })).stdout.trim()).toBe('running');
  }

  /** The running-VM stdout: domjobinfo block, the byte total last, BITMAP_CREATED after it (rebase-era). */
  function expectRunningFormat(out: Outcome, bitmap: string | null): bigint {
    expect(out.code).toBe(0);
    const lines = out.stdout.trimEnd().split('\n');
    if (bitmap) expect(lines.pop()).toBe(`BITMAP_CREATED=${bitmap}`);
    const size = lines.pop()!;
    expect(size).toMatch(/^\d+$/);
    // Optional marker and warning lines, then the completed job's statistics.
    expect(out.stdout).toMatch(/^([^\n]*\n)*?Job type:\s+Completed\s*\nOperation:\s+Backup/);
    return BigInt(size);
  }

  beforeAll(async () => {
    await ensureLab();
    sb = sandbox('nbe2e-bk-');
    rootDisk = path.join(sb.pool, ROOT_VOL);
    dataDisk = path.join(sb.pool, DATA_VOL);
    await createQcow2(rootDisk, 64 * MiB);
    await mkfsExt4(dataDisk, 32 * MiB);
    img = makeNasImage(path.join(sb.dir, 'nas.img'), '512M');
    await start();
  }, 600_000);

  afterAll(async () => {
    await guest?.destroy().catch(() => {});
    sb?.remove();
  });

  let full = '';
  let inc1 = '';

  it('full backup with a checkpoint: files, side files, stdout format, chain equals the live disk', async () => {
    await guestWrite(VM, { target: 'vda', pattern: 0x11, offset: 0, length: 2 * MiB });
    await guestWrite(VM, { target: 'vda', pattern: 0x44, offset: 40 * MiB, length: 256 * 1024 });
    full = nextPath();
    const out = await cli([
      '-o',
      'backup',
      '-v',
      VM,
      ...nas(),
      '-p',
      full,
      '-q',
      'false',
      '-d',
      '',
      '-M',
      'full',
      '--bitmap-new',
      'backup-1700000001',
    ]);
    expect(out.stdout).toMatch(/File total:/);
    const size = expectRunningFormat(out, 'backup-1700000001');
    const names = withNas((root) => fs.readdirSync(path.join(root, full)).sort());
    expect(names).toEqual([
      'datadisk.' + DATA_VOL + '.qcow2',
      'domain-config.xml',
      'domblklist.xml',
      'domiflist.xml',
      'dominfo.xml',
      'manifest.json',
      'root.' + ROOT_VOL + '.qcow2',
    ]);
    const du = withNas((root) => execFileSync('du', ['-sb', path.join(root, full)], { encoding: 'utf8' }).split('\t')[0]);
    expect(String(size)).toBe(du);
    expect(backingOf(rootFile(full))).toBeUndefined();
    expect(await checkpointNames(VM)).toEqual(['backup-1700000001']);
    await expectChainEqualsLive(full);
    nothingLeft();
  });

  it('incremental: only the changes, relinked onto the parent with a relative name, chain equals the live disk', async () => {
    await guestWrite(VM, { target: 'vda', pattern: 0x22, offset: 8 * MiB, length: 1 * MiB });
    await guestWrite(VM, { target: 'vdb', pattern: 0x33, offset: 24 * MiB, length: 64 * 1024 });
    inc1 = nextPath();
    const out = await cli([
      '-o',
      'backup',
      '-v',
      VM,
      ...nas(),
      '-p',
      inc1,
      '-q',
      'false',
      '-d',
      '',
      '-M',
      'incremental',
      '--bitmap-new',
      'backup-1700000002',
      '--bitmap-parent',
      'backup-1700000001',
      '--parent-paths',
      `${rootFile(full)},${dataFile(full)}`,
    ]);
    expectRunningFormat(out, 'backup-1700000002');
    expect(backingOf(rootFile(inc1))).toBe(`../${path.basename(full)}/root.${ROOT_VOL}.qcow2`);
    expect(backingOf(dataFile(inc1))).toBe(`../${path.basename(full)}/datadisk.${DATA_VOL}.qcow2`);
    // Thin: far smaller than the full copy.
    const sizes = withNas((root) => [fs.statSync(path.join(root, rootFile(inc1))).size, fs.statSync(path.join(root, rootFile(full))).size]);
    expect(sizes[0]!).toBeLessThan(sizes[1]!);
    await expectChainEqualsLive(inc1);
    // The parent checkpoint is dropped; the new one remains.
    expect(await checkpointNames(VM)).toEqual(['backup-1700000002']);
    // Both points in time carry manifests that the layers libvirt wrote match, extent by extent.
    const v = await cli(['chain', 'verify', ...nas(), '--vm', VM, '--backup', inc1]);
    expect(v.code).toBe(0);
    expect(v.stdout).toContain(`OK   ${rootFile(inc1)}\n`);
    expect(v.stdout).toContain(`OK   ${dataFile(full)}\n`);
    expect(v.stdout).not.toContain('no manifest');
    nothingLeft();
  });

  it('incremental from a G1 agent (--parent-path, root only): the data disk parent is found beside it', async () => {
    await guestWrite(VM, { target: 'vda', pattern: 0x55, offset: 16 * MiB, length: 512 * 1024 });
    await guestWrite(VM, { target: 'vdb', pattern: 0x66, offset: 26 * MiB, length: 64 * 1024 });
    const p = nextPath();
    const out = await cli([
      '-o',
      'backup',
      '-v',
      VM,
      ...nas(),
      '-p',
      p,
      '-q',
      'true',
      '-d',
      '',
      '-M',
      'incremental',
      '--bitmap-new',
      'backup-1700000003',
      '--bitmap-parent',
      'backup-1700000002',
      '--parent-path',
      rootFile(inc1),
    ]);
    expectRunningFormat(out, 'backup-1700000003');
    expect(backingOf(dataFile(p))).toBe(`../${path.basename(inc1)}/datadisk.${DATA_VOL}.qcow2`);
    expect(await agentCommand(VM, 'guest-fsfreeze-status')).toEqual({ return: 'thawed' });
    await expectChainEqualsLive(p, { rootOnly: true });
    inc1 = p;
  });

  it('after a restart of the transient domain: the checkpoint is redefined from the bitmaps, the incremental is correct', async () => {
    await guest!.destroy();
    await start();
    expect(await checkpointNames(VM)).toEqual([]);
    await guestWrite(VM, { target: 'vda', pattern: 0x77, offset: 30 * MiB, length: 1 * MiB });
    const p = nextPath();
    const out = await cli([
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
      'incremental',
      '--bitmap-new',
      'backup-1700000004',
      '--bitmap-parent',
      'backup-1700000003',
      '--parent-paths',
      `${rootFile(inc1)},${dataFile(inc1)}`,
    ]);
    expectRunningFormat(out, 'backup-1700000004');
    expect(out.stdout).not.toContain('INCREMENTAL_FALLBACK');
    expect(fs.readFileSync(sb.logFile, 'utf8')).toContain('Registered existing checkpoint backup-1700000003');
    expect(backingOf(rootFile(p))).toBe(`../${path.basename(inc1)}/root.${ROOT_VOL}.qcow2`);
    await expectChainEqualsLive(p);
    inc1 = p;
  });

  it('parent bitmap unknown: a full backup, reported as INCREMENTAL_FALLBACK, never an empty incremental', async () => {
    await guestWrite(VM, { target: 'vda', pattern: 0x12, offset: 50 * MiB, length: 64 * 1024 });
    const p = nextPath();
    const out = await cli([
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
      'incremental',
      '--bitmap-new',
      'backup-1700000005',
      '--bitmap-parent',
      'backup-1699999999',
      '--parent-paths',
      `${rootFile(inc1)},${dataFile(inc1)}`,
    ]);
    expectRunningFormat(out, 'backup-1700000005');
    expect(out.stdout.split('\n')[0]).toMatch(/^INCREMENTAL_FALLBACK=full \(parent bitmap backup-1699999999 missing on disk vda\)$/);
    expect(backingOf(rootFile(p))).toBeUndefined();
    await expectChainEqualsLive(p);
    inc1 = p;
  });

  it('a paused VM is backed up as a live domain and left paused', async () => {
    await virsh(['suspend', VM], { check: true });
    try {
      const p = nextPath();
      const out = await cli(['-o', 'backup', '-v', VM, ...nas(), '-p', p, '-q', 'true', '-d', '']);
      expectRunningFormat(out, null);
      expect(out.stdout).toMatch(/^Quiesce skipped: VM \S+ is paused/);
      expect((await virsh(['domstate', VM], { check: true })).stdout.trim()).toBe('paused');
    } finally {
      await virsh(['resume', VM]);
    }
  });

  it('a NAS too small: refused by the free-space check; without it the job fails, the run fails cleanly, VM running, nothing left behind', async () => {
    const before = await checkpointNames(VM);
    const argv = [
      '-o',
      'backup',
      '-v',
      VM,
      '-t',
      'tmpfs',
      '-s',
      'tmpfs',
      '-m',
      'size=1m',
      '-p',
      `${VM}/2026.02.02.00.00.00`,
      '-q',
      'false',
      '-d',
      '',
      '-M',
      'full',
      '--bitmap-new',
      'backup-1700000099',
    ];
    const refused = await cli(argv);
    expect(refused.code).toBe(1);
    expect(refused.stdout).toMatch(new RegExp(`^Not enough free space on the NAS for the backup of ${VM}: .*; nothing was written\n$`));
    const out = await cli(argv, { NASBACKUP_SPACE_CHECK: '0' });
    expect(out.code).toBe(1);
    // libvirt's job error names ENOSPC: one line (the job's statistics are in the log).
    expect(out.stdout).toMatch(
      new RegExp(
        `^The NAS ran out of space during the backup of ${VM} \\(No space left on device\\): backup stopped, partial files removed(, VM resumed)?\n$`,
      ),
    );
    await expectRunning();
    expect(await checkpointNames(VM)).toEqual(before);
    expect(sb.leftovers()).toEqual({ tmp: [], mounted: false });
  });

  it('stopped VM: an offline incremental per disk from the bitmap QEMU wrote out, one size per line, bitmaps seeded and retired; after a start the next incremental is correct', async () => {
    await guest!.destroy();
    // A disabled bitmap under the new name already in the root disk: it must not be trusted as it is.
    execFileSync('qemu-img', ['bitmap', '--add', rootDisk, 'backup-1700000006']);
    execFileSync('qemu-img', ['bitmap', '--disable', rootDisk, 'backup-1700000006']);
    const p = nextPath();
    const out = await cli([
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
      `${rootDisk},${dataDisk}`,
      '-M',
      'incremental',
      '--bitmap-new',
      'backup-1700000006',
      '--bitmap-parent',
      'backup-1700000005',
      '--parent-paths',
      `${rootFile(inc1)},${dataFile(inc1)}`,
    ]);
    expect(out.code).toBe(0);
    const lines = out.stdout.trimEnd().split('\n');
    // The disks hold the parent bitmap QEMU wrote out when the guest stopped: an offline
    // incremental (issue 18), no fallback marker.
    expect(lines[0]).toBe('BITMAP_CREATED=backup-1700000006');
    // In the original's order: `ls` of the folder in the C locale, datadisk before root.
    const sizes = withNas((root) => [dataFile(p), rootFile(p)].map((f) => String(fs.statSync(path.join(root, f)).size)));
    expect(lines.slice(1)).toEqual(sizes);
    for (const f of [rootFile(p), dataFile(p)]) {
      const info = withNas((root) =>
        JSON.parse(execFileSync('qemu-img', ['info', '--output=json', path.join(root, f)], { encoding: 'utf8' })),
      );
      expect(info['backing-filename']).toMatch(new RegExp(`^\\.\\./${inc1.split('/')[1]}/`));
    }
    const bitmaps = JSON.parse(execFileSync('qemu-img', ['info', '--output=json', rootDisk], { encoding: 'utf8' }))['format-specific'].data
      .bitmaps;
    expect(bitmaps.find((b: { name: string }) => b.name === 'backup-1700000006')?.flags).toEqual(['auto']);
    // The parent bitmap is retired once the incremental based on it is taken.
    expect(bitmaps.find((b: { name: string }) => b.name === 'backup-1700000005')).toBeUndefined();
    for (const f of [rootFile(p), dataFile(p)]) {
      const live = f.includes('root.') ? rootDisk : dataDisk;
      withNas((root) =>
        expect(execFileSync('qemu-img', ['compare', path.join(root, f), live], { encoding: 'utf8' })).toContain('identical'),
      );
    }

    await start();
    await guestWrite(VM, { target: 'vda', pattern: 0x99, offset: 60 * MiB, length: 128 * 1024 });
    const q = nextPath();
    const inc = await cli([
      '-o',
      'backup',
      '-v',
      VM,
      ...nas(),
      '-p',
      q,
      '-q',
      'false',
      '-d',
      '',
      '-M',
      'incremental',
      '--bitmap-new',
      'backup-1700000007',
      '--bitmap-parent',
      'backup-1700000006',
      '--parent-paths',
      `${rootFile(p)},${dataFile(p)}`,
    ]);
    expectRunningFormat(inc, 'backup-1700000007');
    expect(inc.stdout).not.toContain('INCREMENTAL_FALLBACK');
    await expectChainEqualsLive(q);
    nothingLeft();
  });

  /** Restore a backup as the agent would (qemu-img convert of the whole chain), then compare with the live disk (VM paused). */
  async function expectRestoreEqualsLive(backupDir: string): Promise<void> {
    await virsh(['suspend', VM], { check: true });
    try {
      for (const [file, live] of [
        [rootFile(backupDir), rootDisk],
        [dataFile(backupDir), dataDisk],
      ] as const) {
        const restored = path.join(sb.dir, 'restored.qcow2');
        withNas((root) => execFileSync('qemu-img', ['convert', '-U', '-O', 'qcow2', path.join(root, file), restored]));
        try {
          expect(execFileSync('qemu-img', ['compare', '-U', restored, live], { encoding: 'utf8' })).toContain('Images are identical');
        } finally {
          fs.rmSync(restored, { force: true });
        }
      }
    } finally {
      await virsh(['resume', VM], { check: true });
    }
  }

  /** QMP on the running guest: the format node of the disk whose image is `file`, and its bitmaps. */
  async function blockNode(file: string): Promise<{ node: string; bitmaps: Array<{ name: string; recording: boolean }> }> {
    const r = await virsh(['qemu-monitor-command', VM, '{"execute":"query-block"}'], { check: true });
    const entry = (
      JSON.parse(r.stdout).return as Array<{
        inserted?: { file: string; 'node-name': string; 'dirty-bitmaps'?: Array<{ name: string; recording: boolean }> };
      }>
    ).find((e) => e.inserted?.file === file);
    if (!entry?.inserted) throw new Error(`query-block shows no disk with image ${file}`);
    return { node: entry.inserted['node-name'], bitmaps: entry.inserted['dirty-bitmaps'] ?? [] };
  }

  it('a parent bitmap disabled under the running guest: a full with INCREMENTAL_FALLBACK, no write missing; the next incremental is correct', async () => {
    const base = nextPath();
    expectRunningFormat(
      await cli([
        '-o',
        'backup',
        '-v',
        VM,
        ...nas(),
        '-p',
        base,
        '-q',
        'false',
        '-d',
        '',
        '-M',
        'full',
        '--bitmap-new',
        'backup-1700000010',
      ]),
      'backup-1700000010',
    );
    const { node } = await blockNode(dataDisk);
    await virsh(
      [
        'qemu-monitor-command',
        VM,
        JSON.stringify({ execute: 'block-dirty-bitmap-disable', arguments: { node, name: 'backup-1700000010' } }),
      ],
      { check: true },
    );
    expect((await blockNode(dataDisk)).bitmaps.find((b) => b.name === 'backup-1700000010')?.recording).toBe(false);
    // Written after the bitmap stopped recording: an incremental from it would miss the vdb write.
    await guestWrite(VM, { target: 'vda', pattern: 0xa1, offset: 12 * MiB, length: 256 * 1024 });
    await guestWrite(VM, { target: 'vdb', pattern: 0xa2, offset: 20 * MiB, length: 128 * 1024 });

    const p = nextPath();
    const out = await cli([
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
      'incremental',
      '--bitmap-new',
      'backup-1700000011',
      '--bitmap-parent',
      'backup-1700000010',
      '--parent-paths',
      `${rootFile(base)},${dataFile(base)}`,
    ]);
    expectRunningFormat(out, 'backup-1700000011');
    expect(out.stdout.split('\n')[0]).toBe(
      'INCREMENTAL_FALLBACK=full (parent bitmap backup-1700000010 on disk vdb is not usable (disabled))',
    );
    expect(backingOf(rootFile(p))).toBeUndefined();
    expect(backingOf(dataFile(p))).toBeUndefined();
    await expectRestoreEqualsLive(p);
    // The untrusted checkpoint is gone; the new one records on every disk.
    const cps = await checkpointNames(VM);
    expect(cps).toContain('backup-1700000011');
    expect(cps).not.toContain('backup-1700000010');
    for (const disk of [rootDisk, dataDisk]) {
      const bitmaps = (await blockNode(disk)).bitmaps;
      expect(bitmaps.find((b) => b.name === 'backup-1700000011')?.recording).toBe(true);
      expect(bitmaps.map((b) => b.name)).not.toContain('backup-1700000010');
    }

    await guestWrite(VM, { target: 'vdb', pattern: 0xa3, offset: 22 * MiB, length: 64 * 1024 });
    const q = nextPath();
    const inc = await cli([
      '-o',
      'backup',
      '-v',
      VM,
      ...nas(),
      '-p',
      q,
      '-q',
      'false',
      '-d',
      '',
      '-M',
      'incremental',
      '--bitmap-new',
      'backup-1700000012',
      '--bitmap-parent',
      'backup-1700000011',
      '--parent-paths',
      `${rootFile(p)},${dataFile(p)}`,
    ]);
    expectRunningFormat(inc, 'backup-1700000012');
    expect(inc.stdout).not.toContain('INCREMENTAL_FALLBACK');
    expect(backingOf(dataFile(q))).toBe(`../${path.basename(p)}/datadisk.${DATA_VOL}.qcow2`);
    await expectRestoreEqualsLive(q);
    nothingLeft();
  });
});
