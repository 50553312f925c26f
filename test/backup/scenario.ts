// A backup scenario: a sandbox (bind-mounted NAS folder, own TMPDIR, shims first on
// PATH), real qcow2 live disks in a per-test "primary" folder, and the fake virsh
// answering for the VM. Plus the checks every backup test makes.
import { execFileSync } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, readdirSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { expect } from 'vitest';
import { bindNas, leftovers, makeSandbox, run, start, type RunOutcome, type Sandbox } from '../helpers/cli.js';
import { tempDir } from '../helpers/tmp.js';
import { makeImage, type Write } from '../helpers/qemu.js';
import { snapshotTree, type TreeEntry } from '../helpers/tree.js';
import { BYSTANDER, installFakeVirsh, type FakeDisk, type FakeDomain, type FakeState, type FakeVirsh } from '../fakes/virsh-state.js';

export const VM = 'i-2-10-VM';
export const POOL = '7f3c9a12-4b5d-3e6f-a1b2-c3d4e5f60718';
export const ROOT_VOL = 'b3f4c2a0-6d1e-4f7a-9c2b-1e5d8a7f3c01';
export const DATA_VOL = 'c9e8d7f6-2a3b-4c5d-8e9f-0a1b2c3d4e02';
export const TS = '2025.01.04.00.00.00';
export const PARENT_TS = '2025.01.01.00.00.00';
export const BACKUP_PATH = `${VM}/${TS}`;
export const NEW_BITMAP = 'backup-1736035200';
export const PARENT_BITMAP = 'backup-1735689600';
export const SIDE_FILES = ['domain-config.xml', 'domblklist.xml', 'domiflist.xml', 'dominfo.xml'];

export const MiB = 1024 * 1024;
export const ROOT_SIZE = 16 * MiB;
export const DATA_SIZE = 8 * MiB;
const ROOT_WRITES: Write[] = [
  { pattern: 0x11, offset: 0, length: MiB },
  { pattern: 0x44, offset: 4 * MiB, length: 256 * 1024 },
];
const DATA_WRITES: Write[] = [{ pattern: 0x22, offset: 0, length: 512 * 1024 }];
/** What the guest wrote after the parent backup (in the live disk; what an incremental copies). */
export const ROOT_DIRTY: Write[] = [{ pattern: 0x55, offset: 2 * MiB, length: 128 * 1024 }];
export const DATA_DIRTY: Write[] = [{ pattern: 0x66, offset: 6 * MiB, length: 64 * 1024 }];

export const rootFile = (ts = TS): string => `${VM}/${ts}/root.${ROOT_VOL}.qcow2`;
export const dataFile = (ts = TS): string => `${VM}/${ts}/datadisk.${DATA_VOL}.qcow2`;

/** Fast job polling: the fake's jobs end at once, the tests must not wait for real intervals. */
export const FAST_POLL: NodeJS.ProcessEnv = { NASBACKUP_JOB_POLL_INITIAL: '0.02', NASBACKUP_JOB_POLL_MAX: '0.2' };

export interface ScenarioOptions {
  /** A data disk besides the root disk. */
  dataDisk?: boolean;
  /** An empty cdrom drive (libvirt lists it; it is never backed up). */
  cdrom?: boolean;
  /** Domain state; 'shut off' means not in `virsh list`. Default running. */
  state?: string;
  /** Leave the VM out of libvirt entirely (not even defined). */
  undefinedVm?: boolean;
  /**
   * Seed a parent full backup on the NAS (<vm>/PARENT_TS) from the live disks, then
   * write the dirty ranges into the live disks (the fake's incremental copies them).
   */
  parentOnNas?: boolean;
  /** Extra domain fields (checkpoints, agent, job, …); disks are merged by index. */
  domain?: Partial<Omit<FakeDomain, 'disks'>> & { disks?: Array<Partial<FakeDisk>> };
  fail?: FakeState['fail'];
  queryBlock?: FakeState['queryBlock'];
}

export interface Scenario {
  sb: Sandbox;
  fake: FakeVirsh;
  primary: string;
  rootDisk: string;
  dataDisk: string | null;
  /** Absolute path of the new backup on the NAS folder. */
  final: string;
}

/**
 * The disk images every scenario starts from, made once per test file with qemu-img
 * and qemu-io and then copied (a copy of a qcow2 file is the same image): `base` is a
 * disk as the parent backup saw it, `dirty` the same disk after the guest wrote more.
 */
let templates: { dir: string; root: { base: string; dirty: string }; data: { base: string; dirty: string } } | null = null;
function template(): NonNullable<typeof templates> {
  if (templates && existsSync(templates.dir)) return templates;
  const dir = tempDir('disk-templates');
  const t = {
    dir,
    root: { base: join(dir, 'root-base.qcow2'), dirty: join(dir, 'root-dirty.qcow2') },
    data: { base: join(dir, 'data-base.qcow2'), dirty: join(dir, 'data-dirty.qcow2') },
  };
  makeImage(t.root.base, { size: ROOT_SIZE, writes: ROOT_WRITES });
  makeImage(t.data.base, { size: DATA_SIZE, writes: DATA_WRITES });
  copyFileSync(t.root.base, t.root.dirty);
  copyFileSync(t.data.base, t.data.dirty);
  applyWrites(t.root.dirty, ROOT_DIRTY);
  applyWrites(t.data.dirty, DATA_DIRTY);
  return (templates = t);
}

export function scenario(tag: string, o: ScenarioOptions = {}): Scenario {
  const sb = makeSandbox(tag);
  const primary = join(sb.root, 'primary', POOL);
  const rootDisk = join(primary, ROOT_VOL);
  const dataDisk = o.dataDisk ? join(primary, DATA_VOL) : null;
  const t = template();
  mkdirSync(primary, { recursive: true });
  copyFileSync(o.parentOnNas ? t.root.dirty : t.root.base, rootDisk);
  if (dataDisk) copyFileSync(o.parentOnNas ? t.data.dirty : t.data.base, dataDisk);

  const disks: FakeDisk[] = [{ type: 'file', device: 'disk', target: 'vda', source: rootDisk, bitmaps: [] }];
  if (dataDisk) disks.push({ type: 'file', device: 'disk', target: 'vdb', source: dataDisk, bitmaps: [] });
  if (o.cdrom) disks.push({ type: 'file', device: 'cdrom', target: 'hdc', source: '-' });

  if (o.parentOnNas) {
    mkdirSync(join(sb.nas, VM, PARENT_TS), { recursive: true });
    copyFileSync(t.root.base, join(sb.nas, rootFile(PARENT_TS)));
    if (dataDisk) copyFileSync(t.data.base, join(sb.nas, dataFile(PARENT_TS)));
    for (const f of SIDE_FILES) writeFileSync(join(sb.nas, VM, PARENT_TS, f), `${f} of the parent backup\n`);
    disks[0]!.dirty = ROOT_DIRTY;
    if (dataDisk) disks[1]!.dirty = DATA_DIRTY;
  }
  const { disks: diskOverrides, ...rest } = o.domain ?? {};
  for (const [i, d] of (diskOverrides ?? []).entries()) if (disks[i]) disks[i] = { ...disks[i], ...d };

  const domain: FakeDomain = {
    name: VM,
    id: 7,
    uuid: '4c0c1f2e-8d7a-4b1e-9f3a-2d6e5b7c8a90',
    state: o.state ?? 'running',
    vcpus: 1,
    memoryKiB: 1048576,
    description: 'Ubuntu 22.04 LTS',
    interfaces: [{ name: 'vnet0', type: 'bridge', source: 'cloudbr0', model: 'virtio', mac: '02:00:4c:5e:00:01' }],
    disks,
    checkpoints: [],
    ...rest,
  };
  const fake = installFakeVirsh(sb, {
    domains: o.undefinedVm ? [BYSTANDER] : [BYSTANDER, domain],
    ...(o.fail ? { fail: o.fail } : {}),
    ...(o.queryBlock ? { queryBlock: o.queryBlock } : {}),
  });
  return { sb, fake, primary, rootDisk, dataDisk, final: join(sb.nas, BACKUP_PATH) };
}

function applyWrites(path: string, writes: Write[]): void {
  for (const w of writes) {
    execFileSync('qemu-io', ['-f', 'qcow2', '-c', `write -P 0x${w.pattern.toString(16)} ${w.offset} ${w.length}`, path], {
      stdio: 'ignore',
    });
  }
}

export interface BackupFlags {
  path?: string;
  quiesce?: boolean;
  /** -d value (comma-joined); "" for a running VM. */
  disks?: string;
  extra?: string[];
}

export function backupArgv(s: Scenario, f: BackupFlags = {}): string[] {
  return [
    '-o',
    'backup',
    '-v',
    VM,
    ...bindNas(s.sb),
    '-p',
    f.path ?? BACKUP_PATH,
    '-q',
    f.quiesce ? 'true' : 'false',
    '-d',
    f.disks ?? '',
    ...(f.extra ?? []),
  ];
}

export const fullFlags = (bitmap = NEW_BITMAP): string[] => ['-M', 'full', '--bitmap-new', bitmap];
export const incrementalFlags = (parents: string[], bitmap = NEW_BITMAP, parent = PARENT_BITMAP): string[] => [
  '-M',
  'incremental',
  '--bitmap-new',
  bitmap,
  '--bitmap-parent',
  parent,
  '--parent-paths',
  parents.join(','),
];

export function backup(s: Scenario, f: BackupFlags = {}, env: NodeJS.ProcessEnv = {}): Promise<RunOutcome> {
  return run(s.sb, backupArgv(s, f), { ...FAST_POLL, ...env });
}

export function startBackup(s: Scenario, f: BackupFlags = {}, env: NodeJS.ProcessEnv = {}): ReturnType<typeof start> {
  return start(s.sb, backupArgv(s, f), { ...FAST_POLL, ...env });
}

/** The domjobinfo --completed block of a finished job, as virsh prints it (value column padded). */
export function completedBlock(totalBytes: number | null, elapsedMs = 133): string {
  let out = 'Job type:         Completed   \nOperation:        Backup      \n' + `Time elapsed:     ${String(elapsedMs).padEnd(12)} ms\n`;
  if (totalBytes !== null) {
    const unit = totalBytes >= MiB ? 'MiB' : 'KiB';
    const size = `${(totalBytes / (unit === 'MiB' ? MiB : 1024)).toFixed(3)} ${unit}`;
    out += `File processed:   ${size}\nFile remaining:   0.000 B\nFile total:       ${size}\n`;
  }
  return out + '\n';
}

/** `du -sb <dir> | cut -f1`. */
export function duSb(dir: string): string {
  return execFileSync('du', ['-sb', dir], { encoding: 'utf8' }).split('\t')[0]!;
}

/** Every path below the NAS folder (relative), for "nothing partial" checks. */
export function nasPaths(sb: Sandbox): string[] {
  const out: string[] = [];
  const walk = (rel: string): void => {
    const abs = rel ? join(sb.nas, rel) : sb.nas;
    for (const name of readdirSync(abs).sort()) {
      const r = rel ? `${rel}/${name}` : name;
      out.push(r);
      if (statSync(join(sb.nas, r)).isDirectory()) walk(r);
    }
  };
  walk('');
  return out;
}

/** Nothing mounted, no mount point left, no unfinished backup folder anywhere on the NAS. */
export function expectClean(s: Scenario): void {
  expect(leftovers(s.sb)).toEqual({ dirs: [], mounts: [] });
  expect(nasPaths(s.sb).filter((p) => p.includes('.partial'))).toEqual([]);
  expect(existsSync(`${s.final}.partial`)).toBe(false);
}

export function qemuInfo(path: string): Record<string, unknown> {
  return JSON.parse(execFileSync('qemu-img', ['info', '--output=json', '-U', path], { encoding: 'utf8' })) as Record<string, unknown>;
}

export function bitmapsIn(path: string): string[] {
  const fs = (qemuInfo(path)['format-specific'] as { data?: { bitmaps?: Array<{ name: string }> } } | undefined)?.data;
  return (fs?.bitmaps ?? []).map((b) => b.name);
}

/** The calls the program made, as "sub-command arg…" strings without the -c URI (easy to read in a diff). */
export function callLines(s: Scenario): string[] {
  return s.fake.commands().map((c) => c.join(' '));
}

/** An older backup of the VM and another VM's backup: every run must leave them exactly as they are. */
export function seedOtherBackups(sb: Sandbox): void {
  for (const dir of [`${VM}/2024.12.31.00.00.00`, 'i-3-12-VM/2025.01.03.00.00.00']) {
    mkdirSync(join(sb.nas, dir), { recursive: true });
    writeFileSync(join(sb.nas, dir, `root.${ROOT_VOL}.qcow2`), 'an older backup\n', { mode: 0o600 });
    writeFileSync(join(sb.nas, dir, 'dominfo.xml'), 'Id: 7\n');
  }
}

/** The NAS tree without the new backup (and its work folder): must equal the tree before the run. */
export function othersOnNas(sb: Sandbox, path = BACKUP_PATH): TreeEntry[] {
  return snapshotTree(sb.nas).filter((e) => e.path !== path && !e.path.startsWith(`${path}/`) && !e.path.startsWith(`${path}.partial`));
}

/** The calls with the mount point replaced by <MP>, as "sub-command args…" lines. */
export function normalizedCalls(s: Scenario): string[] {
  const mp = new RegExp(`${s.sb.tmp.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}/csbackup\\.[A-Za-z0-9]{5}`, 'g');
  return callLines(s).map((l) => l.replace(mp, '<MP>'));
}

export function compareImages(a: string, b: string): string {
  return execFileSync('qemu-img', ['compare', '-U', a, b], { encoding: 'utf8' }).trim();
}

export const modeOf = (p: string): string => (statSync(p).mode & 0o7777).toString(8).padStart(4, '0');

/**
 * Turn the scenario's root disk into a raw file (same content): its copy then runs through an
 * external `qemu-img convert` (a qcow2 disk is copied in-process), for tests about that child.
 */
export function rootDiskAsRaw(s: Scenario): void {
  execFileSync('qemu-img', ['convert', '-O', 'raw', s.rootDisk, `${s.rootDisk}.raw`]);
  execFileSync('mv', [`${s.rootDisk}.raw`, s.rootDisk]);
}
