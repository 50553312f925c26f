// Benchmark (not a test), issue 18 (b): the offline incremental of a stopped VM after a
// share of its disk changed, against the full copy the original script makes of a stopped
// VM (`qemu-img convert -O qcow2`), same disk, same run, page cache dropped before each
// measured step. Ours is the whole CLI run (NAS bind mount, lock, plan, copy, manifest,
// bitmaps, commit); the original's is the copy alone (it does its mount etc. on top).
//   flock /tmp/nasbackup-bench.lock npm run bench:offline [-- --size-gib 16 --changed-pct 5 --fill-pct 100 --runs 5]
//   smaller: -- --size-gib 1 --runs 3
// Its files (tens of GiB at the default shape) are removed on every way out: success,
// failure, and SIGINT/SIGTERM/SIGHUP (the running child is stopped first, so the CLI
// undoes its own mount; then `rm --one-file-system`, which never crosses into a mount).
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { machineLine, median, pairedRatios, spread } from './lib/stats.js';

const arg = (name: string, dflt: number): number => {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? Number(process.argv[i + 1]) : dflt;
};
const strArg = (name: string, dflt: string): string => {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? process.argv[i + 1]! : dflt;
};
const MiB = 1024 * 1024;
const GiB = 1024 * MiB;
const sizeGiB = arg('size-gib', 16);
const changedPct = arg('changed-pct', 5);
const fillPct = arg('fill-pct', 100);
const runs = arg('runs', 5);
/** Bytes per changed piece (random 64 KiB-aligned offsets). */
const pieceBytes = arg('piece-kib', 1024) * 1024;
const baseDir = strArg('dir', os.tmpdir());
/** Keep the agent log of the runs here (it goes with the bench's folder otherwise). */
const keepLog = strArg('keep-log', '');
const BIN = fileURLToPath(new URL('../bin/nasbackup', import.meta.url));
const VM = 'i-2-77-VM';
const VOL = '5e1d0b7a-3c2f-4e6d-9a8b-7c6d5e4f3a21';
const PARENT = 'backup-1800000000';
const NEW = 'backup-1800000001';

/** The child running now: stopped by a signal before the files go. */
let current: ChildProcess | null = null;
let stopping = false;

/** Run a command to its end (async, so a signal is handled while it runs); throws on failure. */
function run(cmd: string, args: string[], opts: { env?: NodeJS.ProcessEnv } = {}): Promise<{ stdout: string; stderr: string }> {
  if (stopping) return Promise.reject(new Error('stopping'));
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { env: opts.env ?? process.env, stdio: ['ignore', 'pipe', 'pipe'] });
    current = child;
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    child.on('error', reject);
    child.on('close', (code, signal) => {
      if (current === child) current = null;
      if (code === 0) resolve({ stdout, stderr });
      else reject(new Error(`${cmd} ${args.slice(0, 8).join(' ')} failed (${code ?? signal}):\n${stdout}${stderr}`));
    });
  });
}

async function dropCaches(): Promise<void> {
  await run('sync', []);
  fs.writeFileSync('/proc/sys/vm/drop_caches', '3\n');
}

async function qemuIo(file: string, cmds: string[]): Promise<void> {
  // Many commands per qemu-io run (one open of the image), in batches so argv stays small.
  for (let i = 0; i < cmds.length; i += 512) {
    const r = await run('qemu-io', ['-f', 'qcow2', ...cmds.slice(i, i + 512).flatMap((c) => ['-c', c]), file]);
    if (/error|failed/i.test(r.stdout)) throw new Error(`qemu-io: ${r.stdout}${r.stderr}`);
  }
}

async function timed(fn: () => Promise<unknown>): Promise<number> {
  const t0 = process.hrtime.bigint();
  await fn();
  return Number(process.hrtime.bigint() - t0) / 1e9;
}

/** Remove the bench's folder without ever following a mount out of it. */
function removeDir(dir: string): void {
  if (!fs.existsSync(dir)) return;
  const r = spawnSync('rm', ['-rf', '--one-file-system', dir], { encoding: 'utf8' });
  if (r.status !== 0 || fs.existsSync(dir)) console.error(`bench-offline: could not remove ${dir} entirely: ${r.stderr}`);
}

/** Whether process `pid` has ended (gone, or a zombie not yet reaped: the event loop is not running). */
function ended(pid: number): boolean {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2).startsWith('Z');
  } catch {
    return true;
  }
}

/**
 * On a signal: stop the child (the CLI undoes its mount on SIGTERM), wait for it (bounded),
 * remove the files, exit. All synchronous: a runner's own SIGTERM listener (vite-node's
 * server exits on it) must not end the process before the files are gone.
 */
function onSignals(dir: string): void {
  const handler = (sig: NodeJS.Signals): void => {
    if (stopping) return;
    stopping = true;
    console.error(`bench-offline: ${sig}, stopping and removing ${dir}`);
    const pid = current?.pid;
    if (pid !== undefined && !ended(pid)) {
      const pause = new Int32Array(new SharedArrayBuffer(4));
      process.kill(pid, 'SIGTERM');
      const until = Date.now() + 60_000;
      while (!ended(pid) && Date.now() < until) Atomics.wait(pause, 0, 0, 50);
      if (!ended(pid)) process.kill(pid, 'SIGKILL');
      for (let i = 0; i < 100 && !ended(pid); i++) Atomics.wait(pause, 0, 0, 50);
    }
    removeDir(dir);
    process.exit(128 + (os.constants.signals[sig] ?? 15));
  };
  for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) process.on(sig, handler);
}

async function main(): Promise<void> {
  const dir = fs.mkdtempSync(path.join(baseDir, 'nb-bench-offline-'));
  onSignals(dir);
  try {
    const disk = path.join(dir, 'pool', VOL);
    const nas = path.join(dir, 'nas');
    const tmp = path.join(dir, 'tmp');
    for (const d of [path.dirname(disk), nas, tmp]) fs.mkdirSync(d, { recursive: true });
    // A libvirt stand-in: the VM is not running (absent from `virsh list`).
    const virsh = path.join(dir, 'virsh');
    fs.writeFileSync(
      virsh,
      `#!/bin/sh\ncase " $* " in\n*" version "*) printf 'Compiled against library: libvirt 9.0.0\\nUsing library: libvirt 9.0.0\\nUsing API: QEMU 9.0.0\\nRunning hypervisor: QEMU 7.2.0\\n\\n';;\n*" list "*) printf ' Id   Name   State\\n--------------------\\n\\n';;\n*) echo "virsh stand-in: $*" >&2; exit 1;;\nesac\n`,
      { mode: 0o755 },
    );
    const env = { ...process.env, TMPDIR: tmp, NASBACKUP_LOG_FILE: path.join(dir, 'agent.log'), NASBACKUP_VIRSH: virsh };
    const cli = async (args: string[]): Promise<string> => (await run(BIN, args, { env })).stdout;
    const nasArgs = ['-t', 'none', '-s', nas, '-m', 'bind'];
    const size = sizeGiB * GiB;
    // The disk, the parent full backup and qemu-img's copy each hold the data: never fill the file system.
    const st = fs.statfsSync(dir);
    const need = (3 * size * fillPct) / 100 + 2 * GiB;
    if (st.bavail * st.bsize < need) {
      throw new Error(
        `needs ${(need / GiB).toFixed(1)} GiB free in ${baseDir}, has ${((st.bavail * st.bsize) / GiB).toFixed(1)}: lower --fill-pct or --size-gib`,
      );
    }
    console.log(`setup: ${sizeGiB} GiB disk, ${fillPct} % filled, ${changedPct} % changed in ${pieceBytes / 1024} KiB pieces (${dir})`);
    await run('qemu-img', ['create', '-q', '-f', 'qcow2', disk, String(size)]);
    const fill = Math.floor((size * fillPct) / 100 / (64 * MiB));
    await qemuIo(
      disk,
      Array.from({ length: fill }, (_, i) => `write -P ${0x10 + (i % 200)} ${i * 64 * MiB} ${64 * MiB}`),
    );
    // The parent backup: our own stopped full (its manifest names PARENT; PARENT is seeded on the disk).
    const parentTs = '2026.03.01.00.00.00';
    await cli([
      '-o',
      'backup',
      '-v',
      VM,
      ...nasArgs,
      '-p',
      `${VM}/${parentTs}`,
      '-q',
      'false',
      '-d',
      disk,
      '-M',
      'full',
      '--bitmap-new',
      PARENT,
    ]);
    // What the guest changed since (recorded in PARENT), from a fixed pseudo-random sequence.
    const pieces = Math.round((size * changedPct) / 100 / pieceBytes);
    const slots = Math.floor(size / pieceBytes);
    const used = new Set<number>();
    // xorshift32: a fixed pseudo-random sequence (32-bit integer arithmetic, no precision loss).
    let x = 0x9e3779b9;
    const want = Math.min(pieces, slots);
    for (let i = 0; used.size < want && i < 64 * want + 1024; i++) {
      x ^= x << 13;
      x ^= x >>> 17;
      x ^= x << 5;
      used.add((x >>> 0) % slots);
    }
    await qemuIo(
      disk,
      [...used].sort((a, b) => a - b).map((s, i) => `write -P ${0x80 + (i % 100)} ${s * pieceBytes} ${pieceBytes}`),
    );
    const dirty = used.size * pieceBytes;
    // A disabled copy of PARENT restores the same starting point before every run.
    await run('qemu-img', ['bitmap', '--add', '--disable', disk, 'keep']);
    await run('qemu-img', ['bitmap', '--merge', PARENT, disk, 'keep']);

    const ours: number[] = [];
    const orig: number[] = [];
    const moved: number[] = [];
    /** The copy step alone (from the log line), without the CLI's fixed costs. */
    const copySecs: number[] = [];
    const files: number[] = [];
    for (let r = 0; r < runs; r++) {
      const ts = `2026.03.02.00.00.${String(r).padStart(2, '0')}`;
      const one = async (): Promise<void> => {
        await dropCaches();
        ours.push(
          await timed(() =>
            cli([
              '-o',
              'backup',
              '-v',
              VM,
              ...nasArgs,
              '-p',
              `${VM}/${ts}`,
              '-q',
              'false',
              '-d',
              disk,
              '-M',
              'incremental',
              '--bitmap-new',
              NEW,
              '--bitmap-parent',
              PARENT,
              '--parent-paths',
              `${VM}/${parentTs}/root.${VOL}.qcow2`,
            ]),
          ),
        );
        const log = fs.readFileSync(path.join(dir, 'agent.log'), 'utf8');
        if (/not possible/.test(log.split('\n').slice(-40).join('\n'))) throw new Error('the run fell back to a full copy; see agent.log');
        const m = [...log.matchAll(/, (\d+) bytes read, .*, ([\d.]+) s \(/g)].at(-1);
        moved.push(Number(m?.[1] ?? NaN));
        copySecs.push(Number(m?.[2] ?? NaN));
        files.push(fs.statSync(path.join(nas, VM, ts, `root.${VOL}.qcow2`)).size);
        fs.rmSync(path.join(nas, VM, ts), { recursive: true, force: true });
        // Back to the starting point: PARENT as it was, NEW gone.
        await run('qemu-img', ['bitmap', '--remove', disk, NEW]);
        await run('qemu-img', ['bitmap', '--add', disk, PARENT]);
        await run('qemu-img', ['bitmap', '--merge', 'keep', disk, PARENT]);
      };
      const two = async (): Promise<void> => {
        const out = path.join(dir, 'orig.qcow2');
        await dropCaches();
        orig.push(await timed(() => run('qemu-img', ['convert', '-f', 'qcow2', '-O', 'qcow2', disk, out])));
        fs.rmSync(out, { force: true });
      };
      // Alternate the order so neither always runs second.
      if (r % 2 === 0) {
        await one();
        await two();
      } else {
        await two();
        await one();
      }
      console.log(`  run ${r + 1}: ours ${ours.at(-1)!.toFixed(2)} s, qemu-img convert ${orig.at(-1)!.toFixed(2)} s`);
    }
    const ratios = pairedRatios(ours, orig);
    console.log(
      `offline incremental (b): ${sizeGiB} GiB disk, ${fillPct} % data, ${changedPct} % changed (${(dirty / MiB).toFixed(0)} MiB dirty), ${runs} runs, caches dropped; ${machineLine()}`,
    );
    console.log(`  ours (CLI, offline incremental)   median ${median(ours).toFixed(2)} s  spread ${spread(ours)} s`);
    console.log(`  original (qemu-img convert -O qcow2) median ${median(orig).toFixed(2)} s  spread ${spread(orig)} s`);
    console.log(`  paired ratio ours/original: median ${median(ratios).toFixed(3)}x  spread ${spread(ratios)}x  (goal ≤ 0.1x)`);
    const copyRatios = pairedRatios(copySecs, orig);
    console.log(
      `  ours, copy step alone (log): median ${median(copySecs).toFixed(2)} s  spread ${spread(copySecs)} s; paired ratio median ${median(copyRatios).toFixed(3)}x  spread ${spread(copyRatios)}x`,
    );
    console.log(
      `  bytes read by ours: median ${(median(moved) / MiB).toFixed(1)} MiB (${(median(moved) / dirty).toFixed(3)}x the dirty bytes); incremental file ${(median(files) / MiB).toFixed(1)} MiB`,
    );
  } finally {
    if (keepLog && fs.existsSync(path.join(dir, 'agent.log'))) fs.copyFileSync(path.join(dir, 'agent.log'), keepLog);
    removeDir(dir);
  }
}

await main();
