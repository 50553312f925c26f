// File-level access: `nasbackup mount` exposes one disk of a backup read-only under a
// folder so an operator can copy single files out; `nasbackup umount` undoes it. Unlike
// every other operation this one leaves things running when it returns (the NAS mount,
// qemu-nbd, nbdfuse, loop devices, partition mounts), so each is recorded in a state file
// the moment it exists; the undo (on failure, on a signal, or by `umount`) reads that
// record and takes them down in reverse order, each step checking first whether its
// piece is still there, so it can be repeated after a partial failure.
import { lstat, mkdir, readdir, readFile, realpath, rename, rm, rmdir, writeFile } from 'node:fs/promises';
import { basename, dirname, join, resolve } from 'node:path';
import { effectiveMountOptions, isMountPoint } from '../clients/mount.js';
import { findOurProcess } from '../clients/nbd.js';
import { NasbackupError, toNasbackupError, type Warning } from '../errors.js';
import type { NasTarget } from '../nas/session.js';
import { ensureWithin } from '../paths.js';
import { assertChainSafe } from '../store/safety.js';
import { volumeIdOfBackupFile } from '../store/disks.js';
import type { OpContext } from './context.js';

export interface MountArgs {
  nas: NasTarget;
  instance: string;
  timestamp: string;
  /** Volume uuid of the disk; null: the root disk. */
  disk: string | null;
  /** Absolute folder to expose the backup under. */
  dir: string;
}

export interface UmountArgs {
  dir: string;
}

/** What `mount` set up, in the order it did; written after every step. */
export interface MountState {
  version: 1;
  dir: string;
  /** We made `dir` (umount removes it again). */
  createdDir: boolean;
  backup: string;
  /** The disk file, relative to the NAS. */
  disk: string | null;
  nas: { mountPoint: string; type: string; address: string; mounted: boolean };
  server: { pid: number; socket: string } | null;
  fuse: { mountPoint: string; file: string; pid: number | null } | null;
  loops: { device: string; partition: number }[];
  mounts: { target: string; device: string }[];
}

export interface ExposedPartition {
  /** 0: a filesystem on the whole disk. */
  number: number;
  offset: number;
  size: number;
  /** Where its files are, or null when it could not be mounted (swap, unknown filesystem). */
  mountPoint: string | null;
  reason?: string;
}

export interface MountResult {
  dir: string;
  backup: string;
  disk: string;
  partitions: ExposedPartition[];
  warnings: Warning[];
}

export interface UmountResult {
  dir: string;
  backup: string;
  undone: string[];
}

/** Our private folder inside `dir`: the state, the NAS mount, the socket, the fuse file. */
export const PRIVATE = '.nasbackup';
export const stateFile = (dir: string): string => join(dir, PRIVATE, 'state.json');

async function saveState(s: MountState): Promise<void> {
  const file = stateFile(s.dir);
  await writeFile(`${file}.tmp`, JSON.stringify(s, null, 2) + '\n', { mode: 0o600 });
  await rename(`${file}.tmp`, file);
}

async function loadState(dir: string): Promise<MountState> {
  let text: string;
  try {
    text = await readFile(stateFile(dir), 'utf8');
  } catch {
    throw new NasbackupError('NOT_OUR_MOUNT', `${dir} was not set up by nasbackup mount (no ${PRIVATE}/state.json); nothing done`);
  }
  let s: MountState;
  try {
    s = JSON.parse(text) as MountState;
  } catch (e) {
    throw new NasbackupError('NOT_OUR_MOUNT', `${stateFile(dir)} is not a nasbackup mount record: ${(e as Error).message}`);
  }
  if (s.version !== 1 || s.dir !== dir || !Array.isArray(s.loops) || !Array.isArray(s.mounts) || typeof s.nas?.mountPoint !== 'string') {
    throw new NasbackupError('NOT_OUR_MOUNT', `${stateFile(dir)} is not a nasbackup mount record of ${dir}`);
  }
  // Everything it names must be ours: below `dir` (a tampered record must not unmount elsewhere).
  const inside = (p: string): boolean => p.startsWith(`${dir}/`);
  const paths = [
    s.nas.mountPoint,
    ...s.mounts.map((m) => m.target),
    ...(s.fuse ? [s.fuse.mountPoint, s.fuse.file] : []),
    ...(s.server ? [s.server.socket] : []),
  ];
  if (!paths.every(inside)) throw new NasbackupError('NOT_OUR_MOUNT', `${stateFile(dir)} names paths outside ${dir}; refusing`);
  return s;
}

/** The backup file of the disk: `root.<vol>.qcow2` by default, else the one with volume `disk`. */
async function findDisk(backupDir: string, disk: string | null, name: string): Promise<string> {
  const files = await readdir(backupDir).catch(() => {
    throw new NasbackupError('FILE_NOT_FOUND', `Backup ${name} not found on the NAS`);
  });
  const match = files.filter((f) => {
    const vol = volumeIdOfBackupFile(f);
    return vol !== null && (disk === null ? f.startsWith('root.') : vol === disk);
  });
  if (match.length !== 1) {
    const have = files.filter((f) => volumeIdOfBackupFile(f) !== null);
    throw new NasbackupError(
      'FILE_NOT_FOUND',
      disk === null ? `Backup ${name} has no root disk` : `Backup ${name} has no disk with volume ${disk}`,
      { details: `disks in the backup: ${have.join(', ') || 'none'}` },
    );
  }
  return match[0]!;
}

/**
 * The path the kernel's mount table will show (symlinks in the parent resolved): what
 * `umount` compares against when it checks what is still mounted.
 */
async function canonical(dir: string): Promise<string> {
  const abs = resolve(dir);
  const parent = await realpath(dirname(abs)).catch(() => {
    throw new NasbackupError('MOUNT_DIR_UNUSABLE', `The folder holding ${abs} does not exist`);
  });
  return join(parent, basename(abs));
}

/** `dir` must be an empty folder (made if missing; its parent must exist). */
async function prepareDir(dir: string): Promise<boolean> {
  const st = await lstat(dir).catch(() => null);
  if (st === null) {
    await mkdir(dir, { mode: 0o700 }).catch((e: Error) => {
      throw new NasbackupError('MOUNT_DIR_UNUSABLE', `Cannot create ${dir}: ${e.message}`);
    });
    return true;
  }
  if (!st.isDirectory()) throw new NasbackupError('MOUNT_DIR_UNUSABLE', `${dir} is not a folder`);
  const entries = await readdir(dir);
  if (entries.includes(PRIVATE))
    throw new NasbackupError('MOUNT_DIR_UNUSABLE', `${dir} holds a mounted backup already (nasbackup umount ${dir} first)`);
  if (entries.length > 0) throw new NasbackupError('MOUNT_DIR_UNUSABLE', `${dir} is not empty`);
  if (await isMountPoint(dir)) throw new NasbackupError('MOUNT_DIR_UNUSABLE', `${dir} is a mount point`);
  return false;
}

export async function mountBackup(ctx: OpContext, args: MountArgs): Promise<MountResult> {
  const block = ctx.clients.block;
  const missing = block.missing();
  if (missing.length > 0) {
    throw new NasbackupError(
      'TOOL_MISSING',
      `Missing ${missing.map((m) => m.program).join(', ')}: install the Debian package${missing.length > 1 ? 's' : ''} ${[...new Set(missing.map((m) => m.pkg))].join(' ')}`,
    );
  }
  const dir = await canonical(args.dir);
  const name = `${args.instance}/${args.timestamp}`;
  const createdDir = await prepareDir(dir);
  const priv = join(dir, PRIVATE);
  const state: MountState = {
    version: 1,
    dir,
    createdDir,
    backup: name,
    disk: null,
    nas: { mountPoint: join(priv, 'nas'), type: args.nas.type, address: args.nas.address, mounted: false },
    server: null,
    fuse: null,
    loops: [],
    mounts: [],
  };
  try {
    await mkdir(priv, { mode: 0o700 });
    await mkdir(state.nas.mountPoint, { mode: 0o700 });
    await saveState(state);
    const result = await expose(ctx, args, state, name);
    ctx.checkpoint(); // a signal during the last step still undoes it all
    ctx.committed(); // from here on it stands: a signal no longer fails a mount that is up
    return result;
  } catch (e) {
    const err = toNasbackupError(e);
    const left = await undo(ctx, state).catch((u: unknown) => toNasbackupError(u));
    if (left)
      throw new NasbackupError('MOUNT_CLEANUP_FAILED', `${err.message}; and undoing it failed: ${left.message}`, { details: left.details });
    throw err;
  }
}

async function expose(ctx: OpContext, args: MountArgs, state: MountState, name: string): Promise<MountResult> {
  const { block, mount } = ctx.clients;
  const nasDir = state.nas.mountPoint;
  const priv = join(state.dir, PRIVATE);
  ctx.checkpoint();
  // Marked before the call: a mount that timed out or was interrupted may still have happened.
  state.nas.mounted = true;
  await saveState(state);
  await mount.mount(
    { type: args.nas.type, source: args.nas.address, target: nasDir, options: effectiveMountOptions(args.nas.type, args.nas.options) },
    ctx.config.mountTimeoutMs,
  );
  ctx.checkpoint();
  const instanceDir = await ensureWithin(nasDir, args.instance, { what: '--backup' });
  const backupDir = await ensureWithin(nasDir, name, { what: '--backup' });
  const file = await findDisk(backupDir, args.disk, name);
  state.disk = `${name}/${file}`;
  const image = join(backupDir, file);
  // The chain pre-flight: nothing outside the VM folder is opened by qemu-nbd.
  const warnings = await assertChainSafe(image, instanceDir, `Backup ${state.disk}`, args.instance);
  ctx.checkpoint();

  const socket = join(priv, 'nbd.sock');
  state.server = { pid: 0, socket };
  await saveState(state);
  state.server.pid = await block.serve(image, socket, join(priv, 'qemu-nbd.pid'), join(priv, 'qemu-nbd.log'));
  await saveState(state);
  ctx.checkpoint();

  const fuseDir = join(priv, 'fuse');
  await mkdir(fuseDir, { mode: 0o700 });
  state.fuse = { mountPoint: fuseDir, file: join(fuseDir, 'disk'), pid: null };
  await saveState(state);
  state.fuse.pid = await block.fuse(state.fuse.file, socket, join(priv, 'nbdfuse.pid'), join(priv, 'nbdfuse.log'));
  await saveState(state);
  ctx.checkpoint();

  const partitions: ExposedPartition[] = [];
  for (const p of await block.partitions(state.fuse.file)) {
    ctx.checkpoint();
    const device = await block.attach(state.fuse.file, p.offset, p.size);
    state.loops.push({ device, partition: p.number });
    await saveState(state);
    const target = join(state.dir, p.number === 0 ? 'disk' : `part${p.number}`);
    await mkdir(target, { mode: 0o755 });
    state.mounts.push({ target, device });
    await saveState(state);
    try {
      await block.mountReadOnly(device, target);
      partitions.push({ ...p, mountPoint: target });
    } catch (e) {
      const err = toNasbackupError(e);
      if (err.code === 'INTERRUPTED') throw err;
      // Not a filesystem we can mount (swap, a BIOS boot partition): say so, keep going.
      ctx.logger.log(`Partition ${p.number} not mounted: ${err.message}${err.details ? `: ${err.details}` : ''}`);
      state.mounts.pop();
      await rmdir(target);
      state.loops.pop();
      await block.detach(device);
      await saveState(state);
      partitions.push({ ...p, mountPoint: null, reason: (err.details ?? err.message).split('\n')[0]! });
    }
  }
  if (!partitions.some((p) => p.mountPoint !== null)) {
    throw new NasbackupError('MOUNT_FAILED', `No filesystem of ${state.disk} could be mounted read-only`, {
      details: partitions.map((p) => `partition ${p.number}: ${p.reason ?? ''}`).join('\n'),
    });
  }
  return { dir: state.dir, backup: name, disk: state.disk, partitions, warnings };
}

/**
 * Take down what `state` records, newest first. Each piece is checked before it is
 * touched (still mounted? the loop device still on our file? the process still ours?),
 * so this may run again after a partial failure; the state is rewritten after each step.
 * Returns null when all is undone, else the error naming what is left.
 */
async function undo(ctx: OpContext, state: MountState): Promise<NasbackupError | null> {
  const { block, mount } = ctx.clients;
  const problems: string[] = [];
  const step = async (what: string, fn: () => Promise<void>): Promise<boolean> => {
    try {
      await fn();
      return true;
    } catch (e) {
      const err = toNasbackupError(e);
      problems.push(`${what}: ${err.message}${err.details ? ` (${err.details.trim().split('\n')[0]})` : ''}`);
      return false;
    }
  };
  for (const m of [...state.mounts].reverse()) {
    const ok = await step(`unmount ${m.target}`, async () => {
      if (await isMountPoint(m.target)) await block.umount(m.target);
      await rmdir(m.target).catch(ignoreMissing);
    });
    if (ok) state.mounts = state.mounts.filter((x) => x !== m);
  }
  for (const l of [...state.loops].reverse()) {
    // A loop device still mounted above (its unmount failed) stays; so does one now on another file.
    if (state.mounts.some((m) => m.device === l.device)) continue;
    const ok = await step(`detach ${l.device}`, async () => {
      if (state.fuse && block.backingFile(l.device) === state.fuse.file) await block.detach(l.device);
    });
    if (ok) state.loops = state.loops.filter((x) => x !== l);
  }
  if (state.fuse && state.loops.length === 0) {
    const fuse = state.fuse;
    const ok = await step(`stop nbdfuse at ${fuse.mountPoint}`, async () => {
      // Unmounting makes nbdfuse exit by itself.
      if (await isMountPoint(fuse.mountPoint)) await block.umount(fuse.mountPoint);
      const pid = fuse.pid ?? findOurProcess('nbdfuse', fuse.file);
      if (pid) await block.stop(pid, 'nbdfuse', fuse.file, 5000);
      await rmdir(fuse.mountPoint).catch(ignoreMissing);
    });
    if (ok) state.fuse = null;
  }
  if (state.server && state.fuse === null) {
    const server = state.server;
    const ok = await step('stop qemu-nbd', async () => {
      const pid = server.pid || findOurProcess('qemu-nbd', server.socket);
      if (pid) await block.stop(pid, 'qemu-nbd', server.socket, 0);
      await rm(server.socket, { force: true });
    });
    if (ok) state.server = null;
  }
  if (state.nas.mounted && state.server === null) {
    const nasDir = state.nas.mountPoint;
    const ok = await step(`unmount the NAS at ${nasDir}`, async () => {
      if (await isMountPoint(nasDir)) await mount.umount(nasDir, ctx.config.umountTimeoutMs);
    });
    if (ok) state.nas.mounted = false;
  }
  if (problems.length > 0) {
    await saveState(state).catch(() => {});
    return new NasbackupError(
      'MOUNT_CLEANUP_FAILED',
      `Could not undo everything under ${state.dir} (nasbackup umount ${state.dir} retries)`,
      {
        details: problems.join('\n'),
      },
    );
  }
  const priv = join(state.dir, PRIVATE);
  await rmdir(state.nas.mountPoint).catch(ignoreMissing);
  for (const f of ['qemu-nbd.pid', 'qemu-nbd.log', 'nbdfuse.pid', 'nbdfuse.log', 'state.json.tmp', 'state.json']) {
    await rm(join(priv, f), { force: true });
  }
  await rmdir(priv).catch(ignoreMissing);
  if (state.createdDir) await rmdir(state.dir).catch(() => {});
  return null;
}

function ignoreMissing(e: NodeJS.ErrnoException): void {
  if (e.code !== 'ENOENT') throw e;
}

export async function umountBackup(ctx: OpContext, args: UmountArgs): Promise<UmountResult> {
  const dir = await realpath(args.dir).catch(() => resolve(args.dir));
  const state = await loadState(dir);
  const before = describe(state);
  const left = await undo(ctx, state);
  if (left) throw left;
  return { dir, backup: state.backup, undone: before };
}

/** What the record holds, newest first (the order it is undone in). */
function describe(s: MountState): string[] {
  return [
    ...[...s.mounts].reverse().map((m) => `mount ${m.target}`),
    ...[...s.loops].reverse().map((l) => `loop device ${l.device}`),
    ...(s.fuse ? [`nbdfuse ${s.fuse.file}`] : []),
    ...(s.server ? [`qemu-nbd ${s.server.socket}`] : []),
    ...(s.nas.mounted ? [`NAS mount ${s.nas.mountPoint}`] : []),
  ];
}
