// Benchmark (not a test), issue 18 (b): the offline incremental of a stopped VM after a
// share of its disk changed, against the full copy the original script makes of a stopped
// VM (`qemu-img convert -O qcow2`), same disk, same run, page cache dropped before each
// measured step. Ours is the whole CLI run (NAS bind mount, lock, plan, copy, manifest,
// bitmaps, commit); the original's is the copy alone (it does its mount etc. on top).
//   flock /tmp/nasbackup-bench.lock npm run bench:offline [-- --size-gib 16 --changed-pct 5 --fill-pct 100 --runs 5]
//   smaller: -- --size-gib 1 --runs 3
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

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
const BIN = fileURLToPath(new URL('../bin/nasbackup', import.meta.url));
const VM = 'i-2-77-VM';
const VOL = '5e1d0b7a-3c2f-4e6d-9a8b-7c6d5e4f3a21';
const PARENT = 'backup-1800000000';
const NEW = 'backup-1800000001';

const median = (xs: number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  const m = Math.floor(s.length / 2);
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
};
const spread = (xs: number[]): string => `${Math.min(...xs).toFixed(2)}–${Math.max(...xs).toFixed(2)}`;

function dropCaches(): void {
  execFileSync('sync');
  fs.writeFileSync('/proc/sys/vm/drop_caches', '3\n');
}

function qemuIo(file: string, cmds: string[]): void {
  // Many commands per qemu-io run (one open of the image), in batches so argv stays small.
  for (let i = 0; i < cmds.length; i += 512) {
    const r = spawnSync('qemu-io', ['-f', 'qcow2', ...cmds.slice(i, i + 512).flatMap((c) => ['-c', c]), file], { encoding: 'utf8' });
    if (r.status !== 0 || /error|failed/i.test(r.stdout)) throw new Error(`qemu-io: ${r.stdout}${r.stderr}`);
  }
}

function timed(fn: () => void): number {
  const t0 = process.hrtime.bigint();
  fn();
  return Number(process.hrtime.bigint() - t0) / 1e9;
}

function main(): void {
  const dir = fs.mkdtempSync(path.join(baseDir, 'nb-bench-offline-'));
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
  const cli = (args: string[]): string => {
    const r = spawnSync(BIN, args, { env, encoding: 'utf8' });
    if (r.status !== 0) throw new Error(`nasbackup ${args.join(' ')} failed (${r.status}):\n${r.stdout}${r.stderr}`);
    return r.stdout;
  };
  const nasArgs = ['-t', 'none', '-s', nas, '-m', 'bind'];
  const size = sizeGiB * GiB;
  // The disk, the parent full backup and qemu-img's copy each hold the data: never fill the file system.
  const st = fs.statfsSync(dir);
  const need = (3 * size * fillPct) / 100 + 2 * GiB;
  if (st.bavail * st.bsize < need) {
    fs.rmSync(dir, { recursive: true, force: true });
    throw new Error(
      `needs ${(need / GiB).toFixed(1)} GiB free in ${baseDir}, has ${((st.bavail * st.bsize) / GiB).toFixed(1)}: lower --fill-pct or --size-gib`,
    );
  }
  try {
    console.log(`setup: ${sizeGiB} GiB disk, ${fillPct} % filled, ${changedPct} % changed in ${pieceBytes / 1024} KiB pieces (${dir})`);
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', disk, String(size)]);
    const fill = Math.floor((size * fillPct) / 100 / (64 * MiB));
    qemuIo(
      disk,
      Array.from({ length: fill }, (_, i) => `write -P ${0x10 + (i % 200)} ${i * 64 * MiB} ${64 * MiB}`),
    );
    // The parent backup: our own stopped full (its manifest names PARENT; PARENT is seeded on the disk).
    const parentTs = '2026.03.01.00.00.00';
    cli(['-o', 'backup', '-v', VM, ...nasArgs, '-p', `${VM}/${parentTs}`, '-q', 'false', '-d', disk, '-M', 'full', '--bitmap-new', PARENT]);
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
    qemuIo(
      disk,
      [...used].sort((a, b) => a - b).map((s, i) => `write -P ${0x80 + (i % 100)} ${s * pieceBytes} ${pieceBytes}`),
    );
    const dirty = used.size * pieceBytes;
    // A disabled copy of PARENT restores the same starting point before every run.
    execFileSync('qemu-img', ['bitmap', '--add', '--disable', disk, 'keep']);
    execFileSync('qemu-img', ['bitmap', '--merge', PARENT, disk, 'keep']);

    const ours: number[] = [];
    const orig: number[] = [];
    const moved: number[] = [];
    /** The copy step alone (from the log line), without the CLI's fixed costs. */
    const copySecs: number[] = [];
    const files: number[] = [];
    for (let r = 0; r < runs; r++) {
      const ts = `2026.03.02.00.00.${String(r).padStart(2, '0')}`;
      const one = (): void => {
        dropCaches();
        ours.push(
          timed(() =>
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
        execFileSync('qemu-img', ['bitmap', '--remove', disk, NEW]);
        execFileSync('qemu-img', ['bitmap', '--add', disk, PARENT]);
        execFileSync('qemu-img', ['bitmap', '--merge', 'keep', disk, PARENT]);
      };
      const two = (): void => {
        const out = path.join(dir, 'orig.qcow2');
        dropCaches();
        orig.push(timed(() => execFileSync('qemu-img', ['convert', '-f', 'qcow2', '-O', 'qcow2', disk, out])));
        fs.rmSync(out, { force: true });
      };
      // Alternate the order so neither always runs second.
      if (r % 2 === 0) {
        one();
        two();
      } else {
        two();
        one();
      }
      console.log(`  run ${r + 1}: ours ${ours.at(-1)!.toFixed(2)} s, qemu-img convert ${orig.at(-1)!.toFixed(2)} s`);
    }
    const ratios = ours.map((t, i) => t / orig[i]!);
    console.log(
      `offline incremental (b): ${sizeGiB} GiB disk, ${fillPct} % data, ${changedPct} % changed (${(dirty / MiB).toFixed(0)} MiB dirty), ${runs} runs, caches dropped`,
    );
    console.log(`  ours (CLI, offline incremental)   median ${median(ours).toFixed(2)} s  spread ${spread(ours)} s`);
    console.log(`  original (qemu-img convert -O qcow2) median ${median(orig).toFixed(2)} s  spread ${spread(orig)} s`);
    console.log(`  paired ratio ours/original: median ${median(ratios).toFixed(3)}x  spread ${spread(ratios)}x  (goal ≤ 0.1x)`);
    const copyRatios = copySecs.map((t, i) => t / orig[i]!);
    console.log(
      `  ours, copy step alone (log): median ${median(copySecs).toFixed(2)} s  spread ${spread(copySecs)} s; paired ratio median ${median(copyRatios).toFixed(3)}x  spread ${spread(copyRatios)}x`,
    );
    console.log(
      `  bytes read by ours: median ${(median(moved) / MiB).toFixed(1)} MiB (${(median(moved) / dirty).toFixed(3)}x the dirty bytes); incremental file ${(median(files) / MiB).toFixed(1)} MiB`,
    );
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

main();
