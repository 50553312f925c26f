// argv → one typed, checked argument object per operation, exactly once: everything
// that needs no mount and no host runs here, before anything else, so bad input
// changes nothing anywhere. The operations take these objects and do not check again.
import { resolve } from 'node:path';
import { NasbackupError } from '../errors.js';
import { parseRelativePath } from '../paths.js';
import type { AgentProfile } from '../../compat/protocol.js';
import type { NasTarget } from '../nas/session.js';
import { checkIncrementalArgs, parseBandwidth, refuseCompressWhileRunning, type BackupArgs, type BackupMode } from '../ops/backup/args.js';
import { DELETE_MIN_DEPTH, type DeleteArgs } from '../ops/delete.js';
import type { RebaseArgs } from '../ops/rebase.js';
import type { ChainArgs } from '../ops/chain/index.js';
import type { RestoreArgs, RestoreFormat } from '../ops/restore.js';
import type { MountArgs, UmountArgs } from '../ops/mount.js';
import type { BackupRecord } from '../ops/chain/provider-plan.js';
import type { CliArgs, Operation } from './args.js';

export interface StatsArgs {
  nas: NasTarget;
}

export type OperationArgs =
  | { op: 'backup'; args: BackupArgs }
  | { op: 'rebase'; args: RebaseArgs }
  | { op: 'delete'; args: DeleteArgs }
  | { op: 'stats'; args: StatsArgs };

export function validateOperationArgs(op: Operation, a: CliArgs, profile: AgentProfile): OperationArgs {
  if (!a.type || !a.storage) {
    throw new NasbackupError('MISSING_ARGUMENT', 'The NAS must be given with -t <storage type> and -s <storage address>');
  }
  const nas: NasTarget = { type: a.type, address: a.storage, options: a.mount ?? '' };
  switch (op) {
    case 'rebase':
      return { op, args: validateRebaseArgs(a, nas) };
    case 'delete':
      return { op, args: validateDeleteArgs(a, nas) };
    case 'backup':
      return { op, args: validateBackupArgs(a, nas, profile) };
    case 'stats':
      return { op, args: { nas } };
  }
}

/** `nasbackup chain <action>`: --vm is one instance folder; --backup (`[<instance>/]<timestamp>`) belongs to it. */
export function validateChainArgs(
  action: 'list' | 'verify' | 'plan-delete' | 'delete',
  a: { nas: NasTarget; vm: string; backup?: string; force: boolean; records?: BackupRecord[] },
): ChainArgs {
  const parts = parseRelativePath(a.vm, { what: '--vm' });
  if (parts.length !== 1) throw new NasbackupError('INVALID_ARGUMENT', `--vm must be an instance name, not a path: ${a.vm}`);
  const vm = parts[0]!;
  const out: ChainArgs = { nas: a.nas, vm, force: a.force, ...(a.records ? { records: a.records } : {}) };
  if (action === 'list' || (action === 'verify' && a.backup === undefined)) return out;
  if (!a.backup) throw new NasbackupError('MISSING_ARGUMENT', '--backup <instance>/<timestamp> is required');
  const b = parseRelativePath(a.backup, { what: '--backup' });
  if (b.length === 2 && b[0] !== vm) throw new NasbackupError('INVALID_ARGUMENT', `--backup ${a.backup} is not a backup of ${vm}`);
  if (b.length > 2) throw new NasbackupError('INVALID_ARGUMENT', `--backup must be <instance>/<timestamp>: ${a.backup}`);
  return { ...out, backup: b.at(-1)! };
}

// A volume uuid as backup file names carry it (`root.<vol>.qcow2`): one file-name component.
const VOLUME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$/;

/**
 * `nasbackup restore`: --backup is `<instance>/<timestamp>` on the NAS (the path guard applies);
 * --to is a path on this host, outside the NAS (checked once the NAS is mounted). The format is
 * --format, else qcow2 for a `.qcow2` target and raw otherwise.
 */
export function validateRestoreArgs(a: {
  nas: NasTarget;
  backup: string;
  disk: string;
  to: string;
  format?: string;
  force: boolean;
  sync?: boolean;
  cwd: string;
}): RestoreArgs {
  const b = parseRelativePath(a.backup, { what: '--backup', minDepth: 2 });
  if (b.length !== 2) throw new NasbackupError('INVALID_ARGUMENT', `--backup must be <instance>/<timestamp>: ${a.backup}`);
  // The volume id is matched against file names: one plain name, nothing that could form a path.
  if (!VOLUME.test(a.disk)) throw new NasbackupError('INVALID_ARGUMENT', `Invalid --disk volume id: ${JSON.stringify(a.disk)}`);
  if (a.to === '' || a.to.includes('\0')) throw new NasbackupError('INVALID_ARGUMENT', '--to must name a file or a block device');
  if (a.to.endsWith('/')) throw new NasbackupError('INVALID_ARGUMENT', `--to must name a file, not end with '/': ${a.to}`);
  let format: RestoreFormat;
  if (a.format === undefined) format = a.to.endsWith('.qcow2') ? 'qcow2' : 'raw';
  else if (a.format === 'raw' || a.format === 'qcow2') format = a.format;
  else throw new NasbackupError('INVALID_ARGUMENT', `--format must be qcow2 or raw, not ${a.format}`);
  return { nas: a.nas, vm: b[0]!, backup: b[1]!, disk: a.disk, to: resolve(a.cwd, a.to), format, force: a.force, sync: a.sync !== false };
}

function checkMountDir(dir: string | undefined): string {
  if (!dir) throw new NasbackupError('MISSING_ARGUMENT', 'The folder to mount under is required (nasbackup mount … <dir>)');
  if (!dir.startsWith('/')) throw new NasbackupError('PATH_INVALID', `The mount folder must be an absolute path: ${dir}`);
  if (dir.includes('\0')) throw new NasbackupError('PATH_INVALID', 'The mount folder contains a NUL byte');
  if (dir.replace(/\/+$/, '') === '') throw new NasbackupError('PATH_INVALID', 'The mount folder must not be /');
  return dir;
}

/** `nasbackup mount`: --backup is `<instance>/<timestamp>`, --disk a volume uuid, <dir> absolute. */
export function validateMountArgs(a: { nas: NasTarget; backup: string; disk?: string; dir?: string }): MountArgs {
  const b = parseRelativePath(a.backup, { what: '--backup', minDepth: 2 });
  if (b.length !== 2) throw new NasbackupError('INVALID_ARGUMENT', `--backup must be <instance>/<timestamp>: ${a.backup}`);
  if (a.disk !== undefined && !VOLUME.test(a.disk))
    throw new NasbackupError('INVALID_ARGUMENT', `Invalid --disk volume uuid: ${JSON.stringify(a.disk)}`);
  return { nas: a.nas, instance: b[0]!, timestamp: b[1]!, disk: a.disk ?? null, dir: checkMountDir(a.dir) };
}

export function validateUmountArgs(a: { dir?: string }): UmountArgs {
  return { dir: checkMountDir(a.dir) };
}

const TARGET = '--rebase-target';
const BACKING = '--rebase-new-backing';

export function validateRebaseArgs(a: Pick<CliArgs, 'rebaseTarget' | 'rebaseNewBacking'>, nas: NasTarget): RebaseArgs {
  if (!a.rebaseTarget || !a.rebaseNewBacking) {
    throw new NasbackupError('MISSING_ARGUMENT', 'rebase requires --rebase-target and --rebase-new-backing');
  }
  const target = parseRelativePath(a.rebaseTarget, { what: TARGET, minDepth: 2 });
  parseRelativePath(a.rebaseNewBacking, { what: BACKING, minDepth: 2 });
  // Both name files: `x.qcow2/` is not what the management server meant to send.
  for (const [what, v] of [
    [TARGET, a.rebaseTarget],
    [BACKING, a.rebaseNewBacking],
  ] as const) {
    if (v.endsWith('/')) throw new NasbackupError('PATH_INVALID', `${what} must name a file, not end with '/': ${v}`);
  }
  return { nas, target: a.rebaseTarget, newBacking: a.rebaseNewBacking, instance: target[0]! };
}

export function validateDeleteArgs(a: Pick<CliArgs, 'path'>, nas: NasTarget): DeleteArgs {
  if (a.path === undefined) throw new NasbackupError('MISSING_ARGUMENT', 'delete requires -p <backup path>');
  const parts = parseRelativePath(a.path, { what: '-p', minDepth: DELETE_MIN_DEPTH });
  return { nas, path: a.path, instance: parts[0]! };
}

/** The backup flags as parsed from the command line. */
export type RawBackupArgs = Pick<CliArgs, 'vm' | 'path' | 'quiesce' | 'diskpaths' | 'mode' | 'bitmapNew' | 'bitmapParent' | 'parentPaths'> &
  Partial<Pick<CliArgs, 'bandwidth' | 'compress' | 'verify'>>;

// Checkpoint/bitmap names go into libvirt XML, qemu-img argv and qcow2 headers.
const NAME = /^[A-Za-z0-9][A-Za-z0-9._:+-]{0,254}$/;

function checkName(v: string, what: string): string {
  if (!NAME.test(v)) throw new NasbackupError('INVALID_ARGUMENT', `Invalid ${what}: ${JSON.stringify(v)}`);
  return v;
}

/**
 * Everything about -o backup that can be checked without touching anything. Refused
 * on every path: a missing -v/-p, a bad name or path, an unknown mode, full without
 * --bitmap-new. The incremental arguments are only needed by a running VM (a stopped
 * one falls back to a full copy, as the original did, whatever parents were sent), so
 * they are checked here only with `-d ""`, where the running path is the only one that
 * can succeed; with -d they are checked once the VM is found running (checkIncrementalArgs).
 */
export function validateBackupArgs(a: RawBackupArgs, nas: NasTarget, profile: AgentProfile): BackupArgs {
  if (!a.vm) throw new NasbackupError('MISSING_ARGUMENT', 'backup requires -v <domain name>');
  if (a.path === undefined) throw new NasbackupError('MISSING_ARGUMENT', 'backup requires -p <backup path>');
  const instance = parseRelativePath(a.path, { what: '-p', minDepth: 2 })[0]!;
  const raw = a.mode ?? '';
  let mode: BackupMode;
  if (raw === '' || raw === 'legacy-full') mode = 'legacy';
  else if (raw === 'full' || raw === 'incremental') mode = raw;
  else throw new NasbackupError('INVALID_ARGUMENT', `Unknown mode: ${raw}`);
  const bitmapNew = a.bitmapNew ? checkName(a.bitmapNew, '--bitmap-new') : null;
  const bitmapParent = a.bitmapParent ? checkName(a.bitmapParent, '--bitmap-parent') : null;
  const parentPaths = (a.parentPaths ?? '').split(',').filter((p) => p !== '');
  if (mode === 'full' && !bitmapNew) {
    throw new NasbackupError('MISSING_ARGUMENT', 'full mode requires --bitmap-new (the bitmap to create for the next incremental)');
  }
  for (const p of parentPaths) parseRelativePath(p, { what: '--parent-paths', minDepth: 3 });
  const diskPaths = (a.diskpaths ?? '').split(',').filter((d) => d !== '');
  for (const d of diskPaths) {
    if (!d.startsWith('/') && !d.startsWith('rbd:')) {
      throw new NasbackupError('INVALID_ARGUMENT', `Disk path must be absolute or an rbd: URI: ${d}`);
    }
  }
  const args: BackupArgs = {
    nas,
    vm: a.vm,
    path: a.path,
    instance,
    quiesce: a.quiesce === 'true',
    diskPaths,
    mode,
    bitmapNew: mode === 'legacy' ? null : bitmapNew,
    bitmapParent: mode === 'incremental' ? bitmapParent : null,
    parentPaths: mode === 'incremental' ? parentPaths : [],
    profile,
    bandwidth: a.bandwidth === undefined ? null : parseBandwidth(a.bandwidth),
    compress: a.compress === true,
    ...(a.verify ? { verify: true } : {}),
  };
  // Without -d only the running path can succeed: what it refuses is refused now.
  if (diskPaths.length === 0) {
    checkIncrementalArgs(args);
    refuseCompressWhileRunning(args);
  }
  return args;
}
