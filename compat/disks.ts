// The `-d` disk list of a stopped-VM backup (docs/agent-contract.md §3.1): the provider sends
// one path per volume (NFS /mnt/<pool>/<vol>, local <poolPath>/<vol>, LINSTOR
// /dev/drbd/by-res/cs-<vol>/0, RBD <pool>/<vol>) and the wrapper turns RBD ones into
// qemu's rbd: strings. Also: the volume id each entry names on the NAS (§6).
import type { TakeBackupCommand } from './commands.js';
import { indexOutOfBounds, javaSplit, nullPointer } from './java.js';
import { isJsonObject, type JsonObject } from './json.js';

/** The PrimaryDataStoreTO fields the wrapper looks at. */
export interface PoolView {
  uuid?: string;
  /** Storage.StoragePoolType name: RBD, NetworkFilesystem, SharedMountPoint, Filesystem, Linstor, … */
  poolType?: string;
  host?: string;
  port?: number;
  path?: string;
  details?: Map<string, string>;
}

const str = (v: unknown): string | undefined =>
  typeof v === 'string' ? v : typeof v === 'number' || typeof v === 'bigint' ? String(v) : undefined;

export function poolView(raw: JsonObject): PoolView {
  const out: PoolView = {};
  const uuid = str(raw.get('uuid'));
  if (uuid !== undefined) out.uuid = uuid;
  // StoragePoolType has its own adaptor: normally the bare name, tolerate {"name": …}.
  const t = raw.get('poolType');
  const type = isJsonObject(t) ? str(t.get('name')) : str(t);
  if (type !== undefined) out.poolType = type;
  const host = str(raw.get('host'));
  if (host !== undefined) out.host = host;
  const port = Number(str(raw.get('port')));
  if (Number.isInteger(port)) out.port = port;
  const path = str(raw.get('path'));
  if (path !== undefined) out.path = path;
  const d = raw.get('details');
  if (isJsonObject(d)) {
    out.details = new Map();
    for (const [k, v] of d) {
      const s = str(v);
      if (s !== undefined) out.details.set(k, s);
    }
  }
  return out;
}

/** What the agent's KVMStoragePool knows about an RBD pool (from libvirt, not from the command). */
export interface RbdPool {
  monHost: string | null;
  monPort: number;
  authUserName?: string | null;
  authSecret?: string | null;
  /** details["rbd_default_data_pool"] */
  dataPool?: string | null;
}

export type RbdPoolResolver = (pool: PoolView) => RbdPool;

/**
 * Default: the monitors from the transfer object. The cephx user and secret live
 * in the agent's libvirt secret, which a pure layer cannot read: without a
 * resolver that knows them the string says auth_supported=none.
 */
export const rbdPoolFromTransferObject: RbdPoolResolver = (p) => ({
  monHost: p.host ?? null,
  monPort: p.port ?? 0,
  dataPool: p.details?.get('rbd_default_data_pool') ?? null,
});

/** IPv6 monitors are written [a:b::c] with every colon escaped for qemu's option parser. */
const monHostAddress = (h: string): string => (h.startsWith('[') && h.endsWith(']') ? h.replace(/:/g, '\\:') : h);

export function composeMonHosts(monHost: string | null, monPort: number): string {
  if (monHost === null) throw nullPointer();
  return javaSplit(monHost, ',')
    .map((h) => (monPort > 0 ? `${monHostAddress(h)}\\:${monPort}` : monHostAddress(h)))
    .join('\\;');
}

/** KVMPhysicalDisk.RBDStringBuilder(pool, image). */
export function rbdString(pool: RbdPool, image: string | null): string {
  let s = `rbd:${image === null ? 'null' : image}:mon_host=${composeMonHosts(pool.monHost, pool.monPort)}`;
  if (pool.authUserName === null || pool.authUserName === undefined) s += ':auth_supported=none';
  else s += `:auth_supported=cephx:id=${pool.authUserName}:key=${pool.authSecret ?? 'null'}`;
  if (pool.dataPool !== null && pool.dataPool !== undefined) s += `:rbd_default_data_pool=${pool.dataPool}`;
  return `${s}:rbd_default_format=2:client_mount_timeout=30`;
}

/** The device path the provider sends for a LINSTOR volume. */
export const linstorDevicePath = (volPath: string): string => `/dev/drbd/by-res/cs-${volPath}/0`;

/**
 * The wrapper's loop over volumePaths/volumePools. It indexes the pools by the
 * path's position, so a short or null pool list throws (as in Java: the agent then
 * answers with a plain Answer, §2.3). A null volumePaths means a running VM: [].
 */
export function buildDiskPaths(cmd: TakeBackupCommand, resolve: RbdPoolResolver = rbdPoolFromTransferObject): Array<string | null> {
  const paths = cmd.volumePaths;
  if (paths === undefined) return [];
  const pools = cmd.volumePools;
  return paths.map((path, i) => {
    if (pools === undefined) throw nullPointer();
    if (i >= pools.length) throw indexOutOfBounds(i, pools.length, false);
    const raw = pools[i];
    if (raw === null || raw === undefined) throw nullPointer();
    const pool = poolView(raw);
    if (pool.poolType !== 'RBD') return path; // passed through as the provider built it (LINSTOR included)
    return rbdString(resolve(pool), path);
  });
}

/**
 * The <volId> a -d entry names on the NAS (docs/agent-contract.md §6): the uuid of an rbd:
 * string, the resource of a LINSTOR device path, else the basename.
 */
export function volumeIdOf(entry: string): string {
  if (entry.startsWith('rbd:')) {
    const afterSlash = entry.includes('/') ? entry.slice(entry.indexOf('/') + 1) : entry;
    return afterSlash.split(':')[0] ?? '';
  }
  const LINSTOR = '/dev/drbd/by-res/';
  if (entry.startsWith(LINSTOR)) {
    const res = entry.slice(LINSTOR.length).split('/')[0] ?? '';
    return res.startsWith('cs-') ? res.slice(3) : res;
  }
  const trimmed = entry.replace(/\/+$/, '');
  return trimmed.slice(trimmed.lastIndexOf('/') + 1);
}
