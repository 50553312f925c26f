// -o backup refuses bad input before it changes anything: command-line checks run
// before the host check and the mount (no virsh call at all); checks that need the
// NAS or the domain (parents, an existing backup) run before backup-begin and leave
// the share exactly as it was.
import { execFileSync } from 'node:child_process';
import { mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { bindNas, leftovers, run } from '../helpers/cli.js';
import { snapshotTree } from '../helpers/tree.js';
import { removeTempDirs } from '../helpers/tmp.js';
import {
  BACKUP_PATH,
  backup,
  DATA_VOL,
  dataFile,
  expectClean,
  fullFlags,
  incrementalFlags,
  NEW_BITMAP,
  PARENT_BITMAP,
  PARENT_TS,
  ROOT_VOL,
  rootFile,
  scenario,
  TS,
  VM,
  type BackupFlags,
  type Scenario,
} from './scenario.js';

afterAll(removeTempDirs);

const MP = String.raw`\S+/csbackup\.[A-Za-z0-9]{5}`;

// Every refusal and its message is in test/cli/validate-backup.test.ts; these show, through
// bin/nasbackup, that the checks come before the host check, the mount and the lock.
describe.concurrent('command-line checks: a message, exit 1, no virsh call, nothing mounted', () => {
  const cases: Array<[string, BackupFlags, string]> = [
    [
      'full without --bitmap-new',
      { extra: ['-M', 'full'] },
      'full mode requires --bitmap-new (the bitmap to create for the next incremental)\n',
    ],
    [
      'incremental without --parent-paths',
      { extra: ['-M', 'incremental', '--bitmap-new', NEW_BITMAP, '--bitmap-parent', PARENT_BITMAP] },
      'incremental mode requires --bitmap-parent, --bitmap-new, and --parent-paths\n',
    ],
    ['an unknown mode', { extra: ['-M', 'differential', '--bitmap-new', NEW_BITMAP] }, 'Unknown mode: differential\n'],
    ['a bitmap name with XML in it', { extra: fullFlags("b'><x/>") }, 'Invalid --bitmap-new: "b\'><x/>"\n'],
    [
      'a parent path with ..',
      { extra: incrementalFlags([`${VM}/../../etc/root.${ROOT_VOL}.qcow2`]) },
      `--parent-paths must not contain '..': ${VM}/../../etc/root.${ROOT_VOL}.qcow2\n`,
    ],
    ['-p with ..', { path: `${VM}/../../etc` }, `-p must not contain '..': ${VM}/../../etc\n`],
    [
      '-p only the instance folder',
      { path: VM },
      `-p must name something at least 2 levels below the NAS mount root (e.g. <instance>/<timestamp>): ${VM}\n`,
    ],
  ];
  it.each(cases)('%s', async (_name, flags, stdout) => {
    const s = scenario('val-args');
    const snap = snapshotTree(s.sb.nas);
    const r = await backup(s, flags);
    expect(r).toMatchObject({ code: 1, stdout, stderr: '' });
    expect(s.fake.calls()).toEqual([]);
    expect(snapshotTree(s.sb.nas)).toEqual(snap);
    expectClean(s);
  });

  // With -d (the agent thought the VM stopped) the incremental arguments are not checked
  // up front (a stopped VM falls back to a full copy); everything else still is.
  const withDisks: Array<[string, string[], string]> = [
    ['an unknown mode', ['-M', 'differential', '--bitmap-new', NEW_BITMAP], 'Unknown mode: differential\n'],
    [
      'a bad --bitmap-parent name',
      ['-M', 'incremental', '--bitmap-new', NEW_BITMAP, '--bitmap-parent', '../x'],
      'Invalid --bitmap-parent: "../x"\n',
    ],
    [
      'a parent path with ..',
      incrementalFlags([`${VM}/../../etc/root.${ROOT_VOL}.qcow2`]),
      `--parent-paths must not contain '..': ${VM}/../../etc/root.${ROOT_VOL}.qcow2\n`,
    ],
  ];
  it.each(withDisks)('with -d, %s', async (_name, extra, stdout) => {
    const s = scenario('val-args-d', { state: 'shut off' });
    const snap = snapshotTree(s.sb.nas);
    const r = await backup(s, { disks: s.rootDisk, extra });
    expect(r).toMatchObject({ code: 1, stdout, stderr: '' });
    expect(s.fake.calls()).toEqual([]);
    expect(snapshotTree(s.sb.nas)).toEqual(snap);
    expectClean(s);
  });

  it('no -v', async () => {
    const s = scenario('val-v');
    const r = await run(s.sb, ['-o', 'backup', ...bindNas(s.sb), '-p', BACKUP_PATH, '-q', 'false', '-d', '']);
    expect(r).toMatchObject({ code: 1, stdout: 'backup requires -v <domain name>\n' });
    expect(s.fake.calls()).toEqual([]);
    expectClean(s);
  });
});

/** A parent full backup on the NAS (and the checkpoint libvirt knows), for incremental requests. */
const withParent = (tag: string, dataDisk = false): Scenario =>
  scenario(tag, {
    dataDisk,
    parentOnNas: true,
    domain: {
      checkpoints: [{ name: PARENT_BITMAP, creationTime: 1735689600 }],
      disks: dataDisk ? [{ bitmaps: [PARENT_BITMAP] }, { bitmaps: [PARENT_BITMAP] }] : [{ bitmaps: [PARENT_BITMAP] }],
    },
  });

describe.concurrent('checks that need the NAS or the domain: before backup-begin, the share untouched, no checkpoint change', () => {
  const cases: Array<[string, boolean, (s: Scenario) => void, () => string[], RegExp]> = [
    [
      'a parent for a volume the VM does not have (count)',
      false,
      () => {},
      () => [rootFile(PARENT_TS), dataFile(PARENT_TS)],
      new RegExp(`^Parent paths do not match the VM's disks: no disk with volume ${DATA_VOL} \\(disks: ${ROOT_VOL}\\)\n$`),
    ],
    [
      'a parent of another volume (identity)',
      false,
      () => {},
      () => [`${VM}/${PARENT_TS}/root.00000000-0000-4000-8000-000000000000.qcow2`],
      new RegExp(
        `^Parent paths do not match the VM's disks: no disk with volume 00000000-0000-4000-8000-000000000000 \\(disks: ${ROOT_VOL}\\)\n$`,
      ),
    ],
    [
      'two parents for one volume',
      false,
      () => {},
      () => [rootFile(PARENT_TS), `${VM}/2024.12.31.00.00.00/root.${ROOT_VOL}.qcow2`],
      new RegExp(`^Two parent paths for volume ${ROOT_VOL}\n$`),
    ],
    [
      'a parent list shorter than the disks, the missing one not beside the other',
      true,
      (s) => rmSync(join(s.sb.nas, dataFile(PARENT_TS))),
      () => [rootFile(PARENT_TS)],
      new RegExp(`^PARENT_PATHS list shorter than DISK_PATHS — missing parent for disk index 1 \\(volume ${DATA_VOL}\\)\n$`),
    ],
    [
      'a parent file missing on the NAS',
      false,
      (s) => writeFileSync(join(s.sb.nas, VM, PARENT_TS, 'note'), 'x'),
      () => [`${VM}/2024.12.31.00.00.00/root.${ROOT_VOL}.qcow2`],
      new RegExp(`^Parent backup file does not exist on NAS: ${MP}/${VM}/2024\\.12\\.31\\.00\\.00\\.00/root\\.${ROOT_VOL}\\.qcow2\n$`),
    ],
    [
      'a parent that is not a qcow2 image',
      false,
      (s) => {
        mkdirSync(join(s.sb.nas, VM, '2024.12.31.00.00.00'));
        writeFileSync(join(s.sb.nas, VM, '2024.12.31.00.00.00', `root.${ROOT_VOL}.qcow2`), 'not an image at all\n'.repeat(8));
      },
      () => [`${VM}/2024.12.31.00.00.00/root.${ROOT_VOL}.qcow2`],
      new RegExp(
        `^Parent backup file is not a usable qcow2 image: ${MP}/${VM}/2024\\.12\\.31\\.00\\.00\\.00/root\\.${ROOT_VOL}\\.qcow2\n.*not a qcow2 image\n$`,
      ),
    ],
    [
      'a parent whose own chain is broken (its backing is gone)',
      false,
      (s) => {
        const f = join(s.sb.nas, rootFile(PARENT_TS));
        rmSync(f);
        execFileSync('qemu-img', [
          'create',
          '-q',
          '-f',
          'qcow2',
          '-u',
          '-b',
          `../2024.12.30.00.00.00/root.${ROOT_VOL}.qcow2`,
          '-F',
          'qcow2',
          f,
          '16M',
        ]);
      },
      () => [rootFile(PARENT_TS)],
      new RegExp(
        `^Parent backup file does not read as a complete chain: ${MP}/${VM}/2025\\.01\\.01\\.00\\.00\\.00/root\\.${ROOT_VOL}\\.qcow2\n` +
          `backing file ${MP}/${VM}/2024\\.12\\.30\\.00\\.00\\.00/root\\.${ROOT_VOL}\\.qcow2 of \\S+ does not exist\n$`,
      ),
    ],
  ];
  it.each(cases)('%s', async (_name, dataDisk, prepare, parents, stdout) => {
    const s = withParent('val-parent', dataDisk);
    prepare(s);
    const snap = snapshotTree(s.sb.nas);
    const r = await backup(s, { extra: incrementalFlags(parents()) });
    expect(r.code).toBe(1);
    expect(r.stdout).toMatch(stdout);
    expect(snapshotTree(s.sb.nas)).toEqual(snap);
    expect(s.fake.names()).toEqual(['version', 'list', 'domblklist', 'qemu-monitor-command', 'checkpoint-list', 'domstate']);
    expect(s.fake.checkpointNames(VM)).toEqual([PARENT_BITMAP]);
    expectClean(s);
  });

  it('-d sent but the VM is running: an incremental without parents is refused once the state is known, before the mount', async () => {
    const s = scenario('val-d-running');
    const snap = snapshotTree(s.sb.nas);
    const r = await backup(s, {
      disks: s.rootDisk,
      extra: ['-M', 'incremental', '--bitmap-new', NEW_BITMAP, '--bitmap-parent', PARENT_BITMAP],
    });
    expect(r).toMatchObject({
      code: 1,
      stdout: 'incremental mode requires --bitmap-parent, --bitmap-new, and --parent-paths\n',
      stderr: '',
    });
    expect(s.fake.names()).toEqual(['version', 'list']);
    expect(snapshotTree(s.sb.nas)).toEqual(snap);
    expectClean(s);
  });

  it.each([
    [
      'the backup directory exists',
      TS,
      new RegExp(`^Backup directory already exists: ${MP}/${VM}/${TS.replace(/\./g, '\\.')}; refusing to overwrite it\n$`),
    ],
    [
      'an unfinished backup of an interrupted run exists',
      `${TS}.partial`,
      new RegExp(
        `^An unfinished backup from an interrupted run exists: ${MP}/${VM}/${TS.replace(/\./g, '\\.')}\\.partial; delete it first\n$`,
      ),
    ],
  ])('%s: refused, and what is there is left exactly as it is', async (_name, dir, stdout) => {
    const s = scenario('val-exists');
    mkdirSync(join(s.sb.nas, VM, dir), { recursive: true });
    writeFileSync(join(s.sb.nas, VM, dir, `root.${ROOT_VOL}.qcow2`), 'an earlier backup\n');
    const snap = snapshotTree(s.sb.nas);
    const r = await backup(s, { extra: fullFlags() });
    expect(r.code).toBe(1);
    expect(r.stdout).toMatch(stdout);
    expect(snapshotTree(s.sb.nas)).toEqual(snap);
    expect(s.fake.names()).toEqual(['version', 'list', 'domblklist', 'qemu-monitor-command']);
    expect(s.fake.checkpointNames(VM)).toEqual([]);
    expect(leftovers(s.sb)).toEqual({ dirs: [], mounts: [] });
  });
});
