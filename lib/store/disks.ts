// Disk naming and identity: which file a disk is written to, and which parent file
// an incremental continues from. Identity is the volume id, never the position.
import { readdir, readlink, realpath } from 'node:fs/promises';
import { basename, join, posix, resolve } from 'node:path';
import { NasbackupError } from '../errors.js';

/** Volume id from a disk source: file path, `rbd:<pool>/<uuid>:…`, or LINSTOR `/dev/drbd/by-res/cs-<uuid>/0`. */
export function volumeId(source: string): string {
  if (source.startsWith('rbd:')) {
    const spec = source.slice(4).split(':')[0] ?? '';
    return basename(spec);
  }
  const linstor = /^\/dev\/drbd\/by-res\/cs-([^/]+)\/\d+$/.exec(source);
  if (linstor) return linstor[1]!;
  return basename(source);
}

/** udev's links of LINSTOR's DRBD resources: `cs-<volume uuid>/<volume number>` → the DRBD minor. */
export const DRBD_BY_RES = '/dev/drbd/by-res';

/**
 * The volume id of a disk source, as volumeId, except that a LINSTOR volume attached as
 * its DRBD minor (`/dev/drbd1001`, #12218/#13538) is named by its volume UUID: the udev
 * link `<byRes>/cs-<uuid>/<n>` that points at it. A minor no link names is refused: a
 * backup file named after the minor could never be found by restore.
 */
export async function resolveVolumeId(source: string, byRes: string = DRBD_BY_RES): Promise<string> {
  // A minor is a device of the /dev that holds drbd/by-res.
  if (posix.dirname(source) !== resolve(byRes, '../..') || !/^drbd\d+$/.test(posix.basename(source))) return volumeId(source);
  const real = await realpath(source).catch(() => source);
  for (const res of await readdir(byRes).catch(() => [] as string[])) {
    const m = /^cs-(.+)$/.exec(res);
    if (!m) continue;
    for (const vol of await readdir(join(byRes, res)).catch(() => [] as string[])) {
      const link = join(byRes, res, vol);
      const target = await readlink(link).catch(() => null);
      if (target === null) continue;
      const to = resolve(join(byRes, res), target);
      if (to === source || to === real || (await realpath(link).catch(() => null)) === real) return m[1]!;
    }
  }
  throw new NasbackupError(
    'VOLUME_ID_UNKNOWN',
    `Cannot tell the volume of ${source}: no LINSTOR link (${byRes}/cs-<volume uuid>/<n>) points at it, and a backup named after the DRBD minor could not be restored`,
  );
}

/** `root.<vol>.qcow2` for the first disk, `datadisk.<vol>.qcow2` for every other. */
export function backupFileName(index: number, volId: string): string {
  return `${index === 0 ? 'root' : 'datadisk'}.${volId}.qcow2`;
}

/** The volume id encoded in a backup file name, or null. */
export function volumeIdOfBackupFile(path: string): string | null {
  const m = /^(?:root|datadisk)\.(.+)\.qcow2$/.exec(posix.basename(path));
  return m ? m[1]! : null;
}

export interface NamedDisk {
  volId: string;
  file: string; // backup file name
}

/**
 * Pair each disk with its parent backup file (mount-relative) by volume id.
 * Older agents send only the root disk's parent (`--parent-path`): a disk without an
 * explicit parent takes the file of the same name from the parents' backup folder,
 * when all parents are in one folder and `exists` confirms the file is there.
 */
export async function matchParents(
  disks: NamedDisk[],
  parentPaths: string[],
  exists: (rel: string) => Promise<boolean>,
): Promise<string[]> {
  const byVol = new Map<string, string>();
  for (const p of parentPaths) {
    const vol = volumeIdOfBackupFile(p);
    if (vol === null)
      throw new NasbackupError(
        'INVALID_ARGUMENT',
        `Parent path is not a backup disk file (root.<vol>.qcow2 or datadisk.<vol>.qcow2): ${p}`,
      );
    if (byVol.has(vol)) throw new NasbackupError('INVALID_ARGUMENT', `Two parent paths for volume ${vol}`);
    byVol.set(vol, p);
  }
  const unknown = [...byVol.keys()].filter((v) => !disks.some((d) => d.volId === v));
  if (unknown.length > 0) {
    throw new NasbackupError(
      'INVALID_ARGUMENT',
      `Parent paths do not match the VM's disks: no disk with volume ${unknown.join(', ')} (disks: ${disks.map((d) => d.volId).join(', ')})`,
    );
  }
  const dirs = new Set(parentPaths.map((p) => posix.dirname(p)));
  const out: string[] = [];
  for (const [i, d] of disks.entries()) {
    const explicit = byVol.get(d.volId);
    if (explicit) {
      out.push(explicit);
      continue;
    }
    const [dir] = [...dirs];
    const candidate = dirs.size === 1 && dir ? posix.join(dir, d.file) : null;
    if (candidate && (await exists(candidate))) {
      out.push(candidate);
      continue;
    }
    throw new NasbackupError(
      'INVALID_ARGUMENT',
      `PARENT_PATHS list shorter than DISK_PATHS — missing parent for disk index ${i} (volume ${d.volId})`,
    );
  }
  return out;
}
