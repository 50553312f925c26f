// The replay sandbox under /tmp/nasbackup-golden: reset (unmounting only what lies
// below it), seeding of the NAS export and the live VM disks from a fixture's recipe,
// and the leftovers a run may have left (mount points in the program's TMPDIR).
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import {
  accessSync,
  chmodSync,
  closeSync,
  constants,
  copyFileSync,
  cpSync,
  existsSync,
  mkdirSync,
  openSync,
  readdirSync,
  readFileSync,
  renameSync,
  rmSync,
  writeFileSync,
  writeSync,
} from 'node:fs';
import { dirname, join } from 'node:path';
import { promisify } from 'node:util';
import { CWD, GOLDEN_ROOT, NAS, PRIMARY, RUN, TMP, resolvePaths, type Fixture, type Leftovers, type Write } from './fixture.js';
import { normText } from './normalize.js';

const run = promisify(execFile);

/** A program from the PATH the tests were started with (never a shim). */
export function which(name: string): string {
  for (const dir of (process.env.PATH ?? '').split(':')) {
    if (!dir || dir.startsWith(GOLDEN_ROOT)) continue;
    const p = join(dir, name);
    try {
      accessSync(p, constants.X_OK);
      return p;
    } catch {
      // next
    }
  }
  throw new Error(`${name} not found in PATH`);
}

export const REAL = {
  get mount() {
    return which('mount');
  },
  get umount() {
    return which('umount');
  },
  get qemuImg() {
    return which('qemu-img');
  },
  get qemuIo() {
    return which('qemu-io');
  },
};

export function unescapeMount(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
}

/** Mount points at or below `prefix`, deepest first. */
export function mountsUnder(prefix: string): string[] {
  return readFileSync('/proc/self/mountinfo', 'utf8')
    .split('\n')
    .map((l) => unescapeMount(l.split(' ')[4] ?? ''))
    .filter((m) => m === prefix || m.startsWith(prefix + '/'))
    .sort((a, b) => b.length - a.length);
}

async function unmountAll(prefix: string): Promise<void> {
  for (let round = 0; round < 3; round++) {
    const mps = mountsUnder(prefix);
    if (mps.length === 0) return;
    for (const mp of mps) {
      await run(REAL.umount, [mp]).catch(() => run(REAL.umount, ['-l', mp]).catch(() => undefined));
    }
  }
  const left = mountsUnder(prefix);
  if (left.length) throw new Error(`cannot unmount ${left.join(', ')}; refusing to delete below ${prefix}`);
}

const SUITE_LOCK = `${GOLDEN_ROOT}.lock`;

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code !== 'ESRCH';
  }
}

/**
 * The sandbox paths are fixed, so two golden runs (say two `npm test` at once) must
 * not overlap: the second waits. A lock whose process is gone is taken over. The file
 * is also the one people `flock(1)` around a run, so it is never deleted (a new inode
 * would split that flock in two): a stale or empty lock is overwritten in place, and
 * release empties it.
 */
export async function acquireSuiteLock(waitMs: number): Promise<void> {
  const end = Date.now() + waitMs;
  for (;;) {
    try {
      writeFileSync(SUITE_LOCK, String(process.pid), { flag: 'wx' });
      return;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
    }
    const text = readFileSync(SUITE_LOCK, 'utf8').trim();
    const pid = Number(text);
    if (text === '' || !Number.isInteger(pid) || pid <= 0 || !alive(pid)) {
      writeFileSync(SUITE_LOCK, String(process.pid));
      await new Promise((r) => setTimeout(r, 50));
      if (readFileSync(SUITE_LOCK, 'utf8').trim() === String(process.pid)) return;
      continue;
    }
    if (Date.now() > end) throw new Error(`another golden run (pid ${pid}) holds ${SUITE_LOCK}`);
    await new Promise((r) => setTimeout(r, 250));
  }
}

export function releaseSuiteLock(): void {
  try {
    if (Number(readFileSync(SUITE_LOCK, 'utf8').trim()) === process.pid) writeFileSync(SUITE_LOCK, '');
  } catch {
    // not ours / already gone
  }
}

/** Empty sandbox folders (the image cache stays). Only the harness's own folders below GOLDEN_ROOT are removed. */
export async function resetSandbox(): Promise<void> {
  // The fixtures were recorded with umask 0022; modes of seeded and written files depend on it.
  try {
    process.umask(0o022);
  } catch {
    // worker threads cannot change it; the default is 0022 almost everywhere
  }
  await unmountAll(GOLDEN_ROOT);
  for (const d of [NAS, PRIMARY, TMP, CWD, RUN]) rmSync(d, { recursive: true, force: true });
  for (const d of [NAS, PRIMARY, TMP, CWD, RUN]) mkdirSync(d, { recursive: true, mode: 0o755 });
}

/** Remove the whole sandbox (after the suite). */
export async function removeSandbox(): Promise<void> {
  if (!existsSync(GOLDEN_ROOT)) return;
  await unmountAll(GOLDEN_ROOT);
  rmSync(GOLDEN_ROOT, { recursive: true, force: true });
}

function ioCommands(writes: readonly Write[]): string[] {
  return writes.flatMap((w) => ['-c', `write -P ${w.pattern} ${w.offset} ${w.length}`]);
}

export async function makeQcow2(
  path: string,
  size: number,
  opts: { backing?: { file: string; format: string }; writes?: readonly Write[]; bitmaps?: readonly string[] } = {},
): Promise<void> {
  mkdirSync(dirname(path), { recursive: true, mode: 0o755 });
  const args = ['create', '-q', '-f', 'qcow2'];
  if (opts.backing) args.push('-b', opts.backing.file, '-F', opts.backing.format);
  await run(REAL.qemuImg, [...args, path, String(size)]);
  if (opts.writes?.length) await run(REAL.qemuIo, ['-f', 'qcow2', ...ioCommands(opts.writes), path]);
  for (const b of opts.bitmaps ?? []) await run(REAL.qemuImg, ['bitmap', '--add', path, b]);
}

/** Built images, by recipe: many fixtures share a recipe, and a copy is much cheaper than qemu-img + qemu-io. */
const CACHE = join(GOLDEN_ROOT, 'cache');
const recipeKey = (v: unknown): string => createHash('sha256').update(JSON.stringify(v)).digest('hex').slice(0, 24);

/** Live VM disks from host.domains[].disks[], then the NAS recipe (nas.steps) in order. */
export async function seed(fx: Fixture): Promise<void> {
  const host = resolvePaths(fx.host);
  const disks = host.domains.flatMap((d) => d.disks).filter((k) => k.device === 'disk' && k.source !== '-' && k.seed !== false);
  await Promise.all(
    disks.map(async (k) => {
      const spec = { size: k.virtualSize ?? 16 << 20, writes: [...(k.writes ?? []), ...(k.dirty ?? [])], bitmaps: k.bitmaps ?? [] };
      const cached = join(CACHE, `disk-${recipeKey(spec)}.qcow2`);
      if (!existsSync(cached)) {
        await makeQcow2(`${cached}.tmp`, spec.size, spec);
        renameSync(`${cached}.tmp`, cached);
      }
      mkdirSync(dirname(k.source), { recursive: true, mode: 0o755 });
      copyFileSync(cached, k.source);
      chmodSync(k.source, 0o644);
    }),
  );
  const nasCache = join(CACHE, `nas-${recipeKey(fx.nas.steps)}`);
  if (!existsSync(nasCache)) {
    await buildNas(fx, `${nasCache}.tmp`);
    renameSync(`${nasCache}.tmp`, nasCache);
  }
  cpSync(nasCache, NAS, { recursive: true });
}

async function buildNas(fx: Fixture, root: string): Promise<void> {
  rmSync(root, { recursive: true, force: true });
  mkdirSync(root, { recursive: true, mode: 0o755 });
  for (const step of resolvePaths(fx.nas.steps)) {
    const p = join(root, step.path);
    switch (step.op) {
      case 'qcow2':
        await makeQcow2(p, step.virtualSize, { ...(step.backing ? { backing: step.backing } : {}), writes: step.writes ?? [] });
        break;
      case 'file':
        mkdirSync(dirname(p), { recursive: true, mode: 0o755 });
        writeFileSync(p, step.content);
        break;
      case 'dir':
        mkdirSync(p, { recursive: true, mode: 0o755 });
        break;
      case 'remove':
        rmSync(p, { recursive: true, force: true });
        break;
      case 'poke': {
        const fd = openSync(p, 'r+');
        try {
          writeSync(fd, Buffer.from(step.hex, 'hex'), 0, step.hex.length / 2, step.offset);
        } finally {
          closeSync(fd);
        }
        break;
      }
    }
  }
}

/** Mount points (and folders) the program left in its TMPDIR, normalized like the fixtures. */
export function leftovers(): Leftovers {
  const mounted = new Set(mountsUnder(TMP).filter((m) => m !== TMP));
  const dirs = existsSync(TMP)
    ? readdirSync(TMP)
        .filter((n) => n.startsWith('csbackup.'))
        .map((n) => join(TMP, n))
    : [];
  const all = [...new Set([...dirs, ...mounted])].sort();
  const detail: Leftovers['detail'] = {};
  for (const p of all) {
    let entries: string[] = [];
    try {
      entries = readdirSync(p).sort();
    } catch {
      // gone or unreadable
    }
    detail[normText(p)] = { mounted: mounted.has(p), entries };
  }
  return { mounts: [...mounted].sort().map(normText), tempDirs: dirs.sort().map(normText), detail };
}

/** Unmount and remove what a run left in its TMPDIR (before the NAS is inspected). */
export async function clearLeftovers(): Promise<void> {
  await unmountAll(TMP);
  for (const n of existsSync(TMP) ? readdirSync(TMP) : []) rmSync(join(TMP, n), { recursive: true, force: true });
}
