// Benchmark (not a test): what the manifest costs a backup. The same build backs up the
// same disk with the manifest and without it (NASBACKUP_BENCH_SKIP_MANIFEST=1, the
// backup as it was before manifests), interleaved and alternating the order, in the
// same run; reported: medians with min-max, the ratio of the medians and the median of
// the paired ratios, and the manifest step's own figures from the log (digest time, and
// the part of it the backup waited for: the rest overlapped the flush).
//   running: a running VM (e2e lab guest, TCG) with one disk full of data, libvirt push
//            backup onto a loop-mounted ext4 NAS;
//   stopped: a stopped VM, the native copy of one qcow2 disk full of data onto a bind NAS (digests computed while copying; the skip flag turns them off too).
//   Each path is measured at each --bandwidth (MiB/s, `-b`; `none` for full speed): by default
//   unthrottled (a fast local NAS; for the stopped path a page-cached local copy) and at 110
//   (a 1 GbE NAS link; the stopped path's native copy holds it too).
//   Every backup runs under /usr/bin/time: peak RSS (against the idle program's, issue 18's
//   bound is idle + 32 MiB) and CPU seconds (steadier than wall time on a loaded host; their
//   difference is what the digests cost). The stopped path then reports the peak RSS of two
//   disks and of a sparse disk (--sparse-gib virtual, 1 MiB of data every 100 MiB) with the manifest.
//   npm run build && flock /tmp/nasbackup-bench.lock flock /tmp/nasbackup-e2e.lock vite-node scripts/bench-manifest.ts -- \
//     [--path running|stopped|both] [--mib 1024] [--runs 5] [--bandwidth none,110] [--sparse-gib 100] [--keep-log <file>]
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { createQcow2, ensureLab, guestWrite, startGuest } from '../test/e2e/lab.js';
import { loadAverage, machineLine, median, spread as statsSpread } from './lib/stats.js';

const arg = (name: string): string | undefined => {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? process.argv[i + 1] : undefined;
};
const MiB = 1024 * 1024;
const mib = Number(arg('mib') ?? 1024);
const runs = Number(arg('runs') ?? 5);
const which = arg('path') ?? 'both';
/** -b (MiB/s), each measured in turn: `none` (full speed) and a realistic NAS link (1 GbE ≈ 110). */
const bandwidths = (arg('bandwidth') ?? 'none,110').split(',').map((b) => (b === 'none' ? null : b));
/** Keep the agent log of the runs here (the per-phase lines), else it goes with the temp dir. */
const keepLog = arg('keep-log');
/** Virtual size of the stopped path's sparse disk (RSS only), GiB; 0 skips it. */
const sparseGib = Number(arg('sparse-gib') ?? 100);
const BIN = fileURLToPath(new URL('../bin/nasbackup', import.meta.url));
/** Milliseconds as "min–max s". */
const spread = (xs: number[]): string => `${statsSpread(xs, (v) => (v / 1000).toFixed(2))} s`;

interface Shape {
  name: string;
  vm: string;
  /** argv after `-o backup -v <vm>` but before `-p`. */
  nas: string[];
  disks: string[];
  env: NodeJS.ProcessEnv;
  log: string;
  /** The digests are computed after the copy (running path), so the manifest step's own figures mean something. */
  digestsAfter?: boolean;
  cleanup(p: string): void;
}

/** One backup under /usr/bin/time: wall ms, peak RSS KiB, CPU s (user + system). */
interface Timed {
  ms: number;
  rssKiB: number;
  cpu: number;
}
function timedRun(args: string[], env: NodeJS.ProcessEnv): Timed {
  const t0 = process.hrtime.bigint();
  const res = spawnSync('/usr/bin/time', ['-f', 'NBM_RSS=%M NBM_CPU=%U+%S', BIN, ...args], { env, encoding: 'utf8' });
  const ms = Number(process.hrtime.bigint() - t0) / 1e6;
  if (res.status !== 0) throw new Error(`${args.join(' ')} failed (${res.status}): ${res.stdout}${res.stderr}`);
  const rss = /NBM_RSS=(\d+)/.exec(res.stderr);
  const cpu = /NBM_CPU=([\d.]+)\+([\d.]+)/.exec(res.stderr);
  return { ms, rssKiB: rss ? Number(rss[1]) : 0, cpu: cpu ? Number(cpu[1]) + Number(cpu[2]) : 0 };
}

/** Peak RSS of the program idle (`--version`), KiB: the base of issue 18's bound. */
let idleKiB = 0;
const overIdle = (kib: number): string => `${(kib / 1024).toFixed(1)} MiB (idle + ${((kib - idleKiB) / 1024).toFixed(1)})`;

/** `runs` pairs (after one warm-up pair), with and without the manifest, order alternating. */
/** Backups so far: each one's folder name is new (the log is searched by it). */
let n = 0;
const folder = (vm: string): string =>
  `${vm}/2026.01.01.00.${String(Math.floor(n / 60)).padStart(2, '0')}.${String(n++ % 60).padStart(2, '0')}`;
function measure(s: Shape): void {
  const withM: Timed[] = [];
  const without: Timed[] = [];
  const digest: number[] = [];
  const onPath: number[] = [];
  /** The stopped path's copy phase (its log line), with and without. */
  const copyW: number[] = [];
  const copyWo: number[] = [];
  for (let r = 0; r <= runs; r++) {
    const order = r % 2 === 0 ? [true, false] : [false, true];
    for (const manifest of order) {
      const p = folder(s.vm);
      const env = { ...s.env, ...(manifest ? {} : { NASBACKUP_BENCH_SKIP_MANIFEST: '1' }) };
      const t = timedRun(['-o', 'backup', '-v', s.vm, ...s.nas, '-p', p, '-q', 'false', ...s.disks], env);
      if (r > 0) {
        (manifest ? withM : without).push(t);
        const log = fs.readFileSync(s.log, 'utf8');
        const copied = [...log.matchAll(/Copied \S+ to (\S+): .* in ([\d.]+) s \(/g)].find((x) => x[1]!.includes(`/${p}`));
        if (copied) (manifest ? copyW : copyWo).push(Number(copied[2]) * 1000);
        if (manifest) {
          const m = [...log.matchAll(/Manifest of (\S+): \d+ disk\(s\) digested in (\d+) ms \((\d+) ms on/g)].find((x) => x[1] === p);
          if (m) {
            digest.push(Number(m[2]));
            onPath.push(Number(m[3]));
          }
        }
      }
      s.cleanup(p);
    }
  }
  const ms = (xs: Timed[]): number[] => xs.map((x) => x.ms);
  const paired = withM.map((w, i) => w.ms / without[i]!.ms);
  const cpuW = median(withM.map((x) => x.cpu));
  const cpuWo = median(without.map((x) => x.cpu));
  const rss = (xs: Timed[]): number => Math.max(...xs.map((x) => x.rssKiB));
  console.log(`${s.name}: ${mib} MiB of data, ${runs} pairs after one warm-up pair`);
  console.log(
    `  without manifest  median ${(median(ms(without)) / 1000).toFixed(2)} s  (${spread(ms(without))})  CPU ${cpuWo.toFixed(2)} s  peak RSS ${overIdle(rss(without))}`,
  );
  console.log(
    `  with manifest     median ${(median(ms(withM)) / 1000).toFixed(2)} s  (${spread(ms(withM))})  CPU ${cpuW.toFixed(2)} s  peak RSS ${overIdle(rss(withM))}`,
  );
  console.log(
    `  ratio with/without: ${(median(ms(withM)) / median(ms(without))).toFixed(3)}x (medians), ${median(paired).toFixed(3)}x (median of paired, ${Math.min(...paired).toFixed(3)}-${Math.max(...paired).toFixed(3)}); the manifest's CPU: ${(cpuW - cpuWo).toFixed(2)} s`,
  );
  if (copyW.length && copyWo.length)
    console.log(
      `  copy phase (log): ${(median(copyWo) / 1000).toFixed(2)} s without, ${(median(copyW) / 1000).toFixed(2)} s with (${(median(copyW) / median(copyWo)).toFixed(3)}x)`,
    );
  if (s.digestsAfter && digest.length)
    console.log(
      `  manifest step: digest ${median(digest)} ms median (${((mib * MiB) / MiB / (median(digest) / 1000)).toFixed(0)} MiB/s), of which the backup waited ${median(onPath)} ms (rest overlapped the flush)`,
    );
}

async function running(dir: string): Promise<void> {
  await ensureLab();
  const vm = `nbe2e-bmf-${process.pid}`;
  const disk = path.join(dir, '6a0b6f3e-0000-4000-8000-00000000b002');
  await createQcow2(disk, (mib + 64) * MiB);
  const img = path.join(dir, 'nas.img');
  execFileSync('truncate', ['-s', `${Math.max(1024, mib * 4)}M`, img]);
  execFileSync('mkfs.ext4', ['-q', '-F', img]);
  const guest = await startGuest({ name: vm, disks: [disk], dir });
  try {
    for (let off = 0; off < mib; off += 64)
      await guestWrite(vm, { target: 'vda', pattern: 0x10 + ((off / 64) % 200), offset: off * MiB, length: Math.min(64, mib - off) * MiB });
    const log = path.join(dir, 'agent-running.log');
    const env = { ...process.env, TMPDIR: path.join(dir, 'tmp'), NASBACKUP_LOG_FILE: log };
    for (const bandwidth of bandwidths) {
      const nas = ['-t', 'ext4', '-s', img, '-m', 'loop', ...(bandwidth ? ['-b', bandwidth] : [])];
      measure({
        name: `running VM (libvirt push, TCG guest, loop-ext4 NAS${bandwidth ? `, -b ${bandwidth} MiB/s` : ', full speed'})`,
        vm,
        nas,
        disks: ['-d', ''],
        env,
        log,
        digestsAfter: true,
        cleanup: (p) => void spawnSync(BIN, ['-o', 'delete', ...nas, '-p', p], { env }),
      });
    }
  } finally {
    await guest.destroy().catch(() => {});
    if (keepLog) fs.copyFileSync(path.join(dir, 'agent-running.log'), keepLog);
  }
}

function stopped(dir: string): void {
  const vm = 'i-2-99-VM';
  const nas = path.join(dir, 'nas');
  const shims = path.join(dir, 'shims');
  for (const d of [nas, shims]) fs.mkdirSync(d);
  // The VM is not running: `virsh list` shows no domain; `virsh version` passes the check.
  fs.writeFileSync(
    path.join(shims, 'virsh'),
    `#!/bin/sh\ncase "$*" in *version*) printf 'Compiled against library: libvirt 9.0.0\\nUsing library: libvirt 9.0.0\\nUsing API: QEMU 9.0.0\\nRunning hypervisor: QEMU 7.2.0\\n';;\n*list*) printf ' Id   Name   State\\n--------------------\\n\\n';;\nesac\n`,
    { mode: 0o755 },
  );
  const disk = path.join(dir, '6a0b6f3e-0000-4000-8000-00000000b001');
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', disk, `${mib}M`]);
  // Every cluster data, with varied content (64 MiB per pattern).
  const cmds = [];
  for (let off = 0; off < mib; off += 64) cmds.push('-c', `write -P ${0x10 + ((off / 64) % 200)} ${off}M ${Math.min(64, mib - off)}M`);
  execFileSync('qemu-io', ['-f', 'qcow2', ...cmds, disk], { stdio: 'ignore' });
  const log = path.join(dir, 'agent-stopped.log');
  const env = {
    ...process.env,
    PATH: `${shims}:${process.env.PATH}`,
    TMPDIR: path.join(dir, 'tmp'),
    NASBACKUP_LOG_FILE: log,
    LC_ALL: 'C.UTF-8',
  };
  const cleanup = (p: string): void => fs.rmSync(path.join(nas, p), { recursive: true, force: true });
  for (const bandwidth of bandwidths) {
    measure({
      name: `stopped VM (native copy, bind NAS${bandwidth ? `, -b ${bandwidth} MiB/s` : ', full speed: page-cached local copy'})`,
      vm,
      nas: ['-t', 'none', '-s', nas, '-m', 'bind', ...(bandwidth ? ['-b', bandwidth] : [])],
      disks: ['-d', disk],
      env,
      log,
      cleanup,
    });
  }
  // Issue 18: peak RSS flat in the disks' number and size (with the manifest, full speed).
  const second = path.join(dir, '6a0b6f3e-0000-4000-8000-00000000b0b2');
  fs.copyFileSync(disk, second);
  const shapes: Array<[string, string]> = [[`2 disks of ${mib} MiB`, `${disk},${second}`]];
  const sparse = path.join(dir, '6a0b6f3e-0000-4000-8000-00000000b0b3');
  if (sparseGib > 0) {
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', sparse, `${sparseGib}G`]);
    const w = [];
    for (let off = 0; off < sparseGib * 1024; off += 100) w.push('-c', `write -P ${0x10 + ((off / 100) % 200)} ${off}M 1M`);
    execFileSync('qemu-io', ['-f', 'qcow2', ...w, sparse], { stdio: 'ignore', maxBuffer: 64 << 20 });
    shapes.push([`a sparse disk (${sparseGib} GiB virtual, 1 MiB every 100 MiB)`, sparse]);
  }
  for (const [name, disks] of shapes) {
    const p = folder(vm);
    const t = timedRun(['-o', 'backup', '-v', vm, '-t', 'none', '-s', nas, '-m', 'bind', '-p', p, '-q', 'false', '-d', disks], env);
    cleanup(p);
    console.log(`  ${name}, with manifest: ${(t.ms / 1000).toFixed(2)} s, CPU ${t.cpu.toFixed(2)} s, peak RSS ${overIdle(t.rssKiB)}`);
  }
  fs.rmSync(second, { force: true });
  fs.rmSync(sparse, { force: true });
}

async function main(): Promise<void> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbe2e-bench-manifest-'));
  try {
    fs.mkdirSync(path.join(dir, 'tmp'));
    console.log(`bench-manifest: ${machineLine()} at start`);
    idleKiB = timedRun(['--version'], process.env).rssKiB;
    console.log(`idle RSS (nasbackup --version): ${(idleKiB / 1024).toFixed(1)} MiB`);
    if (which === 'stopped' || which === 'both') stopped(dir);
    if (which === 'running' || which === 'both') await running(dir);
    console.log(`load average at the end: ${loadAverage()}`);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

await main();
