// -o backup argument checks, in process: every refusal and its exact message, and
// what an accepted command line becomes. (test/backup/validation.test.ts runs a few
// of these through bin/nasbackup to show they happen before any host call or mount.)
import { describe, expect, it } from 'vitest';
import { checkIncrementalArgs } from '../../lib/ops/backup/index.js';
import { validateBackupArgs, type RawBackupArgs } from '../../lib/cli/validate.js';
import type { NasbackupError } from '../../lib/errors.js';

const NAS = { type: 'nfs', address: '10.10.0.5:/export/backup', options: '' };
const VM = 'i-2-10-VM';
const P = `${VM}/2025.01.04.00.00.00`;
const PARENT = `${VM}/2025.01.01.00.00.00/root.b3f4c2a0-6d1e-4f7a-9c2b-1e5d8a7f3c01.qcow2`;
const base: RawBackupArgs = { vm: VM, path: P, quiesce: 'false', diskpaths: '' };
const inc = { mode: 'incremental', bitmapNew: 'backup-1736035200', bitmapParent: 'backup-1735689600', parentPaths: PARENT };

function refusal(a: RawBackupArgs): string {
  try {
    validateBackupArgs(a, NAS, 'rebase-era');
  } catch (e) {
    return `${(e as NasbackupError).code}: ${(e as NasbackupError).message}`;
  }
  return 'accepted';
}

describe('validateBackupArgs refuses', () => {
  it.each<[string, RawBackupArgs, string]>([
    ['no -v', { ...base, vm: undefined }, 'MISSING_ARGUMENT: backup requires -v <domain name>'],
    ['an empty -v', { ...base, vm: '' }, 'MISSING_ARGUMENT: backup requires -v <domain name>'],
    ['no -p', { ...base, path: undefined }, 'MISSING_ARGUMENT: backup requires -p <backup path>'],
    ['-p empty', { ...base, path: '' }, 'PATH_EMPTY: -p must not be empty'],
    ['-p the mount root', { ...base, path: './' }, 'PATH_EMPTY: -p names the NAS mount root: ./'],
    [
      '-p absolute',
      { ...base, path: '/var/backups/x' },
      'PATH_ABSOLUTE: -p must be relative to the NAS mount, got absolute path: /var/backups/x',
    ],
    ['-p with ..', { ...base, path: `${VM}/../../etc` }, `PATH_TRAVERSAL: -p must not contain '..': ${VM}/../../etc`],
    [
      '-p one level',
      { ...base, path: VM },
      `PATH_TOO_SHALLOW: -p must name something at least 2 levels below the NAS mount root (e.g. <instance>/<timestamp>): ${VM}`,
    ],
    ['an unknown mode', { ...base, mode: 'differential' }, 'INVALID_ARGUMENT: Unknown mode: differential'],
    [
      'full without --bitmap-new',
      { ...base, mode: 'full' },
      'MISSING_ARGUMENT: full mode requires --bitmap-new (the bitmap to create for the next incremental)',
    ],
    [
      'incremental without --parent-paths',
      { ...base, ...inc, parentPaths: undefined },
      'MISSING_ARGUMENT: incremental mode requires --bitmap-parent, --bitmap-new, and --parent-paths',
    ],
    [
      'incremental with an empty --parent-paths',
      { ...base, ...inc, parentPaths: ',' },
      'MISSING_ARGUMENT: incremental mode requires --bitmap-parent, --bitmap-new, and --parent-paths',
    ],
    [
      'incremental without --bitmap-parent',
      { ...base, ...inc, bitmapParent: undefined },
      'MISSING_ARGUMENT: incremental mode requires --bitmap-parent, --bitmap-new, and --parent-paths',
    ],
    [
      'incremental without --bitmap-new',
      { ...base, ...inc, bitmapNew: undefined },
      'MISSING_ARGUMENT: incremental mode requires --bitmap-parent, --bitmap-new, and --parent-paths',
    ],
    [
      'the same bitmap as new and parent',
      { ...base, ...inc, bitmapNew: 'backup-1735689600' },
      'INVALID_ARGUMENT: --bitmap-new and --bitmap-parent must differ',
    ],
    ['a bitmap name with a space', { ...base, mode: 'full', bitmapNew: 'bad name' }, 'INVALID_ARGUMENT: Invalid --bitmap-new: "bad name"'],
    ['a bitmap name that is a path', { ...base, ...inc, bitmapParent: '../x' }, 'INVALID_ARGUMENT: Invalid --bitmap-parent: "../x"'],
    ['a bitmap name with XML in it', { ...base, mode: 'full', bitmapNew: "b'><x/>" }, 'INVALID_ARGUMENT: Invalid --bitmap-new: "b\'><x/>"'],
    [
      'a bitmap name starting with a dash (an option to qemu-img)',
      { ...base, mode: 'full', bitmapNew: '-x' },
      'INVALID_ARGUMENT: Invalid --bitmap-new: "-x"',
    ],
    [
      'a parent path with ..',
      { ...base, ...inc, parentPaths: `${VM}/../../etc/root.x.qcow2` },
      `PATH_TRAVERSAL: --parent-paths must not contain '..': ${VM}/../../etc/root.x.qcow2`,
    ],
    [
      'an absolute parent path',
      { ...base, ...inc, parentPaths: '/etc/root.x.qcow2' },
      'PATH_ABSOLUTE: --parent-paths must be relative to the NAS mount, got absolute path: /etc/root.x.qcow2',
    ],
    [
      'a parent path above a backup folder',
      { ...base, ...inc, parentPaths: `${VM}/root.x.qcow2` },
      `PATH_TOO_SHALLOW: --parent-paths must name something at least 3 levels below the NAS mount root (e.g. <instance>/<timestamp>): ${VM}/root.x.qcow2`,
    ],
    [
      'a relative -d disk',
      { ...base, diskpaths: 'pool/disk.qcow2' },
      'INVALID_ARGUMENT: Disk path must be absolute or an rbd: URI: pool/disk.qcow2',
    ],
  ])('%s', (_name, a, expected) => {
    expect(refusal(a)).toBe(expected);
  });
});

describe('validateBackupArgs with -d (a stopped VM): the incremental arguments wait for the running path', () => {
  const D = { ...base, diskpaths: '/mnt/pool/b3f4' };
  it.each<[string, RawBackupArgs]>([
    ['no parent arguments', { ...D, mode: 'incremental', bitmapNew: 'backup-2' }],
    ['no --parent-paths', { ...D, ...inc, parentPaths: undefined }],
    ['no --bitmap-parent', { ...D, ...inc, bitmapParent: undefined }],
    ['no --bitmap-new', { ...D, ...inc, bitmapNew: undefined }],
    ['the same bitmap as new and parent', { ...D, ...inc, bitmapNew: 'backup-1735689600' }],
  ])('%s: accepted as an incremental, refused by checkIncrementalArgs (the running path)', (_n, a) => {
    const args = validateBackupArgs(a, NAS, 'rebase-era');
    expect(args.mode).toBe('incremental');
    expect(() => checkIncrementalArgs(args)).toThrow(
      /^(incremental mode requires --bitmap-parent, --bitmap-new, and --parent-paths|--bitmap-new and --bitmap-parent must differ)$/,
    );
  });

  it.each<[string, RawBackupArgs, string]>([
    ['an unknown mode', { ...D, mode: 'differential' }, 'INVALID_ARGUMENT: Unknown mode: differential'],
    ['a bad bitmap name', { ...D, ...inc, bitmapParent: '../x' }, 'INVALID_ARGUMENT: Invalid --bitmap-parent: "../x"'],
    [
      'a parent path with ..',
      { ...D, ...inc, parentPaths: `${VM}/../../etc/root.x.qcow2` },
      `PATH_TRAVERSAL: --parent-paths must not contain '..': ${VM}/../../etc/root.x.qcow2`,
    ],
    [
      'full without --bitmap-new',
      { ...D, mode: 'full' },
      'MISSING_ARGUMENT: full mode requires --bitmap-new (the bitmap to create for the next incremental)',
    ],
  ])('still refused on every path: %s', (_n, a, expected) => {
    expect(refusal(a)).toBe(expected);
  });
});

describe('validateBackupArgs accepts', () => {
  it('no -M (and legacy-full): a legacy full, no bitmap, whatever else was sent', () => {
    for (const mode of [undefined, '', 'legacy-full']) {
      expect(validateBackupArgs({ ...base, mode, bitmapNew: 'backup-1', parentPaths: PARENT }, NAS, 'merged')).toMatchObject({
        mode: 'legacy',
        bitmapNew: null,
        bitmapParent: null,
        parentPaths: [],
        profile: 'merged',
      });
    }
  });

  it('full: the new bitmap only (a stray parent is ignored)', () => {
    expect(validateBackupArgs({ ...base, mode: 'full', bitmapNew: 'backup-2', bitmapParent: 'backup-1' }, NAS, 'rebase-era')).toMatchObject(
      {
        mode: 'full',
        bitmapNew: 'backup-2',
        bitmapParent: null,
      },
    );
  });

  it('incremental: the parents split on commas (empty entries dropped); -q true only when literally "true"', () => {
    const a = validateBackupArgs(
      { ...base, ...inc, parentPaths: `${PARENT},,${PARENT.replace('root.', 'datadisk.')}`, quiesce: 'True' },
      NAS,
      'rebase-era',
    );
    expect(a).toMatchObject({ mode: 'incremental', bitmapNew: 'backup-1736035200', bitmapParent: 'backup-1735689600', quiesce: false });
    expect(a.parentPaths).toEqual([PARENT, PARENT.replace('root.', 'datadisk.')]);
    expect(validateBackupArgs({ ...base, quiesce: 'true' }, NAS, 'rebase-era').quiesce).toBe(true);
  });

  it('-d: file paths, LINSTOR devices and rbd: URIs, in the order given', () => {
    const d = ['/mnt/pool/b3f4', `rbd:cloudstack/c9e8:mon_host=10.0.0.1`, '/dev/drbd/by-res/cs-5f2c/0'];
    expect(validateBackupArgs({ ...base, diskpaths: d.join(',') }, NAS, 'rebase-era').diskPaths).toEqual(d);
  });
});
