// Benchmark (not a test): the native in-chain safe rebase against `qemu-img rebase` on the
// same chain in one run, locally and over a throughput-bound NAS, plus the physical floor
// (reading and writing the bytes that must move, pipelined). Prints per-run times, medians,
// ratios and peak RSS.
//   npm run bench:rebase [-- --size 8G --delta 1G --runs 3 --nas auto|off|only
//                           --nas-size 1G --nas-delta 128M --nas-link netns|lo --nas-rate 400mbit]
// The chain: full F (data over 2×delta) ← inc I (delta of 1 MiB writes every 2 MiB) ← child C
// (1 MiB every 64 MiB); C is rebased onto F (the "delete the middle incremental" repair).
// The NAS is samba + smbnetfs (docs/e2e-lab.md §8). With --nas-link netns (default) smbd runs in its own
// network namespace behind a veth pair shaped to --nas-rate in each direction (tc tbf), so the
// link is the bottleneck as on a real NAS; smbnetfs gets big_writes so FUSE's 4 KiB writes are
// not. --nas-link lo is samba on 127.0.0.1 with smbnetfs' defaults (write-bound, ~11 MB/s).
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const argv = process.argv.slice(2);
const opt = (name: string, dflt: string): string => {
  const i = argv.indexOf(`--${name}`);
  return i >= 0 && argv[i + 1] ? argv[i + 1]! : dflt;
};
const bytes = (s: string): number => {
  const m = /^(\d+(?:\.\d+)?)([KMGT]?)$/i.exec(s);
  if (!m) throw new Error(`bad size ${s}`);
  return Math.round(Number(m[1]) * 1024 ** ' KMGT'.indexOf((m[2] || ' ').toUpperCase()));
};
const SIZE = bytes(opt('size', '8G'));
const DELTA = bytes(opt('delta', '1G'));
const NAS_SIZE = bytes(opt('nas-size', '1G'));
const NAS_DELTA = bytes(opt('nas-delta', '128M'));
const NAS_MODE = opt('nas', 'auto');
const NAS_LINK = opt('nas-link', 'netns');
const NAS_RATE = opt('nas-rate', '400mbit');
const RUNS = Math.max(1, Number(opt('runs', '3')));
const ROOT = fileURLToPath(new URL('..', import.meta.url));
const DIST_REBASE = path.join(ROOT, 'dist/lib/qcow2/rebase.js');
const DIST_NATIVE = path.join(ROOT, 'dist/lib/engine/native.js');
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

/** Build F ← I ← C in `dir`. */
function buildChain(dir: string, size: number, delta: number): void {
  fs.mkdirSync(dir, { recursive: true });
  const F = path.join(dir, 'full.qcow2');
  const I = path.join(dir, 'inc1.qcow2');
  const C = path.join(dir, 'inc2.qcow2');
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', F, String(size)]);
  const fw: string[] = [];
  for (let o = 0; o < 2 * delta; o += 64 * MiB) fw.push(`write -P 1 ${o} ${Math.min(64 * MiB, 2 * delta - o)}`);
  qemuIo(F, fw);
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'full.qcow2', '-F', 'qcow2', I]);
  const iw: string[] = [];
  for (let o = 0; o < 2 * delta; o += 2 * MiB) iw.push(`write -P 2 ${o} ${MiB}`);
  qemuIo(I, iw);
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'inc1.qcow2', '-F', 'qcow2', C]);
  const cw: string[] = [];
  for (let o = 0; o < size; o += 64 * MiB) cw.push(`write -P 3 ${o} ${MiB}`);
  qemuIo(C, cw);
}

function copyChain(from: string, to: string): void {
  fs.rmSync(to, { recursive: true, force: true });
  fs.mkdirSync(to, { recursive: true });
  for (const f of ['full.qcow2', 'inc1.qcow2', 'inc2.qcow2']) execFileSync('cp', ['--sparse=always', path.join(from, f), path.join(to, f)]);
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

async function runNative(dir: string): Promise<Run> {
  dropCaches();
  const script = `
    import { nativeRebase } from ${JSON.stringify(DIST_REBASE)};
    import { capYoungGeneration } from ${JSON.stringify(DIST_NATIVE)};
    capYoungGeneration(); // as the native engine does before a rebase
    const r = await nativeRebase({ target: ${JSON.stringify(path.join(dir, 'inc2.qcow2'))}, newBacking: ${JSON.stringify(path.join(dir, 'full.qcow2'))}, newBackingName: 'full.qcow2' });
    console.log(JSON.stringify({ ...r, maxRSS: process.resourceUsage().maxRSS }));`;
  const r = await timed(process.execPath, ['--input-type=module', '-e', script]);
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
      const buf = Buffer.allocUnsafe(chunk);
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

const median = (xs: number[]): number => {
  const a = [...xs].sort((x, y) => x - y);
  return a.length % 2 ? a[(a.length - 1) / 2]! : (a[a.length / 2 - 1]! + a[a.length / 2]!) / 2;
};

async function bench(label: string, pristine: string, workRoot: string): Promise<void> {
  const qdir = path.join(workRoot, 'qemu');
  const ndir = path.join(workRoot, 'native');
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
    // Alternate who goes first, so neither always meets the colder (or warmer) server.
    let q: Run, n: Run;
    if (run % 2 === 0) {
      q = await runQemuImg(qdir);
      n = await runNative(ndir);
    } else {
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
      `  run ${run + 1}/${RUNS}: qemu-img ${q.seconds.toFixed(2)} s, native ${n.seconds.toFixed(2)} s, floor ${f.seconds.toFixed(2)} s`,
    );
    fs.rmSync(qdir, { recursive: true, force: true });
    fs.rmSync(ndir, { recursive: true, force: true });
  }
  const mq = median(qs.map((r) => r.seconds));
  const mn = median(ns.map((r) => r.seconds));
  const mf = median(fl.map((r) => r.seconds));
  const peak = (rs: Run[]): string => (Math.max(...rs.map((r) => r.rssKiB)) / 1024).toFixed(1);
  console.log(`== ${label}: ${fmtB(moved)} to move, median of ${RUNS} run(s)`);
  console.log(`  qemu-img rebase   ${mq.toFixed(2)} s   peak RSS ${peak(qs)} MiB`);
  console.log(`  native rebase     ${mn.toFixed(2)} s   peak RSS ${peak(ns)} MiB   (${String(batches)} batch(es))`);
  console.log(`  physical floor    ${mf.toFixed(2)} s   (pipelined copy + fdatasync of the moved bytes)`);
  console.log(
    `  ratio native/qemu-img ${(mn / mq).toFixed(2)}x   native/floor ${(mn / mf).toFixed(2)}x   floor/qemu-img ${(mf / mq).toFixed(2)}x`,
  );
  console.log(
    `  results identical: ${identical ? 'yes' : 'NO'} (qemu-img compare); native qemu-img check: ${clean ? 'clean' : 'NOT clean'}`,
  );
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
    `bench-rebase: ${os.cpus().length} CPUs, qemu-img ${execFileSync('qemu-img', ['--version'], { encoding: 'utf8' }).split('\n')[0]}`,
  );
  try {
    if (NAS_MODE !== 'only') {
      const pristine = path.join(base, 'local-pristine');
      console.log(`building the local chain: ${fmtB(SIZE)} virtual, ${fmtB(DELTA)} in the middle layer…`);
      buildChain(pristine, SIZE, DELTA);
      await bench(`local disk, ${fmtB(SIZE)} virtual`, pristine, path.join(base, 'local'));
      fs.rmSync(pristine, { recursive: true, force: true });
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
          const pristine = path.join(base, 'nas-pristine');
          console.log(`\nbuilding the NAS chain: ${fmtB(NAS_SIZE)} virtual, ${fmtB(NAS_DELTA)} in the middle layer…`);
          buildChain(pristine, NAS_SIZE, NAS_DELTA);
          await bench(`slow NAS (${smb.what}), ${fmtB(NAS_SIZE)} virtual`, pristine, path.join(smb.dir, 'bench'));
        } finally {
          smb.stop();
        }
      }
    }
  } finally {
    fs.rmSync(base, { recursive: true, force: true });
  }
}

await main();
