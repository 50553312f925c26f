// `nasbackup restore` on real qemu-img chains (two disks, five points in time, with zero,
// compressed and all-zero data clusters) on a bind-mounted folder as the NAS: every point of
// every disk restored as raw and as qcow2 must equal qemu-img's own flatten of that point.
import { execFileSync, spawnSync } from 'node:child_process';
import {
  closeSync,
  existsSync,
  mkdirSync,
  openSync,
  readdirSync,
  readFileSync,
  readSync,
  rmSync,
  statSync,
  truncateSync,
  writeFileSync,
  writeSync,
} from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { execute } from '../../lib/cli/lifecycle.js';
import { loadConfig } from '../../lib/config.js';
import { memoryLogger } from '../../lib/log.js';
import { restore, type RestoreExtent } from '../../lib/ops/restore.js';
import { BIN, bindNas, leftovers, logText, makeSandbox, run, type Sandbox } from '../helpers/cli.js';
import { writeManifestFromQemu } from '../helpers/layer-digest.js';
import { makeImage, qemuImg } from '../helpers/qemu.js';
import { removeTempDirs } from '../helpers/tmp.js';

afterAll(removeTempDirs);

const VM = 'i-2-10-VM';
const TS = ['2025.01.01.00.00.00', '2025.01.02.00.00.00', '2025.01.03.00.00.00', '2025.01.04.00.00.00', '2025.01.05.00.00.00'];
const MiB = 1 << 20;
const DISKS = [
  { vol: 'aaaaaaaa-0000-4000-8000-000000000001', file: 'root.aaaaaaaa-0000-4000-8000-000000000001.qcow2', size: 24 * MiB },
  { vol: 'bbbbbbbb-0000-4000-8000-000000000002', file: 'datadisk.bbbbbbbb-0000-4000-8000-000000000002.qcow2', size: 12 * MiB },
];

const io = (cmd: string, path: string): void => void execFileSync('qemu-io', ['-f', 'qcow2', '-c', cmd, path], { stdio: 'ignore' });

/**
 * full <- inc1 <- … <- inc4 for both disks: data, overwrites, zeroed ranges, compressed and
 * all-zero clusters; with `manifestExtent`, a manifest per backup (digests by qemu-img's view,
 * extents of that size) as a backup writes one; the odd backups' are SHA-256 (version 1); with
 * `partBytes`, the even backups' record parts (version 3), else they are version 2.
 */
function seed(sb: Sandbox, manifestExtent?: number, partBytes?: number): void {
  TS.forEach((ts, i) => {
    DISKS.forEach((d, k) => {
      const path = join(sb.nas, VM, ts, d.file);
      makeImage(path, {
        size: d.size,
        ...(i === 0 ? {} : { backing: `../${TS[i - 1]}/${d.file}` }),
        writes: [{ pattern: 0x10 * (i + 1) + k, offset: (i * 2 + k) * MiB + 4096 * i, length: 1536 * 1024 }],
      });
      if (i === 0) io(`write -P 0 ${8 * MiB} ${MiB}`, path); // allocated, but all zeros
      if (i === 1) io(`write -c -P 0x5a ${10 * MiB} 64k`, path); // compressed
      if (i === 2) io(`write -z ${MiB} ${512 * 1024}`, path); // zeroes what the full wrote
      if (i === 3) io(`discard ${2 * MiB} 64k`, path);
    });
    writeFileSync(join(sb.nas, VM, ts, 'domain-config.xml'), `<!-- ${ts} -->\n`);
    // XXH64 and SHA-256 manifests by turns, as on a host upgraded in the middle of a chain.
    if (manifestExtent !== undefined)
      writeManifestFromQemu(join(sb.nas, VM), ts, sb.root, manifestExtent, i % 2 ? 'sha256' : 'xxh64', i % 2 ? undefined : partBytes);
  });
}

const restoreArgs = (sb: Sandbox, ts: string, vol: string, to: string, ...more: string[]): string[] => [
  'restore',
  ...bindNas(sb),
  '--backup',
  `${VM}/${ts}`,
  '--disk',
  vol,
  '--to',
  to,
  ...more,
];

/** `qemu-img compare` of two images (formats given, never probed): true when the guest sees the same disk. */
function same(a: string, aFmt: string, b: string, bFmt: string): boolean {
  try {
    execFileSync('qemu-img', ['compare', '-q', '-f', aFmt, '-F', bFmt, a, b], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

/** Nothing of ours beside the target: no temporary name left in its folder. */
const temps = (dir: string): string[] => readdirSync(dir).filter((n) => n.includes('.restore-'));

describe('restore', () => {
  let sb: Sandbox;
  let out: string;
  let proven: Sandbox;
  let parted: Sandbox;
  beforeAll(() => {
    sb = makeSandbox('restore');
    seed(sb);
    out = join(sb.root, 'out');
    mkdirSync(out);
    // The same chain with manifests; 2 MiB extents, so every disk spans several (and pieces follow them).
    proven = makeSandbox('restore-proven');
    seed(proven, 2 * MiB);
    // Version-3 manifests (parts of 256 KiB) beside SHA-256 version-1 ones, as after an upgrade.
    parted = makeSandbox('restore-parted');
    seed(parted, 2 * MiB, 256 * 1024);
  });

  it.each([
    ['without manifests (structural checks, NO_MANIFEST per backup)', 'none'],
    ['with manifests (every layer proven while read)', 'extents'],
    ['with manifests in parts (version 3: proven part by part)', 'parts'],
  ] as const)('every point of every disk, raw and qcow2, equals qemu-img convert of that point: %s', async (_, how) => {
    const withManifests = how !== 'none';
    const box = how === 'parts' ? parted : withManifests ? proven : sb;
    const dir = join(box.root, withManifests ? 'out' : 'out-all');
    mkdirSync(dir);
    for (const ts of TS) {
      for (const d of DISKS) {
        const src = join(box.nas, VM, ts, d.file);
        const expected = join(dir, `expected-${ts}-${d.vol}.raw`);
        qemuImg(['convert', '-U', '-f', 'qcow2', '-O', 'raw', src, expected]);
        for (const format of ['raw', 'qcow2'] as const) {
          const to = join(dir, `${ts}-${d.vol}.${format === 'raw' ? 'img' : 'qcow2'}`);
          const r = await run(box, [...restoreArgs(box, ts, d.vol, to, '--format', format), '--json']);
          expect(r.code, r.stdout).toBe(0);
          const j = JSON.parse(r.stdout);
          expect(j).toMatchObject({
            ok: true,
            command: 'restore',
            backup: `${VM}/${ts}`,
            disk: d.vol,
            file: `${VM}/${ts}/${d.file}`,
            layers: TS.indexOf(ts) + 1,
            to,
            format,
            blockDevice: false,
            replaced: false,
            virtualSize: d.size,
            errors: [],
          });
          const noManifest = (j.warnings as Array<{ code: string; message: string }>).filter((w) => w.code === 'NO_MANIFEST');
          // One line naming every backup of the chain when nothing could be proven, none when all was.
          const chain = TS.slice(0, TS.indexOf(ts) + 1)
            .reverse()
            .map((t) => `${VM}/${t}`);
          expect(noManifest.map((w) => w.message)).toEqual(
            withManifests
              ? []
              : [
                  `No manifest in ${chain.join(', ')}: ${chain.length === 1 ? 'its' : 'their'} content was not verified (structural checks only)`,
                ],
          );
          expect(same(to, format, expected, 'raw'), `${ts} ${d.file} ${format}`).toBe(true);
          if (format === 'qcow2') {
            // Our own writer's image: a clean qcow2 (qemu-img check exits 0) with no backing.
            expect(JSON.parse(qemuImg(['info', '--output=json', to]))).toMatchObject({ format: 'qcow2' });
            expect(JSON.parse(qemuImg(['info', '--output=json', to]))['backing-filename']).toBeUndefined();
            qemuImg(['check', '-q', to]);
          }
          expect(statSync(to).mode & 0o777).toBe(0o600);
          rmSync(to);
        }
        rmSync(expected);
      }
    }
    expect(temps(dir)).toEqual([]);
    expect(leftovers(box)).toEqual({ dirs: [], mounts: [] });
    expect(existsSync(join(box.nas, VM, '.nasbackup.lock'))).toBe(false);
  });

  it('a raw target is sparse: only data is allocated (zero, unallocated and all-zero ranges are holes)', async () => {
    const d = DISKS[0]!;
    const to = join(out, 'sparse.raw');
    const r = await run(sb, [...restoreArgs(sb, TS[4]!, d.vol, to), '--json']);
    expect(r.code, r.stdout).toBe(0);
    const j = JSON.parse(r.stdout);
    expect(j.format).toBe('raw'); // the default for a name without .qcow2
    const st = statSync(to);
    expect(st.size).toBe(d.size);
    // Data written: below what the guest's nonzero ranges span (5 × 1.5 MiB + 64 KiB compressed), far below the size.
    expect(j.dataBytes).toBeGreaterThan(0);
    expect(j.dataBytes).toBeLessThanOrEqual(5 * 1536 * 1024 + 64 * 1024);
    expect(st.blocks * 512).toBeLessThanOrEqual(j.dataBytes + 256 * 1024);
    expect(st.blocks * 512).toBeGreaterThanOrEqual(j.dataBytes);
    rmSync(to);
  });

  it('an existing target is refused without --force (left as it was), replaced with it', async () => {
    const d = DISKS[1]!;
    const to = join(out, 'existing.qcow2');
    writeFileSync(to, 'precious');
    const refused = await run(sb, restoreArgs(sb, TS[2]!, d.vol, to));
    expect(refused.code).toBe(1);
    expect(refused.stdout).toBe(`${to} already exists, refusing to overwrite it (--force replaces it)\n`);
    expect(readFileSync(to, 'utf8')).toBe('precious');
    const j = JSON.parse((await run(sb, [...restoreArgs(sb, TS[2]!, d.vol, to), '--json'])).stdout);
    expect(j).toMatchObject({ ok: false, command: 'restore', errors: [{ code: 'RESTORE_TARGET_EXISTS', exitCode: 1 }] });
    const forced = await run(sb, [...restoreArgs(sb, TS[2]!, d.vol, to, '--force'), '--json']);
    expect(forced.code, forced.stdout).toBe(0);
    expect(JSON.parse(forced.stdout)).toMatchObject({ ok: true, replaced: true, format: 'qcow2' });
    expect(same(to, 'qcow2', join(sb.nas, VM, TS[2]!, d.file), 'qcow2')).toBe(true);
    expect(temps(out)).toEqual([]);
    rmSync(to);
  });

  // strace -y names the file of every flush: the target's data and its folder, or nothing of them with --no-sync.
  it.each(['raw', 'qcow2'] as const)(
    '%s: flushed to the device before the rename by default; --no-sync flushes nothing of the target, says so, restores the same disk',
    (format) => {
      const d = DISKS[0]!;
      const src = join(sb.nas, VM, TS[3]!, d.file);
      const flushes = (to: string, ...more: string[]): { json: Record<string, unknown>; lines: string[] } => {
        const trace = join(out, `strace-${format}.txt`);
        const r = spawnSync(
          'strace',
          [
            '-f',
            '-qq',
            '-y',
            '-e',
            'trace=fsync,fdatasync,sync_file_range,syncfs',
            '-o',
            trace,
            BIN,
            ...restoreArgs(sb, TS[3]!, d.vol, to, '--format', format),
            ...more,
          ],
          { env: sb.env, encoding: 'utf8' },
        );
        expect(r.status, r.stdout + r.stderr).toBe(0);
        const lines = readFileSync(trace, 'utf8')
          .split('\n')
          .filter((l) => l.includes(out));
        rmSync(trace);
        return { json: JSON.parse(r.stdout), lines };
      };
      const synced = join(out, `synced.${format}`);
      const a = flushes(synced, '--json');
      expect(a.json).toMatchObject({ ok: true, synced: true });
      // The temporary file's data, then the folder that holds the rename.
      expect(
        a.lines.some((l) => /^\d+\s+f(data)?sync\(\d+<[^>]*\.restore-[0-9a-f]+\.tmp>\)/.test(l)),
        a.lines.join('\n'),
      ).toBe(true);
      expect(
        a.lines.some((l) => l.includes(`fsync(`) && l.includes(`<${out}>)`)),
        a.lines.join('\n'),
      ).toBe(true);
      const unsynced = join(out, `unsynced.${format}`);
      const b = flushes(unsynced, '--no-sync', '--json');
      expect(b.json).toMatchObject({ ok: true, synced: false, format });
      expect(b.lines).toEqual([]);
      expect(same(unsynced, format, src, 'qcow2')).toBe(true);
      expect(same(synced, format, src, 'qcow2')).toBe(true);
      const text = spawnSync(BIN, [...restoreArgs(sb, TS[3]!, d.vol, join(out, `text.${format}`), '--format', format), '--no-sync'], {
        env: sb.env,
        encoding: 'utf8',
      });
      expect(text.stdout).toMatch(new RegExp(` as ${format} \\(not synced\\): ${d.size} bytes, \\d+ of data\n`));
      for (const f of [synced, unsynced, join(out, `text.${format}`)]) rmSync(f);
      expect(temps(out)).toEqual([]);
    },
  );

  it('unknown backup, unknown disk, a target inside the NAS or in a missing folder: coded, nothing written', async () => {
    const to = join(out, 'never.raw');
    const cases: Array<[string[], string, RegExp]> = [
      [
        restoreArgs(sb, '2030.01.01.00.00.00', DISKS[0]!.vol, to),
        'BACKUP_NOT_FOUND',
        /^No backup i-2-10-VM\/2030\.01\.01\.00\.00\.00 on this NAS$/,
      ],
      [
        ['restore', ...bindNas(sb), '--backup', `i-9-VM/${TS[0]}`, '--disk', DISKS[0]!.vol, '--to', to],
        'BACKUP_NOT_FOUND',
        /^No backups of i-9-VM on this NAS$/,
      ],
      [
        restoreArgs(sb, TS[0]!, 'cccccccc-0000', to),
        'DISK_NOT_FOUND',
        /has no disk with volume cccccccc-0000 \(disks: bbbbbbbb-[-0-9]+, aaaaaaaa-[-0-9]+\)$/,
      ],
      [restoreArgs(sb, TS[0]!, DISKS[0]!.vol, join(sb.nas, VM, 'x.raw')), 'RESTORE_TARGET_INVALID', /must be outside the NAS/],
      [restoreArgs(sb, TS[0]!, DISKS[0]!.vol, join(out, 'no', 'x.raw')), 'RESTORE_TARGET_INVALID', /folder of --to does not exist/],
      [restoreArgs(sb, TS[0]!, DISKS[0]!.vol, to, '--format', 'vmdk'), 'INVALID_ARGUMENT', /--format must be qcow2 or raw/],
      [restoreArgs(sb, '../x', DISKS[0]!.vol, to), 'PATH_TRAVERSAL', /--backup/],
      [restoreArgs(sb, TS[0]!, '../etc', to), 'INVALID_ARGUMENT', /Invalid --disk/],
    ];
    for (const [args, code, message] of cases) {
      const r = await run(sb, [...args, '--json']);
      expect(r.code, r.stdout).toBe(1);
      const j = JSON.parse(r.stdout);
      expect(j).toMatchObject({ ok: false, command: 'restore', errors: [{ code, exitCode: 1 }] });
      expect(j.errors[0].message).toMatch(message);
      expect(r.stdout.trim().split('\n')).toHaveLength(1);
    }
    expect(existsSync(to)).toBe(false);
    expect(existsSync(join(sb.nas, VM, 'x.raw'))).toBe(false);
    expect(temps(out)).toEqual([]);
    expect(leftovers(sb)).toEqual({ dirs: [], mounts: [] });
  });

  it('flags: unknown, missing or stray arguments are INVALID_OPTION; --flag=value and a value that looks like a flag are taken', async () => {
    const d = DISKS[1]!;
    const cases: Array<[string[], RegExp]> = [
      [[...restoreArgs(sb, TS[0]!, d.vol, join(out, 'f.raw')), '--bogus'], /^Unknown option '--bogus'/],
      [['restore', ...bindNas(sb), '--disk', d.vol], /^Missing required arguments: backup, to$/],
      [[...restoreArgs(sb, TS[0]!, d.vol, join(out, 'f.raw')), 'stray'], /^Unexpected argument 'stray'/],
      [['restore', ...bindNas(sb), '--backup', `${VM}/${TS[0]}`, '--disk'], /^Not enough arguments following: disk$/],
    ];
    for (const [args, message] of cases) {
      const r = await run(sb, ['restore', '--json', ...args.slice(1)]);
      expect(r.code, r.stdout).toBe(1);
      const j = JSON.parse(r.stdout);
      expect(j).toMatchObject({ ok: false, command: 'restore', errors: [{ code: 'INVALID_OPTION' }] });
      expect(j.errors[0].message).toMatch(message);
    }
    const to = join(out, 'eq.raw');
    const ok = await run(sb, [
      'restore',
      '-t',
      'none',
      `--storage=${sb.nas}`,
      '-m',
      'bind',
      `--backup=${VM}/${TS[0]}`,
      '--disk',
      d.vol,
      `--to=${to}`,
      '--json',
    ]);
    expect(ok.code, ok.stdout).toBe(0);
    expect(JSON.parse(ok.stdout)).toMatchObject({ ok: true, to, format: 'raw' });
    rmSync(to);
    expect(readdirSync(out).filter((n) => n.startsWith('f.'))).toEqual([]);
  });

  it('--help names the command and its flags', async () => {
    const r = await run(sb, ['restore', '--help']);
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/^Usage: nasbackup restore -t <type> -s <address> .*--backup <instance>\/<timestamp> --disk <volume uuid>/);
  });
});

describe('restore of a broken chain', () => {
  it('a missing middle layer fails (CHAIN_BROKEN) and leaves no target and no temporary file', async () => {
    const sb = makeSandbox('restore-broken');
    seed(sb);
    const out = join(sb.root, 'out');
    mkdirSync(out);
    rmSync(join(sb.nas, VM, TS[2]!, DISKS[1]!.file));
    for (const format of ['raw', 'qcow2']) {
      const to = join(out, `broken.${format}`);
      const r = await run(sb, [...restoreArgs(sb, TS[4]!, DISKS[1]!.vol, to, '--format', format), '--json']);
      expect(r.code).toBe(1);
      expect(JSON.parse(r.stdout)).toMatchObject({ ok: false, errors: [{ code: 'CHAIN_BROKEN' }] });
    }
    expect(readdirSync(out)).toEqual([]);
    // The other disk of the same backup is whole: it restores.
    const ok = await run(sb, restoreArgs(sb, TS[4]!, DISKS[0]!.vol, join(out, 'root.raw')));
    expect(ok.code, ok.stdout).toBe(0);
    const line = `restored ${VM}/${TS[4]}/${DISKS[0]!.file} (5 layer(s)) to ${join(out, 'root.raw')} as raw: ${DISKS[0]!.size} bytes, `;
    expect(ok.stdout.startsWith(line)).toBe(true);
    expect(ok.stdout.slice(line.length)).toMatch(
      /^\d+ of data\nwarning: No manifest in i-2-10-VM\/2025\.01\.05\.00\.00\.00, .*\(structural checks only\)\n$/,
    );
    expect(leftovers(sb)).toEqual({ dirs: [], mounts: [] });
  });
});

describe('restore extension point', () => {
  it('the inspector sees every range of the disk once, with the data it reads; a throwing inspector leaves nothing', async () => {
    const sb = makeSandbox('restore-verify');
    seed(sb);
    const out = join(sb.root, 'out');
    mkdirSync(out);
    const d = DISKS[0]!;
    const to = join(out, 'v.raw');
    const config = loadConfig({ ...sb.env }, {});
    const nas = { type: 'none', address: sb.nas, options: 'bind' };
    const args = { nas, vm: VM, backup: TS[3]!, disk: d.vol, to, format: 'raw' as const, force: false };
    const seen: RestoreExtent[] = [];
    const prevTmp = process.env.TMPDIR;
    process.env.TMPDIR = sb.tmp;
    try {
      const ok = await execute({ out: { write() {} }, env: sb.env, onSignal: () => () => {} }, config, memoryLogger(), (ctx) =>
        restore(ctx, args, { inspect: (e) => void seen.push({ ...e, data: e.data && Buffer.from(e.data) }) }),
      );
      expect(ok.errors).toEqual([]);
      // The pieces tile the disk exactly, and each one's data is what was written there.
      const sorted = [...seen].sort((a, b) => a.offset - b.offset);
      let pos = 0;
      const written = readFileSync(to);
      for (const e of sorted) {
        expect(e.offset).toBe(pos);
        if (e.data) expect(e.data.equals(written.subarray(e.offset, e.offset + e.length))).toBe(true);
        else expect(written.subarray(e.offset, e.offset + e.length).every((b) => b === 0)).toBe(true);
        pos += e.length;
      }
      expect(pos).toBe(d.size);
      rmSync(to);
      const failed = await execute({ out: { write() {} }, env: sb.env, onSignal: () => () => {} }, config, memoryLogger(), (ctx) =>
        restore(ctx, args, {
          inspect: (e) => {
            if (e.offset >= 4 * MiB) throw new Error('digest mismatch');
          },
        }),
      );
      expect(failed.errors.map((e) => e.message)).toEqual(['Internal error: digest mismatch']);
      expect(readdirSync(out)).toEqual([]);
      expect(leftovers(sb)).toEqual({ dirs: [], mounts: [] });
    } finally {
      if (prevTmp === undefined) delete process.env.TMPDIR;
      else process.env.TMPDIR = prevTmp;
    }
  });
});

describe('restore: the VM lock and a read-only NAS', () => {
  it('waits for the VM lock held by a live operation (a delete could change the chain), then fails writing nothing', async () => {
    const sb = makeSandbox('restore-locked');
    seed(sb);
    const out = join(sb.root, 'out');
    mkdirSync(out);
    const { hostname } = await import('node:os');
    const { processStart } = await import('../../lib/nas/lock.js');
    const pidStart = await processStart(process.pid);
    const lock = join(sb.nas, VM, '.nasbackup.lock');
    writeFileSync(lock, JSON.stringify({ host: hostname(), pid: process.pid, pidStart, startedAt: 'now', operation: 'chain delete' }));
    const r = await run(sb, [...restoreArgs(sb, TS[1]!, DISKS[0]!.vol, join(out, 'x.raw')), '--json'], { NASBACKUP_LOCK_WAIT: '0.5' });
    expect(r.code).toBe(1);
    expect(JSON.parse(r.stdout)).toMatchObject({ ok: false, errors: [{ code: 'LOCKED' }] });
    expect(readdirSync(out)).toEqual([]);
    expect(existsSync(lock)).toBe(true); // not ours: left alone
    expect(leftovers(sb)).toEqual({ dirs: [], mounts: [] });
  });

  it('a read-only NAS cannot hold the lock: the restore reads without it and says so (NOT_LOCKED)', async () => {
    const sb = makeSandbox('restore-ro');
    seed(sb);
    const out = join(sb.root, 'out');
    mkdirSync(out);
    const to = join(out, 'ro.qcow2');
    const r = await run(sb, [
      'restore',
      '-t',
      'none',
      '-s',
      sb.nas,
      '-m',
      'bind,ro',
      '--backup',
      `${VM}/${TS[4]}`,
      '--disk',
      DISKS[1]!.vol,
      '--to',
      to,
    ]);
    expect(r.code, r.stdout).toBe(0);
    expect(r.stdout).toMatch(
      /\nwarning: The NAS is read-only: i-2-10-VM's backups were read without the VM lock\nwarning: No manifest in /,
    );
    expect(same(to, 'qcow2', join(sb.nas, VM, TS[4]!, DISKS[1]!.file), 'qcow2')).toBe(true);
    expect(leftovers(sb)).toEqual({ dirs: [], mounts: [] });
  });
});

describe('restore onto a block device (a loop device)', () => {
  it('needs --force, refuses qcow2 and a device smaller than the disk, and writes zeros over old data', async () => {
    const sb = makeSandbox('restore-dev');
    seed(sb);
    const d = DISKS[0]!;
    const devices: string[] = [];
    const loop = (file: string, size: number): string => {
      writeFileSync(file, Buffer.alloc(size, 0xee)); // old data the restore must overwrite, zeros included
      const dev = execFileSync('losetup', ['-f', '--show', file], { encoding: 'utf8' }).trim();
      devices.push(dev);
      return dev;
    };
    try {
      const dev = loop(join(sb.root, 'dev.img'), d.size + MiB);
      const small = loop(join(sb.root, 'small.img'), d.size - MiB);
      const refused = await run(sb, [...restoreArgs(sb, TS[4]!, d.vol, dev), '--json']);
      expect(JSON.parse(refused.stdout)).toMatchObject({ ok: false, errors: [{ code: 'RESTORE_TARGET_EXISTS' }] });
      const qcow2 = await run(sb, [...restoreArgs(sb, TS[4]!, d.vol, dev, '--force', '--format', 'qcow2'), '--json']);
      expect(JSON.parse(qcow2.stdout)).toMatchObject({ ok: false, errors: [{ code: 'RESTORE_TARGET_INVALID' }] });
      const tooSmall = await run(sb, [...restoreArgs(sb, TS[4]!, d.vol, small, '--force'), '--json']);
      expect(JSON.parse(tooSmall.stdout)).toMatchObject({ ok: false, errors: [{ code: 'RESTORE_TARGET_INVALID' }] });
      expect(JSON.parse(tooSmall.stdout).errors[0].message).toMatch(/holds 24117248 bytes, the disk needs 25165824/);
      const ok = await run(sb, [...restoreArgs(sb, TS[4]!, d.vol, dev, '--force'), '--json']);
      expect(ok.code, ok.stdout).toBe(0);
      expect(JSON.parse(ok.stdout)).toMatchObject({ ok: true, blockDevice: true, replaced: true, format: 'raw', to: dev });
      const expected = join(sb.root, 'expected.raw');
      qemuImg(['convert', '-U', '-f', 'qcow2', '-O', 'raw', join(sb.nas, VM, TS[4]!, d.file), expected]);
      const written = readFileSync(join(sb.root, 'dev.img'));
      expect(written.subarray(0, d.size).equals(readFileSync(expected))).toBe(true);
      expect(written.subarray(d.size).every((b) => b === 0xee)).toBe(true); // past the disk: untouched
      expect(leftovers(sb)).toEqual({ dirs: [], mounts: [] });
    } finally {
      for (const dev of devices) execFileSync('losetup', ['-d', dev]);
    }
  });
});

describe('restore: the target is never on the NAS, and an interrupted restore leaves nothing', () => {
  it('a target on another mount of the NAS file system is refused (same file system)', async () => {
    const sb = makeSandbox('restore-samefs');
    const img = join(sb.root, 'nas.img');
    execFileSync('truncate', ['-s', '64M', img]);
    execFileSync('mkfs.ext4', ['-q', '-F', img]);
    const dev = execFileSync('losetup', ['-f', '--show', img], { encoding: 'utf8' }).trim();
    const other = join(sb.root, 'other');
    mkdirSync(other);
    try {
      execFileSync('mount', [dev, other]);
      try {
        makeImage(join(other, VM, TS[0]!, DISKS[1]!.file), { size: 4 * MiB, writes: [{ pattern: 0x42, offset: 0, length: MiB }] });
        mkdirSync(join(other, 'restores'));
        const nas = ['-t', 'ext4', '-s', dev, '-m', ''];
        const args = (to: string): string[] => [
          'restore',
          ...nas,
          '--backup',
          `${VM}/${TS[0]}`,
          '--disk',
          DISKS[1]!.vol,
          '--to',
          to,
          '--json',
        ];
        const refused = await run(sb, args(join(other, 'restores', 'x.raw')));
        expect(JSON.parse(refused.stdout)).toMatchObject({ ok: false, errors: [{ code: 'RESTORE_TARGET_INVALID' }] });
        expect(JSON.parse(refused.stdout).errors[0].message).toMatch(/on the NAS's file system/);
        expect(readdirSync(join(other, 'restores'))).toEqual([]);
        const ok = await run(sb, args(join(sb.root, 'x.raw')));
        expect(ok.code, ok.stdout).toBe(0);
        expect(same(join(sb.root, 'x.raw'), 'raw', join(other, VM, TS[0]!, DISKS[1]!.file), 'qcow2')).toBe(true);
        // A NAS on a local disk's file system (ext4): the chain's data was read past the page cache.
        expect(logText(sb)).toMatch(/of data; [1-9]\d* bytes of the chain read past the page cache\)/);
        expect(leftovers(sb)).toEqual({ dirs: [], mounts: [] });
      } finally {
        execFileSync('umount', [other]);
      }
    } finally {
      execFileSync('losetup', ['-d', dev]);
    }
  });

  it('SIGTERM while the qcow2 image is being written: INTERRUPTED, the temporary image removed, nothing mounted', async () => {
    const sb = makeSandbox('restore-term');
    seed(sb, 2 * MiB);
    const out = join(sb.root, 'out');
    mkdirSync(out);
    const config = loadConfig({ ...sb.env }, {});
    const args = { nas: { type: 'none', address: sb.nas, options: 'bind' }, vm: VM, backup: TS[4]!, disk: DISKS[0]!.vol };
    let signal: ((s: NodeJS.Signals) => void) | null = null;
    let seenTemp: string[] = [];
    const prevTmp = process.env.TMPDIR;
    process.env.TMPDIR = sb.tmp;
    try {
      const r = await execute(
        { out: { write() {} }, env: sb.env, onSignal: (h) => ((signal = h), () => {}) },
        config,
        memoryLogger(),
        (ctx) =>
          restore(
            ctx,
            { ...args, to: join(out, 'x.qcow2'), format: 'qcow2', force: false },
            {
              // Half way through the disk, the image being written exists under its temporary name.
              inspect: (e) => {
                if (e.offset >= 12 * MiB && signal) {
                  seenTemp = temps(out);
                  signal('SIGTERM');
                  signal = null;
                }
              },
            },
          ),
      );
      expect(seenTemp).toHaveLength(1);
      expect(r.errors.map((e) => e.code)).toEqual(['INTERRUPTED']);
      expect(readdirSync(out)).toEqual([]);
      expect(leftovers(sb)).toEqual({ dirs: [], mounts: [] });
      expect(existsSync(join(sb.nas, VM, '.nasbackup.lock'))).toBe(false);
    } finally {
      if (prevTmp === undefined) delete process.env.TMPDIR;
      else process.env.TMPDIR = prevTmp;
    }
  });
});

describe('restore of a layer damaged where only a read finds it', () => {
  it('a compressed cluster that does not decompress: CHAIN_CORRUPT, no target, no temporary file', async () => {
    const sb = makeSandbox('restore-damaged');
    seed(sb);
    const out = join(sb.root, 'out');
    mkdirSync(out);
    const d = DISKS[0]!;
    const layer = join(sb.nas, VM, TS[1]!, d.file); // the layer with the compressed cluster
    const { Qcow2Image } = await import('../../lib/qcow2/index.js');
    const img = await Qcow2Image.open(layer);
    const s = await img.status(10 * MiB, 64 * 1024);
    await img.close();
    expect(s.kind).toBe('compressed');
    const fd = openSync(layer, 'r+');
    writeSync(fd, Buffer.alloc(512, 0xa5), 0, 512, s.compressed!.host);
    closeSync(fd);
    const r = await run(sb, [...restoreArgs(sb, TS[4]!, d.vol, join(out, 'x.raw')), '--json']);
    expect(r.code).toBe(1);
    const j = JSON.parse(r.stdout);
    expect(j).toMatchObject({ ok: false, errors: [{ code: 'CHAIN_CORRUPT' }] });
    expect(j.errors[0].message).toMatch(/does not decompress/);
    expect(readdirSync(out)).toEqual([]);
    expect(leftovers(sb)).toEqual({ dirs: [], mounts: [] });
  });
});

describe('restore proves every layer while it reads it (manifests)', () => {
  /** A chain with manifests (2 MiB extents), and a folder for targets. */
  const proven = (tag: string): { sb: Sandbox; out: string } => {
    const sb = makeSandbox(tag);
    seed(sb, 2 * MiB);
    const out = join(sb.root, 'out');
    mkdirSync(out);
    return { sb, out };
  };
  /** The host offset of guest byte `guest` in one layer (its own data cluster). */
  const hostOf = async (layer: string, guest: number): Promise<number> => {
    const { Qcow2Image } = await import('../../lib/qcow2/index.js');
    const img = await Qcow2Image.open(layer);
    try {
      const s = await img.status(guest, 1);
      expect(s.kind).toBe('data');
      return s.host!;
    } finally {
      await img.close();
    }
  };
  const flip = (file: string, at: number): void => {
    const fd = openSync(file, 'r+');
    const b = Buffer.alloc(1);
    readSync(fd, b, 0, 1, at);
    b[0] = b[0]! ^ 0xff;
    writeSync(fd, b, 0, 1, at);
    closeSync(fd);
  };
  /** Restore (raw and qcow2) fails with BACKUP_DAMAGED and `message`; nothing is left anywhere. */
  const refused = async (sb: Sandbox, out: string, ts: string, vol: string, message: string): Promise<void> => {
    for (const format of ['raw', 'qcow2']) {
      const to = join(out, `x.${format}`);
      const r = await run(sb, [...restoreArgs(sb, ts, vol, to, '--format', format), '--json']);
      expect(r.code, r.stdout).toBe(1);
      const j = JSON.parse(r.stdout);
      expect(j).toMatchObject({ ok: false, command: 'restore', errors: [{ code: 'BACKUP_DAMAGED', exitCode: 1 }] });
      expect(j.errors[0].message).toBe(message);
      const text = await run(sb, restoreArgs(sb, ts, vol, to, '--format', format));
      expect(text.stdout).toBe(`${message}\n`);
      expect(readdirSync(out)).toEqual([]);
    }
    expect(leftovers(sb)).toEqual({ dirs: [], mounts: [] });
    expect(existsSync(join(sb.nas, VM, '.nasbackup.lock'))).toBe(false);
  };
  const d0 = DISKS[0]!;
  const d1 = DISKS[1]!;
  const ext = (i: number): string => `extent ${i} (guest bytes ${i * 2 * MiB}-${(i + 1) * 2 * MiB})`;
  /** An empty sandbox, a folder for targets, and the paths of disk 0's full and first incremental (the caller makes them). */
  const fullAndIncremental = (tag: string) => {
    const sb = makeSandbox(tag);
    const out = join(sb.root, 'out');
    mkdirSync(out);
    const [t0, t1] = [TS[0]!, TS[1]!];
    return { sb, out, t0, t1, full: join(sb.nas, VM, t0, d0.file), inc: join(sb.nas, VM, t1, d0.file) };
  };

  it('a flipped byte a newer backup hides, in an extent that still shows elsewhere, fails the restore (that extent is proven whole)', async () => {
    const { sb, out } = proven('restore-shadowed');
    // The full's data at 1 MiB is zeroed by the third backup: no read of the newest point touches it…
    const full = join(sb.nas, VM, TS[0]!, d0.file);
    const before = join(sb.root, 'before.raw');
    qemuImg(['convert', '-U', '-f', 'qcow2', '-O', 'raw', join(sb.nas, VM, TS[4]!, d0.file), before]);
    flip(full, (await hostOf(full, MiB + 100)) + 100);
    expect(same(join(sb.nas, VM, TS[4]!, d0.file), 'qcow2', before, 'raw')).toBe(true);
    // …but its layer is proven whole, so the damage is found.
    await refused(
      sb,
      out,
      TS[4]!,
      d0.vol,
      `Backup ${VM}/${TS[0]} is damaged: disk ${d0.file}, ${ext(0)}: the content does not match the digest in the manifest`,
    );
    // The other disk of the same backups is intact.
    const ok = await run(sb, [...restoreArgs(sb, TS[4]!, d1.vol, join(out, 'd1.raw')), '--json']);
    expect(ok.code, ok.stdout).toBe(0);
    expect(JSON.parse(ok.stdout).warnings).toEqual([]);
  });

  it('an extent a newer backup wholly hides is not read: damage there leaves the restore exact; the point that sees it fails; chain verify finds it', async () => {
    const { sb, out, t0, t1, full, inc } = fullAndIncremental('restore-hidden');
    // The full holds extent 0 (0-2 MiB) and extent 2 (4-6 MiB); the incremental rewrites all of extent 2.
    makeImage(full, {
      size: 8 * MiB,
      writes: [
        { pattern: 0x11, offset: 0, length: MiB },
        { pattern: 0x22, offset: 4 * MiB, length: 2 * MiB },
      ],
    });
    writeManifestFromQemu(join(sb.nas, VM), t0, sb.root, 2 * MiB);
    makeImage(inc, { backing: `../${t0}/${d0.file}`, writes: [{ pattern: 0x33, offset: 4 * MiB, length: 2 * MiB }] });
    writeManifestFromQemu(join(sb.nas, VM), t1, sb.root, 2 * MiB);
    flip(full, (await hostOf(full, 5 * MiB)) + 7);
    // The newest point: the hidden extent is never read, so nothing is refused, and nothing of it is in the target.
    for (const format of ['raw', 'qcow2']) {
      const to = join(out, `new.${format}`);
      const r = await run(sb, [...restoreArgs(sb, t1, d0.vol, to, '--format', format), '--json']);
      expect(r.code, r.stdout).toBe(0);
      expect(JSON.parse(r.stdout).warnings).toEqual([]);
      expect(same(to, format, inc, 'qcow2')).toBe(true);
    }
    // The full's own point sees that extent: refused.
    const older = await run(sb, [...restoreArgs(sb, t0, d0.vol, join(out, 'old.raw')), '--json']);
    expect(older.code, older.stdout).toBe(1);
    expect(JSON.parse(older.stdout).errors[0].message).toBe(
      `Backup ${VM}/${t0} is damaged: disk ${d0.file}, ${ext(2)}: the content does not match the digest in the manifest`,
    );
    expect(existsSync(join(out, 'old.raw'))).toBe(false);
    // chain verify proves every extent, hidden or not.
    const v = await run(sb, ['chain', 'verify', ...bindNas(sb), '--vm', VM]);
    expect(v.code, v.stdout).not.toBe(0);
    expect(v.stdout).toContain(`${t0}`);
    expect(v.stdout).toContain('extent 2');
  });

  it('with parts (version 3), only the parts the guest sees are read and proven: damage in a hidden part of a shown extent leaves the restore exact; in a shown part it fails, naming extent and part', async () => {
    const { sb, out, t0, t1, full, inc } = fullAndIncremental('restore-parts');
    const KiB = 1024;
    // Extent 2 of the full (4-6 MiB) in four parts of 512 KiB; the incremental hides its first two (4-5 MiB) only.
    makeImage(full, { size: 8 * MiB, writes: [{ pattern: 0x22, offset: 4 * MiB, length: 2 * MiB }] });
    writeManifestFromQemu(join(sb.nas, VM), t0, sb.root, 2 * MiB, 'xxh64', 512 * KiB);
    makeImage(inc, { backing: `../${t0}/${d0.file}`, writes: [{ pattern: 0x33, offset: 4 * MiB, length: MiB }] });
    writeManifestFromQemu(join(sb.nas, VM), t1, sb.root, 2 * MiB, 'xxh64', 512 * KiB);
    const restoreNewest = async () => run(sb, [...restoreArgs(sb, t1, d0.vol, join(out, 'new.raw')), '--json']);
    // Damage in part 1 (4.5-5 MiB, hidden): with the whole extent proven (version 2) this failed; now the restore is exact.
    flip(full, (await hostOf(full, 4 * MiB + 600 * KiB)) + 3);
    const r = await restoreNewest();
    expect(r.code, r.stdout).toBe(0);
    expect(JSON.parse(r.stdout).warnings).toEqual([]);
    expect(same(join(out, 'new.raw'), 'raw', inc, 'qcow2')).toBe(true);
    rmSync(join(out, 'new.raw'));
    // The full's own point sees that part: refused, naming it.
    const older = await run(sb, [...restoreArgs(sb, t0, d0.vol, join(out, 'old.raw')), '--json']);
    expect(older.code, older.stdout).toBe(1);
    expect(JSON.parse(older.stdout).errors[0].message).toBe(
      `Backup ${VM}/${t0} is damaged: disk ${d0.file}, extent 2, part 1 (guest bytes ${4 * MiB + 512 * KiB}-${5 * MiB}): the content does not match the digest in the manifest`,
    );
    // chain verify proves every part, and names the first that differs.
    const v = await run(sb, ['chain', 'verify', ...bindNas(sb), '--vm', VM]);
    expect(v.code, v.stdout).not.toBe(0);
    expect(v.stdout).toContain(`extent 2: digest mismatch (part 1, guest bytes ${4 * MiB + 512 * KiB}-${5 * MiB} of 4 parts)`);
    // Damage in part 3 (5.5-6 MiB), which the newest point shows: refused there too, nothing left.
    flip(full, (await hostOf(full, 5 * MiB + 700 * KiB)) + 5);
    const bad = await restoreNewest();
    expect(bad.code, bad.stdout).toBe(1);
    expect(JSON.parse(bad.stdout).errors[0].message).toBe(
      `Backup ${VM}/${t0} is damaged: disk ${d0.file}, extent 2, part 3 (guest bytes ${5 * MiB + 512 * KiB}-${6 * MiB}): the content does not match the digest in the manifest`,
    );
    expect(readdirSync(out)).toEqual([]);
    expect(leftovers(sb)).toEqual({ dirs: [], mounts: [] });
  });

  it('a flipped byte in data the guest sees fails the restore; an older point without that layer still restores', async () => {
    const { sb, out } = proven('restore-visible');
    const top = join(sb.nas, VM, TS[4]!, d0.file);
    flip(top, await hostOf(top, 8 * MiB + MiB / 2));
    await refused(
      sb,
      out,
      TS[4]!,
      d0.vol,
      `Backup ${VM}/${TS[4]} is damaged: disk ${d0.file}, ${ext(4)}: the content does not match the digest in the manifest`,
    );
    const to = join(out, 'older.raw');
    const ok = await run(sb, restoreArgs(sb, TS[3]!, d0.vol, to));
    expect(ok.code, ok.stdout).toBe(0);
    expect(same(to, 'raw', join(sb.nas, VM, TS[3]!, d0.file), 'qcow2')).toBe(true);
  });

  it('a truncated layer (its last data cluster cut short) fails the restore at that extent', async () => {
    const { sb, out } = proven('restore-truncated');
    const layer = join(sb.nas, VM, TS[3]!, d1.file);
    // That backup wrote 1.5 MiB at 7 MiB + 12 KiB: its last data cluster is the end of the file.
    const last = await hostOf(layer, 7 * MiB + 12 * 1024 + 1536 * 1024 - 1);
    expect(statSync(layer).size).toBe(last - (last % 65536) + 65536);
    // Cut inside what the backup wrote there (12 KiB at the start of that cluster), not only its zero tail.
    truncateSync(layer, last - (last % 65536) + 4096);
    await refused(
      sb,
      out,
      TS[4]!,
      d1.vol,
      `Backup ${VM}/${TS[3]} is damaged: disk ${d1.file}, ${ext(4)}: the content does not match the digest in the manifest`,
    );
  });

  it('manifests are read ahead but judged newest first: of two unusable ones the newer is named, and nothing is left mounted', async () => {
    const { sb, out } = proven('restore-two-manifests');
    const unusable = (ts: string): void => {
      const mf = join(sb.nas, VM, ts, 'manifest.json');
      writeFileSync(mf, readFileSync(mf, 'utf8').replace(/"version": [123]/, '"version": "one"'));
    };
    unusable(TS[1]!);
    unusable(TS[3]!);
    const why = 'manifest.json is unusable: version "one" is not supported (this reader knows 1 to 3)';
    await refused(sb, out, TS[4]!, d0.vol, `Backup ${VM}/${TS[3]} is damaged: ${why}`);
    await refused(sb, out, TS[2]!, d0.vol, `Backup ${VM}/${TS[1]} is damaged: ${why}`);
  });

  it('a manifest edited by hand: a changed digest names its extent, a broken one is refused, a removed one is a warning', async () => {
    const { sb, out } = proven('restore-edited');
    const mf = join(sb.nas, VM, TS[2]!, 'manifest.json');
    const original = readFileSync(mf, 'utf8');
    const m = JSON.parse(original) as { disks: Array<{ file: string; extents: Array<{ index: number; digest: string }> }> };
    const entry = m.disks.find((x) => x.file === d1.file)!;
    const edited = entry.extents[1]!;
    edited.digest = edited.digest.replace(/^./, (c) => (c === '0' ? '1' : '0'));
    writeFileSync(mf, JSON.stringify(m, null, 2));
    await refused(
      sb,
      out,
      TS[3]!,
      d1.vol,
      `Backup ${VM}/${TS[2]} is damaged: disk ${d1.file}, ${ext(edited.index)}: the content does not match the digest in the manifest`,
    );
    writeFileSync(mf, original.replace(/"version": [123]/, '"version": "one"'));
    await refused(
      sb,
      out,
      TS[3]!,
      d1.vol,
      `Backup ${VM}/${TS[2]} is damaged: manifest.json is unusable: version "one" is not supported (this reader knows 1 to 3)`,
    );
    // An extent the layer holds that the manifest does not list.
    const dropped = JSON.parse(original) as typeof m;
    dropped.disks.find((x) => x.file === d1.file)!.extents.shift();
    writeFileSync(mf, JSON.stringify(dropped));
    const first = entry.extents[0]!.index;
    await refused(
      sb,
      out,
      TS[3]!,
      d1.vol,
      `Backup ${VM}/${TS[2]} is damaged: disk ${d1.file}, ${ext(first)}: the layer holds data where its manifest records none`,
    );
    // No manifest at all (a backup older than manifests): restored, that backup named in a warning.
    rmSync(mf);
    const to = join(out, 'warned.raw');
    const r = await run(sb, [...restoreArgs(sb, TS[3]!, d1.vol, to), '--json']);
    expect(r.code, r.stdout).toBe(0);
    expect(JSON.parse(r.stdout).warnings).toEqual([
      { code: 'NO_MANIFEST', message: `No manifest in ${VM}/${TS[2]}: its content was not verified (structural checks only)` },
    ]);
    expect(same(to, 'raw', join(sb.nas, VM, TS[3]!, d1.file), 'qcow2')).toBe(true);
  });
});

describe('restore progress', () => {
  it('a bar on stderr when it is a terminal (to 100%), none with --json or without a terminal', async () => {
    const sb = makeSandbox('restore-progress');
    seed(sb, 2 * MiB);
    const out = join(sb.root, 'out');
    mkdirSync(out);
    const d = DISKS[0]!;
    const shell = (args: string[]): string => args.map((x) => `'${x}'`).join(' ');
    // `script` gives the command a terminal for stdout and stderr, and copies what it draws.
    const onTty = (args: string[]): string =>
      execFileSync(
        'script',
        ['-qfec', `${shell(['env', ...Object.entries(sb.env).map(([k, v]) => `${k}=${v}`), BIN, ...args])}`, '/dev/null'],
        {
          encoding: 'utf8',
        },
      );
    const text = onTty(restoreArgs(sb, TS[4]!, d.vol, join(out, 'a.qcow2')));
    expect(text).toContain('restore [');
    expect(text).toContain(`100% | 24/24 MiB`);
    expect(text).toContain(`restored ${VM}/${TS[4]}/${d.file} (5 layer(s)) to ${join(out, 'a.qcow2')} as qcow2`);
    const json = onTty([...restoreArgs(sb, TS[4]!, d.vol, join(out, 'b.qcow2')), '--json']);
    expect(json).not.toContain('restore [');
    expect(JSON.parse(json)).toMatchObject({ ok: true });
    const plain = await run(sb, restoreArgs(sb, TS[4]!, d.vol, join(out, 'c.qcow2')));
    expect(plain.code, plain.stdout).toBe(0);
    expect(plain.stderr).toBe('');
  });
});

describe('restore memory stays bounded on deep chains', () => {
  it('pieces are as large as PIECE, divide every manifest extent, and the pool holds a smallest piece reading every layer', async () => {
    const { pieceSizes, pieceBytesFor, BUFFER_BYTES, PIECE, SLOT_BYTES } = await import('../../lib/ops/flatten.js');
    type Img = Parameters<typeof pieceSizes>[0][number];
    const chain = (n: number, sub = 65536): Img[] => Array.from({ length: n }, () => ({ subclusterSize: sub }) as Img);
    const none = (n: number) => Array.from({ length: n }, () => null);
    // Requests stay PIECE-sized however deep the chain: memory is bounded by the pool, not by the piece.
    for (const n of [1, 2, 5, 8]) expect(pieceSizes(chain(n), none(n))).toEqual({ max: PIECE, min: MiB, slot: SLOT_BYTES, slots: 8 });
    expect(BUFFER_BYTES).toBe(8 * SLOT_BYTES);
    // Deeper chains: the pool grows to one smallest piece per layer (1 MiB, or the layers' unit).
    expect(pieceSizes(chain(50), none(50))).toMatchObject({ min: MiB, slots: 50 });
    expect(pieceSizes(chain(100, 2 * MiB), none(100))).toMatchObject({ max: PIECE, min: 2 * MiB, slot: MiB, slots: 200 });
    for (const n of [1, 3, 5, 8, 50]) {
      const z = pieceSizes(chain(n), none(n));
      expect(n * Math.ceil(z.min / z.slot)).toBeLessThanOrEqual(z.slots);
      expect(z.max % z.min).toBe(0);
    }
    const e = { backup: 'b', file: 'f', extentBytes: 3 * 512 * 1024, algorithm: 'xxh64' as const, digests: new Map() };
    expect(pieceBytesFor(chain(2), [e, null])).toBe(512 * 1024);
    expect(pieceSizes(chain(2), [e, null])).toMatchObject({ max: 512 * 1024, min: 512 * 1024, slot: 512 * 1024, slots: 16 });
  });
});
