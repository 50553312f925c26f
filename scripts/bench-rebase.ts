// Benchmark (not a test): the native in-chain safe rebase against `qemu-img rebase` on the
// same chains in one run, locally and over a throughput-bound NAS, plus the physical floor
// (reading and writing the bytes that must move, pipelined, then fdatasync). Issue 18 (c)/(d).
//   npm run bench:rebase [-- --shapes contig,frag,move4g,thin --runs 5 --scale 1
//                           --baseline /other/checkout (its built engine too, each round)
//                           --nas auto|off|only --nas-scale 0.125 --nas-link netns|lo --nas-rate 400mbit]
// Shapes (chain full F ← middle I ← child C, C rebased onto F: "delete the middle incremental"):
//   contig  8 GiB disk, I = 1 GiB contiguous
//   frag    8 GiB disk, I = 1 MiB every 2 MiB over 2 GiB (1 GiB to move)
//   move4g  16 GiB disk, I = 1 MiB every 2 MiB over 8 GiB (4 GiB to move)
//   thin    100 GiB disk, I = 1 GiB spread thin (1 MiB every 100 MiB)
// F holds data under all of I (qemu-img compares against it); C writes 1 MiB every 64 MiB.
// --scale multiplies every size (e.g. 0.0625 while developing); the NAS runs use --nas-scale.
// Per shape and run, caches dropped before each: qemu-img rebase, the native engine (node with the
// launcher's V8 flags), the floor. Then once: the native rebase through the CLI (bin/nasbackup
// -o rebase, bind "NAS", a stand-in virsh) for its peak RSS, and the idle CLI (--version).
// Medians with min–max, paired ratios (median and range of the per-run ratios).
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { loadAverage, machineLine, median, spread as minMax } from './lib/stats.js';

const argv = process.argv.slice(2);
const opt = (name: string, dflt: string): string => {
  const i = argv.indexOf(`--${name}`);
  return i >= 0 && argv[i + 1] ? argv[i + 1]! : dflt;
};
const SHAPES = opt('shapes', 'contig,frag,move4g,thin').split(',');
const SCALE = Number(opt('scale', '1'));
const NAS_SCALE = Number(opt('nas-scale', '0.125'));
const NAS_MODE = opt('nas', 'auto');
const NAS_LINK = opt('nas-link', 'netns');
const NAS_RATE = opt('nas-rate', '400mbit');
const RUNS = Math.max(1, Number(opt('runs', '5')));
const ROOT = fileURLToPath(new URL('..', import.meta.url));
const DIST_REBASE = path.join(ROOT, 'dist/lib/qcow2/rebase.js');
/** Another checkout (built), whose engine runs beside ours in every round: an A/B of a change. */
const BASELINE = opt('baseline', '');
const BIN = path.join(ROOT, 'bin/nasbackup');
/** The launcher's V8 flags (lib/install/launcher.ts NODE_FLAGS), so the engine runs as it does there. */
const NODE_FLAGS = (/^#!\/usr\/bin\/env -S (?:-u \S+ )*node (.*)$/m.exec(fs.readFileSync(BIN, 'utf8'))?.[1] ?? '')
  .split(' ')
  .filter(Boolean);
const MiB = 1 << 20;

const fmtB = (n: number): string => (n >= 1 << 30 ? `${(n / (1 << 30)).toFixed(2)} GiB` : `${(n / MiB).toFixed(1)} MiB`);

function dropCaches(): void {
  spawnSync('sync');
  try {
    fs.writeFileSync('/proc/sys/vm/drop_caches', '3');
  } catch {
    /* not root: warm-cache numbers */
  }
}

function qemuIo(file: string, cmds: string[]): void {
  for (let i = 0; i < cmds.length; i += 256) {
    const r = spawnSync('qemu-io', ['-f', 'qcow2', ...cmds.slice(i, i + 256).flatMap((c) => ['-c', c]), file], { encoding: 'utf8' });
    if (r.status !== 0) throw new Error(`qemu-io: ${r.stderr}`);
  }
}

interface Shape {
  name: string;
  what: string;
  size: number;
  /** The middle layer's writes: [offset, length] pairs (bytes). */
  middle: Array<[number, number]>;
}

const GiB = 1024 * MiB;
const al = (n: number): number => Math.max(MiB, Math.round(n / MiB) * MiB);

function shape(name: string, scale: number): Shape {
  const every = (span: number, step: number, len: number): Array<[number, number]> => {
    const out: Array<[number, number]> = [];
    for (let o = 0; o + len <= span; o += step) out.push([o, len]);
    return out;
  };
  switch (name) {
    case 'contig': {
      const d = al(GiB * scale);
      return { name, what: `${fmtB(d)} contiguous middle`, size: al(8 * GiB * scale), middle: [[0, d]] };
    }
    case 'frag': {
      const span = al(2 * GiB * scale);
      return {
        name,
        what: `fragmented middle (1 MiB every 2 MiB over ${fmtB(span)})`,
        size: al(8 * GiB * scale),
        middle: every(span, 2 * MiB, MiB),
      };
    }
    case 'move4g': {
      const span = al(8 * GiB * scale);
      return { name, what: `${fmtB(span / 2)} to move (1 MiB every 2 MiB)`, size: al(16 * GiB * scale), middle: every(span, 2 * MiB, MiB) };
    }
    case 'thin': {
      // 1 MiB every 100 MiB of the disk (1 GiB at full scale): the same proportion at any scale.
      const size = al(100 * GiB * scale);
      const step = 100 * MiB;
      const moved = Math.floor(size / step) * MiB;
      return {
        name,
        what: `${fmtB(size)} disk, ${fmtB(moved)} spread thin (1 MiB every ${fmtB(step)})`,
        size,
        middle: every(size, step, MiB),
      };
    }
    default:
      throw new Error(`unknown shape ${name} (contig, frag, move4g, thin)`);
  }
}

/** Build F ← I ← C in `dir`: F has data under all of I, C 1 MiB every 64 MiB. */
function buildChain(dir: string, s: Shape): void {
  fs.mkdirSync(dir, { recursive: true });
  const F = path.join(dir, 'full.qcow2');
  const I = path.join(dir, 'inc1.qcow2');
  const C = path.join(dir, 'inc2.qcow2');
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', F, String(s.size)]);
  const fw: string[] = [];
  // F: the middle's extents, merged when close, in pieces of at most 64 MiB.
  let runStart = -1;
  let runEnd = -1;
  const flushRun = (): void => {
    for (let o = runStart; o < runEnd; o += 64 * MiB) fw.push(`write -P 1 ${o} ${Math.min(64 * MiB, runEnd - o)}`);
  };
  for (const [o, l] of s.middle) {
    if (runStart >= 0 && o <= runEnd + MiB) runEnd = Math.max(runEnd, o + l);
    else {
      if (runStart >= 0) flushRun();
      runStart = o;
      runEnd = o + l;
    }
  }
  if (runStart >= 0) flushRun();
  qemuIo(F, fw);
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'full.qcow2', '-F', 'qcow2', I]);
  const iw: string[] = [];
  for (const [o, l] of s.middle) for (let p = o; p < o + l; p += 64 * MiB) iw.push(`write -P 2 ${p} ${Math.min(64 * MiB, o + l - p)}`);
  qemuIo(I, iw);
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'inc1.qcow2', '-F', 'qcow2', C]);
  const cw: string[] = [];
  for (let o = 0; o < s.size; o += 64 * MiB) cw.push(`write -P 3 ${o} ${MiB}`);
  qemuIo(C, cw);
}

/** A working copy: F and I are only read (hard links), C is copied (it is what changes). */
function copyChain(from: string, to: string): void {
  fs.rmSync(to, { recursive: true, force: true });
  fs.mkdirSync(to, { recursive: true });
  for (const f of ['full.qcow2', 'inc1.qcow2']) {
    try {
      fs.linkSync(path.join(from, f), path.join(to, f));
    } catch {
      execFileSync('cp', ['--sparse=always', path.join(from, f), path.join(to, f)]); // no hard links (FUSE)
    }
  }
  execFileSync('cp', ['--sparse=always', path.join(from, 'inc2.qcow2'), path.join(to, 'inc2.qcow2')]);
}

interface Run {
  seconds: number;
  rssKiB: number;
  extra?: Record<string, unknown>;
}

function timed(cmd: string, args: string[]): Promise<{ seconds: number; stdout: string; stderr: string; code: number | null }> {
  return new Promise((resolve) => {
    const t0 = process.hrtime.bigint();
    const c = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    c.stdout.on('data', (d) => (stdout += d));
    c.stderr.on('data', (d) => (stderr += d));
    c.on('close', (code) => resolve({ seconds: Number(process.hrtime.bigint() - t0) / 1e9, stdout, stderr, code }));
  });
}

async function runQemuImg(dir: string): Promise<Run> {
  dropCaches();
  const r = await timed('/usr/bin/time', [
    '-f',
    '%M',
    'qemu-img',
    'rebase',
    '-b',
    'full.qcow2',
    '-F',
    'qcow2',
    path.join(dir, 'inc2.qcow2'),
  ]);
  if (r.code !== 0) throw new Error(`qemu-img rebase failed: ${r.stderr}`);
  return { seconds: r.seconds, rssKiB: Number(r.stderr.trim().split('\n').at(-1)) };
}

async function runNative(dir: string, root = ROOT): Promise<Run> {
  dropCaches();
  const script = `
    import { nativeRebase } from ${JSON.stringify(path.join(root, 'dist/lib/qcow2/rebase.js'))};
    import { capYoungGeneration } from ${JSON.stringify(path.join(root, 'dist/lib/engine/native.js'))};
    capYoungGeneration(); // as the native engine does before a rebase
    const r = await nativeRebase({ target: ${JSON.stringify(path.join(dir, 'inc2.qcow2'))}, newBacking: ${JSON.stringify(path.join(dir, 'full.qcow2'))}, newBackingName: 'full.qcow2' });
    console.log(JSON.stringify({ ...r, maxRSS: process.resourceUsage().maxRSS }));`;
  const r = await timed(process.execPath, [...NODE_FLAGS, '--input-type=module', '-e', script]);
  if (r.code !== 0) throw new Error(`native rebase failed: ${r.stderr}`);
  const out = JSON.parse(r.stdout.trim().split('\n').at(-1)!) as { maxRSS: number; copiedBytes: number; batches: number };
  return { seconds: r.seconds, rssKiB: out.maxRSS, extra: out };
}

/**
 * The floor: copy `n` bytes of the removed layer's data into a new file on the same storage
 * with the native engine's I/O shape (4 × 4 MiB reads in flight, writes one at a time behind
 * them), then fdatasync.
 */
async function runFloor(dir: string, n: number): Promise<Run> {
  dropCaches();
  const script = `
    import fs from 'node:fs/promises';
    const src = await fs.open(${JSON.stringify(path.join(dir, 'inc1.qcow2'))}, 'r');
    const dst = await fs.open(${JSON.stringify(path.join(dir, 'floor.bin'))}, 'w');
    const size = (await src.stat()).size;
    const n = ${n}, chunk = 4 << 20, base = Math.max(0, size - n);
    let next = 0, tail = Promise.resolve();
    const worker = async () => {
      // Page-aligned (a WebAssembly memory): the kernel's page-cache copies are fastest there.
      const buf = Buffer.from(new WebAssembly.Memory({ initial: chunk / 65536 }).buffer, 0, chunk);
      for (;;) {
        const at = next; next += chunk;
        if (at >= n) return;
        const { bytesRead } = await src.read(buf, 0, Math.min(chunk, n - at), base + at);
        const w = tail.then(() => bytesRead && dst.write(buf, 0, bytesRead, at));
        tail = w.then(() => {}, () => {});
        await w;
      }
    };
    await Promise.all([worker(), worker(), worker(), worker()]);
    await dst.datasync(); await dst.close(); await src.close();
    console.log(JSON.stringify({ maxRSS: process.resourceUsage().maxRSS }));`;
  const r = await timed(process.execPath, ['--input-type=module', '-e', script]);
  if (r.code !== 0) throw new Error(`floor failed: ${r.stderr}`);
  fs.rmSync(path.join(dir, 'floor.bin'), { force: true });
  return { seconds: r.seconds, rssKiB: (JSON.parse(r.stdout.trim()) as { maxRSS: number }).maxRSS };
}

/** A stand-in `virsh` (the CLI's start-up check asks libvirt's version; libvirt is not measured here). */
function shimDir(base: string): string {
  const dir = path.join(base, 'shims');
  fs.mkdirSync(dir, { recursive: true });
  const v =
    'Compiled against library: libvirt 9.0.0\nUsing library: libvirt 9.0.0\nUsing API: QEMU 9.0.0\nRunning hypervisor: QEMU 7.2.0\n';
  fs.writeFileSync(path.join(dir, 'virsh'), `#!/bin/sh\nprintf '${v}'\n`, { mode: 0o755 });
  return dir;
}

/** The whole CLI: `-o rebase` on a bind "NAS" holding the chain in `<nas>/vm/`, native engine. */
async function runCli(nas: string, shims: string, log: string): Promise<Run> {
  dropCaches();
  const env = { ...process.env, PATH: `${shims}:${process.env.PATH ?? ''}`, NASBACKUP_LOG_FILE: log };
  const args = ['-f', '%M', BIN, '-o', 'rebase', '-t', 'none', '-s', nas, '-m', 'bind'];
  args.push('--rebase-target', 'vm/inc2.qcow2', '--rebase-new-backing', 'vm/full.qcow2', '--engine', 'native');
  const r = await new Promise<{ seconds: number; stdout: string; stderr: string; code: number | null }>((resolve) => {
    const t0 = process.hrtime.bigint();
    const c = spawn('/usr/bin/time', args, { stdio: ['ignore', 'pipe', 'pipe'], env });
    let stdout = '';
    let stderr = '';
    c.stdout.on('data', (d) => (stdout += d));
    c.stderr.on('data', (d) => (stderr += d));
    c.on('close', (code) => resolve({ seconds: Number(process.hrtime.bigint() - t0) / 1e9, stdout, stderr, code }));
  });
  if (r.code !== 0) throw new Error(`nasbackup -o rebase failed (${r.code}): ${r.stdout}${r.stderr}`);
  return { seconds: r.seconds, rssKiB: Number(r.stderr.trim().split('\n').at(-1)) };
}

function idleRssKiB(): number {
  const r = spawnSync('/usr/bin/time', ['-f', '%M', BIN, '--version'], { encoding: 'utf8' });
  return Number(r.stderr.trim().split('\n').at(-1));
}

/** "median (min–max)" with `d` decimals. */
const spread = (xs: number[], d = 2): string => `${median(xs).toFixed(d)} (${minMax(xs, (v) => v.toFixed(d))})`;

interface Summary {
  label: string;
  moved: number;
  q: number;
  n: number;
  f: number;
  nq: string;
  nf: string;
  rss: string;
}
const summaries: Summary[] = [];

async function bench(label: string, pristine: string, workRoot: string, cli: { shims: string } | null): Promise<void> {
  const qdir = path.join(workRoot, 'qemu');
  const ndir = path.join(workRoot, 'native');
  const bdir = path.join(workRoot, 'baseline');
  const bs: Run[] = [];
  const qs: Run[] = [];
  const ns: Run[] = [];
  const fl: Run[] = [];
  let moved = 0;
  let batches: unknown = 0;
  let identical = true;
  let clean = true;
  for (let run = 0; run < RUNS; run++) {
    copyChain(pristine, qdir);
    copyChain(pristine, ndir);
    if (BASELINE) copyChain(pristine, bdir);
    // Alternate who goes first, so neither always meets the colder (or warmer) server.
    let q: Run, n: Run;
    const baseline = async (): Promise<void> => {
      if (!BASELINE) return;
      bs.push(await runNative(bdir, BASELINE));
      fs.rmSync(bdir, { recursive: true, force: true });
    };
    if (run % 2 === 0) {
      q = await runQemuImg(qdir);
      n = await runNative(ndir);
      await baseline();
    } else {
      await baseline();
      n = await runNative(ndir);
      q = await runQemuImg(qdir);
    }
    moved = Number(n.extra?.copiedBytes ?? 0);
    batches = n.extra?.batches;
    const f = await runFloor(ndir, moved);
    qs.push(q);
    ns.push(n);
    fl.push(f);
    const cmp = spawnSync('qemu-img', ['compare', path.join(qdir, 'inc2.qcow2'), path.join(ndir, 'inc2.qcow2')], { encoding: 'utf8' });
    const check = spawnSync('qemu-img', ['check', path.join(ndir, 'inc2.qcow2')], { encoding: 'utf8' });
    identical &&= cmp.status === 0;
    clean &&= check.status === 0;
    console.log(
      `  run ${run + 1}/${RUNS}: qemu-img ${q.seconds.toFixed(2)} s, native ${n.seconds.toFixed(2)} s, floor ${f.seconds.toFixed(2)} s` +
        `  (native/qemu-img ${(n.seconds / q.seconds).toFixed(2)}x, native/floor ${(n.seconds / f.seconds).toFixed(2)}x)`,
    );
    fs.rmSync(qdir, { recursive: true, force: true });
    fs.rmSync(ndir, { recursive: true, force: true });
  }
  const sec = (rs: Run[]): number[] => rs.map((r) => r.seconds);
  const nq = ns.map((r, i) => r.seconds / qs[i]!.seconds);
  const nf = ns.map((r, i) => r.seconds / fl[i]!.seconds);
  const peak = (rs: Run[]): string => (Math.max(...rs.map((r) => r.rssKiB)) / 1024).toFixed(1);
  console.log(`== ${label}: ${fmtB(moved)} to move, ${RUNS} run(s): median (min–max)`);
  console.log(`  qemu-img rebase   ${spread(sec(qs))} s   peak RSS ${peak(qs)} MiB`);
  console.log(`  native engine     ${spread(sec(ns))} s   peak RSS ${peak(ns)} MiB   (${String(batches)} batch(es))`);
  if (BASELINE) {
    const nb = ns.map((r, i) => r.seconds / bs[i]!.seconds);
    console.log(
      `  baseline engine   ${spread(sec(bs))} s   peak RSS ${peak(bs)} MiB   (--baseline; native/baseline ${spread(nb)}x paired)`,
    );
  }
  console.log(`  physical floor    ${spread(sec(fl))} s   (pipelined copy + fdatasync of the moved bytes)`);
  console.log(
    `  paired ratios: native/qemu-img ${spread(nq)}x   native/floor ${spread(nf)}x   floor/qemu-img ${(median(sec(fl)) / median(sec(qs))).toFixed(2)}x`,
  );
  let rss = `engine ${peak(ns)} MiB, qemu-img ${peak(qs)} MiB`;
  if (cli) {
    // Through the whole CLI once (start-up, mount, lock, syncfs, unmount included), for its peak RSS.
    const nas = path.join(workRoot, 'nas');
    copyChain(pristine, path.join(nas, 'vm'));
    const idle = idleRssKiB();
    const c = await runCli(nas, cli.shims, path.join(workRoot, 'cli.log'));
    fs.rmSync(nas, { recursive: true, force: true });
    const over = (c.rssKiB - idle) / 1024;
    console.log(
      `  CLI (nasbackup -o rebase --engine native): ${c.seconds.toFixed(2)} s, peak RSS ${(c.rssKiB / 1024).toFixed(1)} MiB = idle (--version) ${(idle / 1024).toFixed(1)} MiB + ${over.toFixed(1)} MiB (goal: ≤ +32)`,
    );
    rss = `CLI ${(c.rssKiB / 1024).toFixed(1)} MiB (idle ${(idle / 1024).toFixed(1)}, +${over.toFixed(1)}), qemu-img ${peak(qs)} MiB`;
  }
  console.log(
    `  results identical: ${identical ? 'yes' : 'NO'} (qemu-img compare); native qemu-img check: ${clean ? 'clean' : 'NOT clean'}`,
  );
  summaries.push({ label, moved, q: median(sec(qs)), n: median(sec(ns)), f: median(sec(fl)), nq: spread(nq), nf: spread(nf), rss });
}

interface Smb {
  dir: string;
  what: string;
  stop(): void;
}

const sh = (cmd: string, args: string[]): { ok: boolean; err: string } => {
  const r = spawnSync(cmd, args, { encoding: 'utf8' });
  return { ok: r.status === 0, err: `${cmd} ${args.join(' ')}: ${(r.stderr || r.stdout || '').trim()}` };
};

/** A network namespace behind a veth pair shaped to `rate` both ways; null with a reason when impossible. */
function startLink(rate: string): { ns: string; server: string; client: string; dev: string; stop(): void } | string {
  for (const b of ['ip', 'tc'])
    if (spawnSync('sh', ['-c', `command -v ${b}`]).status !== 0) return `${b} is not installed (apt-get install iproute2)`;
  const tag = Math.random().toString(36).slice(2, 8);
  const ns = `nbbench-${tag}`;
  const host = `nbh${tag}`;
  const peer = `nbp${tag}`;
  const net = `10.${200 + Math.floor(Math.random() * 50)}.${Math.floor(Math.random() * 250)}`;
  const stop = (): void => {
    spawnSync('ip', ['netns', 'del', ns]); // takes the veth pair with it
    spawnSync('ip', ['link', 'del', host]);
  };
  const steps: Array<[string, string[]]> = [
    ['ip', ['netns', 'add', ns]],
    ['ip', ['link', 'add', host, 'type', 'veth', 'peer', 'name', peer]],
    ['ip', ['link', 'set', peer, 'netns', ns]],
    ['ip', ['addr', 'add', `${net}.1/24`, 'dev', host]],
    ['ip', ['link', 'set', host, 'up']],
    ['ip', ['netns', 'exec', ns, 'ip', 'addr', 'add', `${net}.2/24`, 'dev', peer]],
    ['ip', ['netns', 'exec', ns, 'ip', 'link', 'set', peer, 'up']],
    ['ip', ['netns', 'exec', ns, 'ip', 'link', 'set', 'lo', 'up']],
    ['tc', ['qdisc', 'add', 'dev', host, 'root', 'tbf', 'rate', rate, 'burst', '256kb', 'latency', '50ms']],
    ['ip', ['netns', 'exec', ns, 'tc', 'qdisc', 'add', 'dev', peer, 'root', 'tbf', 'rate', rate, 'burst', '256kb', 'latency', '50ms']],
  ];
  for (const [c, a] of steps) {
    const r = sh(c, a);
    if (!r.ok) {
      stop();
      return r.err;
    }
  }
  return { ns, server: `${net}.2`, client: `${net}.1`, dev: peer, stop };
}

/** samba + smbnetfs (FUSE), as docs/e2e-lab.md §8 describes; a reason string when impossible. */
async function startSmb(base: string): Promise<Smb | string> {
  for (const b of ['smbd', 'smbnetfs', 'smbpasswd', 'fusermount']) {
    if (spawnSync('sh', ['-c', `command -v ${b}`]).status !== 0) return `${b} is not installed (apt-get install samba smbnetfs)`;
  }
  if (!fs.existsSync('/dev/fuse')) return '/dev/fuse is missing';
  let link: ReturnType<typeof startLink> | null = null;
  if (NAS_LINK === 'netns') {
    link = startLink(NAS_RATE);
    if (typeof link === 'string') return `no shaped link (${link}); try --nas-link lo`;
  }
  const server = link ? link.server : '127.0.0.1';
  const inNs = (cmd: string, args: string[]): [string, string[]] => (link ? ['ip', ['netns', 'exec', link.ns, cmd, ...args]] : [cmd, args]);
  const dir = path.join(base, 'smb');
  const share = path.join(dir, 'share');
  const mnt = path.join(dir, 'mnt');
  const home = path.join(dir, 'home');
  for (const d of [
    share,
    mnt,
    path.join(home, '.smb'),
    ...['pid', 'lock', 'state', 'cache', 'private', 'ncalrpc'].map((x) => path.join(dir, x)),
  ])
    fs.mkdirSync(d, { recursive: true });
  const conf = path.join(dir, 'smb.conf');
  fs.writeFileSync(
    conf,
    `[global]\n interfaces = ${link ? link.dev : 'lo'}\n bind interfaces only = yes\n smb ports = 445\n disable netbios = yes\n pid directory = ${dir}/pid\n lock directory = ${dir}/lock\n state directory = ${dir}/state\n cache directory = ${dir}/cache\n private dir = ${dir}/private\n ncalrpc dir = ${dir}/ncalrpc\n log file = ${dir}/smbd.log\n[nas]\n path = ${share}\n read only = no\n force user = root\n`,
  );
  const stopSmbd = (): void => {
    try {
      const pid = Number(fs.readFileSync(path.join(dir, 'pid', 'smbd.pid'), 'utf8'));
      if (pid > 0) process.kill(pid, 'SIGTERM');
    } catch {
      /* gone */
    }
  };
  const fail = (why: string): string => {
    stopSmbd();
    link?.stop();
    return why;
  };
  const pw = 'bench-' + Math.random().toString(36).slice(2, 10);
  const sp = spawnSync('smbpasswd', ['-c', conf, '-s', '-a', 'root'], { input: `${pw}\n${pw}\n`, encoding: 'utf8' });
  if (sp.status !== 0) return fail(`smbpasswd failed: ${sp.stderr.trim()}`);
  const [sc, sa] = inNs('smbd', ['-D', '-s', conf]);
  const sd = spawnSync(sc, sa, { encoding: 'utf8' });
  if (sd.status !== 0) return fail(`smbd failed: ${sd.stderr.trim()}`);
  const smbConf = path.join(home, '.smb', 'smbnetfs.conf');
  fs.writeFileSync(smbConf, `auth "${server}" "root" "${pw}"\nhost ${server} visible=true\n`);
  fs.chmodSync(smbConf, 0o600);
  const fuseOpts = link ? ['-o', 'big_writes,max_write=131072'] : [];
  const fu = spawnSync('smbnetfs', [mnt, ...fuseOpts], { env: { ...process.env, HOME: home }, encoding: 'utf8' });
  if (fu.status !== 0) return fail(`smbnetfs failed: ${fu.stderr.trim()}`);
  const nas = path.join(mnt, server, 'nas');
  for (let i = 0; i < 100 && !fs.existsSync(nas); i++) await new Promise((r) => setTimeout(r, 100));
  if (!fs.existsSync(nas)) {
    spawnSync('fusermount', ['-u', mnt]);
    return fail('the share did not appear under the smbnetfs mount');
  }
  return {
    dir: nas,
    what: link
      ? `samba in a network namespace behind a ${NAS_RATE} veth link (tc tbf each way) + smbnetfs big_writes`
      : 'samba on 127.0.0.1 + smbnetfs defaults (4 KiB FUSE writes)',
    stop: () => {
      spawnSync('fusermount', ['-u', mnt]);
      stopSmbd();
      link?.stop();
    },
  };
}

async function main(): Promise<void> {
  if (!fs.existsSync(DIST_REBASE)) throw new Error('run npm run build first (dist/lib/qcow2/rebase.js is missing)');
  const base = fs.mkdtempSync(path.join(os.tmpdir(), 'nasbackup-bench-rebase-'));
  console.log(
    `bench-rebase: ${machineLine()}, qemu-img ${execFileSync('qemu-img', ['--version'], { encoding: 'utf8' }).split('\n')[0]}, node flags ${NODE_FLAGS.join(' ') || '(none)'}`,
  );
  const shapes = SHAPES.map((n) => shape(n, SCALE));
  try {
    if (NAS_MODE !== 'only') {
      const shims = shimDir(base);
      for (const s of shapes) {
        const pristine = path.join(base, `local-${s.name}`);
        console.log(`\nbuilding ${s.name}: ${fmtB(s.size)} virtual, ${s.what}…`);
        buildChain(pristine, s);
        await bench(`local disk, ${s.name}: ${s.what}`, pristine, path.join(base, 'local'), { shims });
        fs.rmSync(pristine, { recursive: true, force: true });
      }
    }
    if (NAS_MODE !== 'off') {
      const smb = await startSmb(base);
      if (typeof smb === 'string') console.log(`\n== slow NAS (samba + smbnetfs): skipped — ${smb}`);
      else {
        const onSignal = (): void => {
          smb.stop();
          fs.rmSync(base, { recursive: true, force: true });
          process.exit(130);
        };
        process.once('SIGINT', onSignal);
        process.once('SIGTERM', onSignal);
        try {
          for (const name of SHAPES) {
            const s = shape(name, NAS_SCALE * SCALE);
            const pristine = path.join(base, `nas-pristine-${s.name}`);
            console.log(`\nbuilding the NAS chain ${s.name}: ${fmtB(s.size)} virtual, ${s.what}…`);
            buildChain(pristine, s);
            await bench(`slow NAS (${smb.what}), ${s.name}: ${s.what}`, pristine, path.join(smb.dir, 'bench'), null);
            fs.rmSync(pristine, { recursive: true, force: true });
          }
        } finally {
          smb.stop();
        }
      }
    }
  } finally {
    fs.rmSync(base, { recursive: true, force: true });
  }
  console.log(`\n== summary (medians; paired ratios median (min–max)); load at the end ${loadAverage()}`);
  for (const x of summaries)
    console.log(
      `  ${x.label}\n    moved ${fmtB(x.moved)}: qemu-img ${x.q.toFixed(2)} s, native ${x.n.toFixed(2)} s, floor ${x.f.toFixed(2)} s; native/qemu-img ${x.nq}x, native/floor ${x.nf}x; peak RSS ${x.rss}`,
    );
}

await main();
