// `nasbackup mount` / `umount` with the real pieces: qemu-nbd, nbdfuse, sfdisk, loop
// devices and ext4 mounts, on a local folder bind-mounted as the NAS.
import { execFileSync, spawn } from 'node:child_process';
import { existsSync, mkdirSync, readdirSync, readFileSync, readlinkSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { bindNas, leftovers, logText, makeSandbox, run, start, writeShim, type Sandbox } from '../helpers/cli.js';
import { removeTempDirs } from '../helpers/tmp.js';
import { hasPartitionSignature } from '../../lib/clients/nbd.js';

afterAll(removeTempDirs);

const VM = 'i-2-3-VM';
const TS = '2025.01.01.00.00.00';
const MiB = 1024 * 1024;

const sh = (cmd: string, args: string[], input?: string): string =>
  execFileSync(cmd, args, { encoding: 'utf8', ...(input ? { input } : {}) });

/** Put `text` in /hello.txt of a fresh ext4 filesystem at `offset`/`size` of the raw image `raw`. */
function ext4WithFile(raw: string, offset: number, size: number, text: string): void {
  const dev = sh('losetup', ['--offset', String(offset), '--sizelimit', String(size), '--find', '--show', raw]).trim();
  const mnt = `${raw}.mnt`;
  mkdirSync(mnt, { recursive: true });
  try {
    sh('mkfs.ext4', ['-q', dev]);
    sh('mount', [dev, mnt]);
    try {
      writeFileSync(join(mnt, 'hello.txt'), text);
    } finally {
      sh('umount', [mnt]);
    }
  } finally {
    sh('losetup', ['--detach', dev]);
  }
}

/**
 * A backup of VM with a two-layer root chain: a full whose disk has a GPT with an ext4
 * partition holding hello.txt (and a second, empty partition), and an incremental on top.
 * `partitioned: false`: a bare ext4 filesystem on the whole disk.
 */
function makeBackup(sb: Sandbox, opts: { partitioned: boolean }): { vol: string } {
  const vol = 'a1b2c3d4-0000-4000-8000-000000000001';
  const raw = join(sb.root, 'disk.raw');
  sh('truncate', ['-s', '64M', raw]);
  if (opts.partitioned) {
    sh('sfdisk', ['-q', raw], 'label: gpt\nstart=2048, size=40960, type=linux\nstart=43008, type=linux\n');
    ext4WithFile(raw, 2048 * 512, 40960 * 512, 'hello from the backup\n');
  } else {
    ext4WithFile(raw, 0, 64 * MiB, 'hello from the backup\n');
  }
  const full = join(sb.nas, VM, '2025.01.01.00.00.00.full');
  mkdirSync(full, { recursive: true });
  sh('qemu-img', ['convert', '-O', 'qcow2', raw, join(full, `root.${vol}.qcow2`)]);
  const inc = join(sb.nas, VM, TS);
  mkdirSync(inc, { recursive: true });
  sh('qemu-img', [
    'create',
    '-q',
    '-f',
    'qcow2',
    '-b',
    `../2025.01.01.00.00.00.full/root.${vol}.qcow2`,
    '-F',
    'qcow2',
    join(inc, `root.${vol}.qcow2`),
  ]);
  return { vol };
}

/** Anything of ours still there: loop devices on files below the sandbox, mounts, qemu-nbd/nbdfuse processes. */
function traces(sb: Sandbox): { loops: string[]; mounts: string[]; processes: string[] } {
  const loops = readdirSync('/sys/block')
    .filter((d) => d.startsWith('loop'))
    .filter((d) => {
      try {
        return readFileSync(`/sys/block/${d}/loop/backing_file`, 'utf8').startsWith(sb.root);
      } catch {
        return false;
      }
    });
  const mounts = readFileSync('/proc/self/mountinfo', 'utf8')
    .split('\n')
    .map((l) => l.split(' ')[4] ?? '')
    .filter((m) => m.startsWith(sb.root));
  const processes = readdirSync('/proc')
    .filter((p) => /^\d+$/.test(p))
    .map((p) => {
      try {
        return readFileSync(`/proc/${p}/cmdline`, 'utf8').split('\0').join(' ');
      } catch {
        return '';
      }
    })
    .filter((c) => /qemu-nbd|nbdfuse/.test(c) && c.includes(sb.root));
  return { loops, mounts, processes };
}

const nothing = { loops: [], mounts: [], processes: [] };

/** The working folders of our qemu-nbd and nbdfuse (they must hold no filesystem busy). */
function daemonCwds(sb: Sandbox): string[] {
  return readdirSync('/proc')
    .filter((p) => /^\d+$/.test(p))
    .filter((p) => {
      try {
        const c = readFileSync(`/proc/${p}/cmdline`, 'utf8');
        return /qemu-nbd|nbdfuse/.test(c) && c.includes(sb.root);
      } catch {
        return false;
      }
    })
    .map((p) => readlinkSync(`/proc/${p}/cwd`));
}

/** The error codes of a --json run. */
const codes = (stdout: string): string[] => (JSON.parse(stdout) as { errors: { code: string }[] }).errors.map((e) => e.code);

describe('nasbackup mount / umount', () => {
  it('exposes a partitioned root disk of a backup chain read-only, and umount undoes everything', async () => {
    const sb = makeSandbox('mount');
    makeBackup(sb, { partitioned: true });
    const dir = join(sb.root, 'restore');
    const r = await run(sb, ['mount', ...bindNas(sb), '--backup', `${VM}/${TS}`, dir]);
    try {
      expect(r.stdout).toContain(`${dir}/part1  (partition 1, 20 MiB)`);
      expect(r.stdout).toContain('partition 2 (42 MiB) not mounted');
      expect(r.code).toBe(0);
      expect(readFileSync(join(dir, 'part1', 'hello.txt'), 'utf8')).toBe('hello from the backup\n');
      // Read-only all the way: no write reaches the backup.
      expect(() => writeFileSync(join(dir, 'part1', 'new.txt'), 'x')).toThrow(/EROFS/);
      expect(() => writeFileSync(join(dir, '.nasbackup', 'fuse', 'disk'), 'x')).toThrow();
      const t = traces(sb);
      expect(t.loops).toHaveLength(1);
      expect(t.processes).toHaveLength(2); // qemu-nbd and nbdfuse outlived the command
      expect(daemonCwds(sb)).toEqual(['/', '/']);
      expect(t.mounts).toHaveLength(3); // the NAS, the fuse file, the partition
      // A second mount on the same folder is refused and changes nothing.
      const again = await run(sb, ['mount', ...bindNas(sb), '--backup', `${VM}/${TS}`, '--json', dir]);
      expect(again.code).toBe(1);
      expect(codes(again.stdout)).toEqual(['MOUNT_DIR_UNUSABLE']);
      expect(traces(sb)).toEqual(t);
    } finally {
      const u = await run(sb, ['umount', dir]);
      expect(u.stdout).toBe(`Unmounted backup ${VM}/${TS} from ${dir}\n`);
      expect(u.code).toBe(0);
    }
    expect(traces(sb)).toEqual(nothing);
    expect(existsSync(dir)).toBe(false); // we made it, so it went too
    expect(leftovers(sb)).toEqual({ dirs: [], mounts: [] });
    // Nothing to undo twice.
    const u2 = await run(sb, ['umount', dir]);
    expect(u2.code).toBe(1);
    expect(u2.stdout).toBe(`${dir} was not set up by nasbackup mount (no .nasbackup/state.json); nothing done\n`);
  });

  it('a filesystem on the whole disk (no partition table) is mounted at <dir>/disk; --json; a symlinked parent', async () => {
    const sb = makeSandbox('mount-bare');
    const { vol } = makeBackup(sb, { partitioned: false });
    // Through a symlinked parent: the mount table shows the real path, and umount must still find it all.
    mkdirSync(join(sb.root, 'real'));
    symlinkSync(join(sb.root, 'real'), join(sb.root, 'link'));
    const dir = join(sb.root, 'link', 'restore');
    mkdirSync(dir); // an existing empty folder is used and kept
    const r = await run(sb, ['mount', ...bindNas(sb), '--backup', `${VM}/${TS}`, '--disk', vol, '--json', dir]);
    try {
      expect(r.code).toBe(0);
      const j = JSON.parse(r.stdout) as { ok: boolean; disk: string; partitions: { number: number; mountPoint: string }[] };
      expect(j.ok).toBe(true);
      expect(j.disk).toBe(`${VM}/${TS}/root.${vol}.qcow2`);
      expect(j.partitions).toEqual([{ number: 0, offset: 0, size: 64 * MiB, mountPoint: join(sb.root, 'real', 'restore', 'disk') }]);
      expect(readFileSync(join(dir, 'disk', 'hello.txt'), 'utf8')).toBe('hello from the backup\n');
    } finally {
      expect((await run(sb, ['umount', '--json', dir])).code).toBe(0);
    }
    expect(traces(sb)).toEqual(nothing);
    expect(readdirSync(dir)).toEqual([]);
  });

  it('a partition still in use: umount exits 20, keeps the record of what is left, and a second umount finishes', async () => {
    const sb = makeSandbox('mount-busy');
    makeBackup(sb, { partitioned: true });
    const dir = join(sb.root, 'restore');
    expect((await run(sb, ['mount', ...bindNas(sb), '--backup', `${VM}/${TS}`, dir])).code).toBe(0);
    const before = traces(sb);
    const user = spawn('sleep', ['60'], { cwd: join(dir, 'part1'), stdio: 'ignore' });
    try {
      const u = await run(sb, ['umount', '--json', dir]);
      expect(u.code).toBe(20);
      expect(codes(u.stdout)).toEqual(['MOUNT_CLEANUP_FAILED']);
      expect(u.stdout).toContain(`unmount ${join(dir, 'part1')}`);
      // Nothing below a busy partition was taken away from under it.
      expect(traces(sb)).toEqual(before);
      expect(existsSync(join(dir, '.nasbackup', 'state.json'))).toBe(true);
    } finally {
      const gone = new Promise((res) => user.on('exit', res));
      user.kill('SIGKILL');
      await gone;
    }
    const again = await run(sb, ['umount', dir]);
    expect(again.code).toBe(0);
    expect(traces(sb)).toEqual(nothing);
    expect(existsSync(dir)).toBe(false);
  });

  it('a missing program is named with its Debian package, and nothing is set up', async () => {
    const sb = makeSandbox('mount-missing');
    makeBackup(sb, { partitioned: true });
    // A PATH with every program but nbdfuse.
    const bin = join(sb.root, 'bin');
    mkdirSync(bin);
    for (const p of ['qemu-nbd', 'sfdisk', 'losetup', 'mount', 'umount', 'setsid', 'setpriv']) {
      symlinkSync(sh('sh', ['-c', `command -v ${p}`]).trim(), join(bin, p));
    }
    symlinkSync(process.execPath, join(bin, 'node'));
    const dir = join(sb.root, 'restore');
    const r = await run(sb, ['mount', ...bindNas(sb), '--backup', `${VM}/${TS}`, dir], { PATH: bin });
    expect(r.stdout).toBe('Missing nbdfuse: install the Debian package libnbd-bin\n');
    expect(r.code).toBe(1);
    const j = await run(sb, ['mount', ...bindNas(sb), '--backup', `${VM}/${TS}`, '--json', dir], { PATH: bin });
    expect(codes(j.stdout)).toEqual(['TOOL_MISSING']);
    expect(existsSync(dir)).toBe(false);
    expect(traces(sb)).toEqual(nothing);
  });

  it('bad arguments and a folder it did not set up are refused, changing nothing', async () => {
    const sb = makeSandbox('mount-args');
    const dir = join(sb.root, 'restore');
    const cases: [string[], string][] = [
      [['mount', ...bindNas(sb), '--backup', VM, dir], 'PATH_TOO_SHALLOW'],
      [['mount', ...bindNas(sb), '--backup', `${VM}/../x`, dir], 'PATH_TRAVERSAL'],
      [['mount', ...bindNas(sb), '--backup', `${VM}/${TS}/x`, dir], 'INVALID_ARGUMENT'],
      [['mount', ...bindNas(sb), '--backup', `${VM}/${TS}`, '--disk', '../x', dir], 'INVALID_ARGUMENT'],
      [['mount', ...bindNas(sb), '--backup', `${VM}/${TS}`, 'relative'], 'PATH_INVALID'],
      [['mount', ...bindNas(sb), '--backup', `${VM}/${TS}`], 'MISSING_ARGUMENT'],
      [['mount', '--backup', `${VM}/${TS}`, dir], 'INVALID_OPTION'],
      [['umount', sb.nas], 'NOT_OUR_MOUNT'],
    ];
    for (const [args, code] of cases) {
      const r = await run(sb, [...args, '--json']);
      expect(codes(r.stdout), args.join(' ')).toEqual([code]);
      expect(r.code).toBe(1);
    }
    // A backup that is not there: the NAS mount is undone again.
    const r = await run(sb, ['mount', ...bindNas(sb), '--backup', `${VM}/${TS}`, '--json', dir]);
    expect(codes(r.stdout)).toEqual(['FILE_NOT_FOUND']);
    expect(r.code).toBe(1);
    expect(existsSync(dir)).toBe(false);
    expect(traces(sb)).toEqual(nothing);
  });

  it('an unsafe chain is refused by the pre-flight before anything serves it; a tampered record is refused by umount', async () => {
    const sb = makeSandbox('mount-unsafe');
    const outside = join(sb.root, 'outside.qcow2');
    sh('qemu-img', ['create', '-q', '-f', 'qcow2', outside, '64M']);
    const inc = join(sb.nas, VM, TS);
    mkdirSync(inc, { recursive: true });
    sh('qemu-img', ['create', '-q', '-f', 'qcow2', '-u', '-b', outside, '-F', 'qcow2', join(inc, 'root.vol-9.qcow2'), '64M']);
    const dir = join(sb.root, 'restore');
    const r = await run(sb, ['mount', ...bindNas(sb), '--backup', `${VM}/${TS}`, '--json', dir]);
    expect(codes(r.stdout)).toEqual(['CHAIN_UNSAFE']);
    expect(r.code).toBe(1);
    expect(logText(sb)).not.toContain('exec: qemu-nbd');
    expect(traces(sb)).toEqual(nothing);
    expect(existsSync(dir)).toBe(false);

    // A record that names a mount outside its folder is not acted on.
    const fake = join(sb.root, 'fake');
    mkdirSync(join(fake, '.nasbackup'), { recursive: true });
    const state = {
      version: 1,
      dir: fake,
      createdDir: false,
      backup: `${VM}/${TS}`,
      disk: null,
      nas: { mountPoint: sb.nas, type: 'none', address: sb.nas, mounted: true },
      server: null,
      fuse: null,
      loops: [],
      mounts: [],
    };
    writeFileSync(join(fake, '.nasbackup', 'state.json'), JSON.stringify(state));
    const logged = logText(sb).length;
    const u = await run(sb, ['umount', '--json', fake]);
    expect(codes(u.stdout)).toEqual(['NOT_OUR_MOUNT']);
    expect(u.code).toBe(1);
    expect(logText(sb).slice(logged)).not.toContain('exec:');
  });

  it('SIGTERM during mount undoes what was set up so far', async () => {
    const sb = makeSandbox('mount-signal');
    makeBackup(sb, { partitioned: true });
    const mark = join(sb.root, 'sfdisk-started');
    // sfdisk runs once qemu-nbd and nbdfuse are up: hold it there and send the signal.
    writeShim(sb, 'sfdisk', `touch '${mark}'; exec sleep 30`);
    const dir = join(sb.root, 'restore');
    const { child, done } = start(sb, ['mount', ...bindNas(sb), '--backup', `${VM}/${TS}`, '--json', dir]);
    const until = Date.now() + 20_000;
    while (!existsSync(mark) && Date.now() < until) await new Promise((r) => setTimeout(r, 20));
    expect(existsSync(mark)).toBe(true);
    expect(traces(sb).processes).toHaveLength(2);
    child.kill('SIGTERM');
    const r = await done;
    expect(codes(r.stdout)).toEqual(['INTERRUPTED']);
    expect(r.code).toBe(1);
    expect(traces(sb)).toEqual(nothing);
    expect(existsSync(dir)).toBe(false);
    expect(logText(sb)).toContain('Received SIGTERM');
  });

  it('SIGKILL during mount leaves a record from which umount undoes everything', async () => {
    const sb = makeSandbox('mount-kill');
    makeBackup(sb, { partitioned: true });
    const mark = join(sb.root, 'sfdisk-started');
    writeShim(sb, 'sfdisk', `touch '${mark}'; exec sleep 30`);
    const dir = join(sb.root, 'restore');
    const { child, done } = start(sb, ['mount', ...bindNas(sb), '--backup', `${VM}/${TS}`, dir]);
    const until = Date.now() + 20_000;
    while (!existsSync(mark) && Date.now() < until) await new Promise((r) => setTimeout(r, 20));
    expect(existsSync(mark)).toBe(true);
    child.kill('SIGKILL');
    expect((await done).signal).toBe('SIGKILL');
    // Left running (nothing could undo it), but all recorded.
    expect(traces(sb).processes).toHaveLength(2);
    const u = await run(sb, ['umount', dir]);
    expect(u.stdout).toBe(`Unmounted backup ${VM}/${TS} from ${dir}\n`);
    expect(u.code).toBe(0);
    expect(traces(sb)).toEqual(nothing);
    expect(existsSync(dir)).toBe(false);
  });

  it('reads the partition table signature itself', () => {
    const s = Buffer.alloc(512);
    expect(hasPartitionSignature(s)).toBe(false);
    s[510] = 0x55;
    s[511] = 0xaa;
    expect(hasPartitionSignature(s)).toBe(true);
    expect(hasPartitionSignature(Buffer.alloc(100))).toBe(false);
  });
});
