// Shared pieces of scripts/bench-copy.ts: options, cache dropping, timing with peak RSS,
// medians with spread, images built with qemu-io, the CLI against a bind-mounted local NAS
// (a virsh stand-in that lists no running domain: every backup takes the stopped path), and
// the physical floor. Sections (a), (b), (c), (d) live in their own files beside this one.
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { median, pairedRatios, spread as statsSpread } from '../lib/stats.js';

export const argv = process.argv.slice(2);
export const opt = (name: string, dflt: string): string => {
  const i = argv.indexOf(`--${name}`);
  return i >= 0 && argv[i + 1] ? argv[i + 1]! : dflt;
};
export const flag = (name: string): boolean => argv.includes(`--${name}`);
export const bytes = (s: string): number => {
  const m = /^(\d+(?:\.\d+)?)([KMGT]?)$/i.exec(s);
  if (!m) throw new Error(`bad size ${s}`);
  return Math.round(Number(m[1]) * 1024 ** ' KMGT'.indexOf((m[2] || ' ').toUpperCase()));
};
export const MiB = 1 << 20;
export const GiB = 1 << 30;
export const ROOT = fileURLToPath(new URL('../..', import.meta.url));
export const BIN = path.join(ROOT, 'bin/nasbackup');
/** Another checkout's (built) bin/nasbackup, run beside ours in every round (an A/B of a change): --baseline <checkout>. */
export const BASELINE_BIN = opt('baseline', '') && path.join(path.resolve(opt('baseline', '')), 'bin/nasbackup');
export const RUNS = Math.max(1, Number(opt('runs', '5')));

export const fmtB = (n: number): string => (n >= GiB ? `${(n / GiB).toFixed(2)} GiB` : `${(n / MiB).toFixed(1)} MiB`);

/** --no-drop: keep caches (a smoke run beside another benchmark must not disturb it). */
export function dropCaches(): boolean {
  if (flag('no-drop')) return false;
  spawnSync('sync');
  try {
    fs.writeFileSync('/proc/sys/vm/drop_caches', '3');
    return true;
  } catch {
    return false; // not root: warm-cache numbers
  }
}

export interface Run {
  seconds: number;
  /** Peak RSS of the measured process (KiB). */
  rssKiB: number;
  /** CPU seconds (user + system) of the process and its children: steadier than wall time on a loaded host. */
  cpuSeconds?: number;
}

/** Run a command under /usr/bin/time: wall time and the peak RSS of the process. */
export function timed(
  cmd: string,
  args: string[],
  env: NodeJS.ProcessEnv = process.env,
): Promise<Run & { stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const t0 = process.hrtime.bigint();
    const c = spawn('/usr/bin/time', ['-f', 'RSSKIB=%M CPU=%U+%S', cmd, ...args], { stdio: ['ignore', 'pipe', 'pipe'], env });
    let stdout = '';
    let stderr = '';
    c.stdout.on('data', (d) => (stdout += d));
    c.stderr.on('data', (d) => (stderr += d));
    c.on('close', (code) => {
      const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
      const m = /RSSKIB=(\d+)/.exec(stderr);
      const cpu = /CPU=([\d.]+)\+([\d.]+)/.exec(stderr);
      const cpuSeconds = cpu ? Number(cpu[1]) + Number(cpu[2]) : 0;
      if (code !== 0) reject(new Error(`${cmd} ${args.join(' ')} failed (${code}):\n${stdout}\n${stderr}`));
      else resolve({ seconds, rssKiB: m ? Number(m[1]) : 0, cpuSeconds, stdout, stderr });
    });
  });
}

export { loadAverage, machineLine, median } from '../lib/stats.js';

/** "median s (min–max)". */
export const spread = (xs: number[]): string => `${median(xs).toFixed(2)} s (${statsSpread(xs)})`;

/** Paired ratios a[i]/b[i] of the same run: median and range. */
export const ratio = (a: number[], b: number[]): string => {
  const r = pairedRatios(a, b);
  return `${median(r).toFixed(2)}× (${statsSpread(r)})`;
};

export function qemuIo(file: string, cmds: string[]): void {
  for (let i = 0; i < cmds.length; i += 256) {
    const r = spawnSync('qemu-io', ['-f', 'qcow2', ...cmds.slice(i, i + 256).flatMap((c) => ['-c', c]), file], { encoding: 'utf8' });
    if (r.status !== 0) throw new Error(`qemu-io: ${r.stderr}`);
  }
}

/** A qcow2 of `virtual` bytes with `piece` bytes of data every `stride` bytes up to `dataEnd` (random bytes: no zero clusters). */
export function makeShape(file: string, virtual: number, piece: number, stride: number, dataEnd: number): number {
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', file, String(virtual)]);
  // qemu-io has no random fill: write patterns that differ per piece (never all zeros).
  const cmds: string[] = [];
  let data = 0;
  for (let o = 0; o < dataEnd; o += stride) {
    for (let p = 0; p < piece; p += 64 * MiB) {
      const n = Math.min(64 * MiB, piece - p, virtual - o - p);
      if (n <= 0) break;
      cmds.push(`write -P ${1 + ((o / stride + p / MiB) % 250)} ${o + p} ${n}`);
      data += n;
    }
  }
  qemuIo(file, cmds);
  return data;
}

/** A sandbox for CLI runs: a NAS folder (bind-mounted by each run), TMPDIR, a virsh stand-in, the agent log. */
export interface CliBox {
  dir: string;
  nas: string;
  env: NodeJS.ProcessEnv;
}

export function cliBox(dir: string): CliBox {
  const nas = path.join(dir, 'nas');
  const tmp = path.join(dir, 'tmp');
  const shims = path.join(dir, 'shims');
  for (const d of [nas, tmp, shims]) fs.mkdirSync(d, { recursive: true });
  // No domain is running: -o backup takes the stopped path with the -d disks.
  fs.writeFileSync(
    path.join(shims, 'virsh'),
    `#!/bin/sh\ncase " $* " in *" version "*) printf 'Compiled against library: libvirt 9.0.0\\nUsing library: libvirt 9.0.0\\nUsing API: QEMU 9.0.0\\nRunning hypervisor: QEMU 7.2.0\\n\\n';; *" list "*) printf ' Id   Name   State\\n--------------------\\n\\n';; esac\n`,
    { mode: 0o755 },
  );
  return {
    dir,
    nas,
    env: { ...process.env, PATH: `${shims}:${process.env.PATH}`, TMPDIR: tmp, NASBACKUP_LOG_FILE: path.join(dir, 'agent.log') },
  };
}

let backups = 0;
/** `nasbackup -o backup` of a stopped VM through the CLI (bind-mounted NAS); returns the run and the backup folder. */
export async function cliStoppedBackup(box: CliBox, vm: string, disks: string[], bin = BIN): Promise<Run & { folder: string }> {
  const ts = `2026.01.01.00.${String(Math.floor(backups / 60)).padStart(2, '0')}.${String(backups % 60).padStart(2, '0')}`;
  backups++;
  const r = await timed(
    bin,
    ['-o', 'backup', '-v', vm, '-t', 'none', '-s', box.nas, '-m', 'bind', '-p', `${vm}/${ts}`, '-q', 'false', '-d', disks.join(',')],
    box.env,
  );
  return { seconds: r.seconds, rssKiB: r.rssKiB, cpuSeconds: r.cpuSeconds ?? 0, folder: path.join(box.nas, vm, ts) };
}

/** Peak RSS of `nasbackup --version` (the program idle), KiB. */
export async function idleRssKiB(): Promise<number> {
  return (await timed(BIN, ['--version'])).rssKiB;
}

/**
 * The floor of copying a qcow2's allocated bytes: its host data ranges (from `qemu-img map`,
 * taken before timing) read once in host order (--floor-chunk, default 2 MiB, 4 in flight: on
 * the virtio disk of the test machine 8 MiB reads in parallel were 2-4x slower than 1-2 MiB
 * ones) and written in order into a new file in `dstDir`, then fdatasync.
 */
export async function floorCopy(src: string, dstDir: string): Promise<Run & { bytes: number }> {
  const map = JSON.parse(execFileSync('qemu-img', ['map', '--output=json', src], { encoding: 'utf8', maxBuffer: 256 << 20 })) as Array<{
    data: boolean;
    offset?: number;
    length: number;
  }>;
  const ranges: Array<[number, number]> = [];
  for (const e of map) {
    if (!e.data || e.offset === undefined) continue;
    const last = ranges.at(-1);
    if (last && last[0] + last[1] === e.offset) last[1] += e.length;
    else ranges.push([e.offset, e.length]);
  }
  const rfile = path.join(dstDir, 'floor-ranges.json');
  fs.writeFileSync(rfile, JSON.stringify(ranges));
  const dst = path.join(dstDir, 'floor.bin');
  const chunk = bytes(opt('floor-chunk', '2M'));
  const script = `
    import fs from 'node:fs/promises';
    const ranges = JSON.parse(await fs.readFile(${JSON.stringify(rfile)}, 'utf8'));
    const chunks = [];
    for (const [o, n] of ranges) for (let d = 0; d < n; d += ${chunk}) chunks.push([o + d, Math.min(${chunk}, n - d)]);
    const src = await fs.open(${JSON.stringify(src)}, 'r');
    const dst = await fs.open(${JSON.stringify(dst)}, 'wx');
    let next = 0, at = 0, tail = Promise.resolve();
    const worker = async () => {
      // Page-aligned (a WebAssembly memory): the kernel's page-cache copies are fastest there.
      const buf = Buffer.from(new WebAssembly.Memory({ initial: Math.ceil(${chunk} / 65536) }).buffer, 0, ${chunk});
      for (;;) {
        const i = next++;
        if (i >= chunks.length) return;
        const [o, n] = chunks[i];
        await src.read(buf, 0, n, o);
        const w = tail.then(() => dst.write(buf, 0, n, at)).then(() => { at += n; });
        tail = w;
        await w;
      }
    };
    await Promise.all([worker(), worker(), worker(), worker()]);
    await dst.datasync(); await dst.close(); await src.close();
    console.log(chunks.reduce((a, c) => a + c[1], 0));`;
  const r = await timed(process.execPath, ['--input-type=module', '-e', script]);
  fs.rmSync(dst, { force: true });
  return { seconds: r.seconds, rssKiB: r.rssKiB, cpuSeconds: r.cpuSeconds ?? 0, bytes: Number(r.stdout.trim()) };
}

export function scratch(tag: string): string {
  const base = opt('dir', os.tmpdir());
  return fs.mkdtempSync(path.join(base, `nbbench-copy-${tag}-`));
}
