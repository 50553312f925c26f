// Benchmark (not a test): wall time of `nasbackup restore` (native flatten, raw and qcow2)
// against `qemu-img convert -O raw` and `qemu-img convert -O qcow2 -m 16 -W` of the same point
// of the same chain (full + incrementals on a bind-mounted folder), median of --runs runs.
// Every output is checked against qemu-img's with `qemu-img compare`. Ours includes the mount,
// the lock, the chain pre-flight and the fsync; qemu-img (default cache mode) does none of these.
//   npm run bench:restore [-- --size-mib 1024 --layers 4 --data-mib 64 --runs 3]
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const arg = (name: string, dflt: number): number => {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? Number(process.argv[i + 1]) : dflt;
};
const MiB = 1024 * 1024;
const sizeMiB = arg('size-mib', 1024);
const layers = arg('layers', 4);
/** Data written per layer, in 4 MiB writes spread over the disk. */
const dataMiB = arg('data-mib', 64);
const runs = arg('runs', 3);
const BIN = fileURLToPath(new URL('../bin/nasbackup', import.meta.url));
const VM = 'i-2-10-VM';
const VOL = 'aaaaaaaa-0000-4000-8000-00000000be01';
const FILE = `root.${VOL}.qcow2`;

const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

function time(f: () => void): number {
  const t0 = process.hrtime.bigint();
  f();
  return Number(process.hrtime.bigint() - t0) / 1e6;
}

function main(): void {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nb-bench-restore-'));
  const nas = path.join(dir, 'nas');
  const tmp = path.join(dir, 'tmp');
  const out = path.join(dir, 'out');
  for (const d of [nas, tmp, out]) fs.mkdirSync(d);
  try {
    const ts = Array.from({ length: layers }, (_, i) => `2026.01.${String(i + 1).padStart(2, '0')}.00.00.00`);
    ts.forEach((t, i) => {
      const file = path.join(nas, VM, t, FILE);
      fs.mkdirSync(path.dirname(file), { recursive: true });
      execFileSync('qemu-img', [
        'create',
        '-q',
        '-f',
        'qcow2',
        ...(i === 0 ? [file, `${sizeMiB}M`] : ['-b', `../${ts[i - 1]}/${FILE}`, '-F', 'qcow2', file]),
      ]);
      // Spread the writes over the disk, each layer at its own offsets (some overlap the layer below).
      const cmds: string[] = [];
      const writes = Math.max(1, Math.floor(dataMiB / 4));
      for (let w = 0; w < writes; w++) {
        const off = ((w * 7919 + i * 4099) % Math.floor(sizeMiB / 4)) * 4 * MiB;
        cmds.push('-c', `write -P 0x${(0x10 + i * 16 + (w % 16)).toString(16)} ${off} ${4 * MiB}`);
      }
      execFileSync('qemu-io', ['-f', 'qcow2', ...cmds, file], { stdio: 'ignore' });
    });
    const top = path.join(nas, VM, ts.at(-1)!, FILE);
    const reference = path.join(out, 'reference.raw');
    execFileSync('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', top, reference]);
    const env = { ...process.env, TMPDIR: tmp, NASBACKUP_LOG_FILE: path.join(dir, 'nasbackup.log') };
    const ours = (format: string) => (to: string) => {
      const r = spawnSync(
        BIN,
        ['restore', '-t', 'none', '-s', nas, '-m', 'bind', '--backup', `${VM}/${ts.at(-1)}`, '--disk', VOL, '--to', to, '--format', format],
        { env, encoding: 'utf8' },
      );
      if (r.status !== 0) throw new Error(`nasbackup restore failed: ${r.stdout}${r.stderr}`);
    };
    const qemu = (extra: string[]) => (to: string) => void execFileSync('qemu-img', ['convert', '-f', 'qcow2', ...extra, top, to]);
    const variants: Array<[string, string, (to: string) => void]> = [
      ['nasbackup restore --format raw', 'raw', ours('raw')],
      ['qemu-img convert -O raw', 'raw', qemu(['-O', 'raw'])],
      // qemu-img's default cache mode for the output never flushes it; ours syncs the target before the rename.
      ['qemu-img convert -t writeback -O raw', 'raw', qemu(['-t', 'writeback', '-O', 'raw'])],
      ['nasbackup restore --format qcow2', 'qcow2', ours('qcow2')],
      ['qemu-img convert -O qcow2 -m 16 -W', 'qcow2', qemu(['-O', 'qcow2', '-m', '16', '-W'])],
    ];
    const times: number[][] = variants.map(() => []);
    // Run 0 warms the page cache and is not counted.
    for (let r = 0; r <= runs; r++) {
      for (const [i, [, format, f]] of variants.entries()) {
        const to = path.join(out, `v${i}.${format}`);
        const ms = time(() => f(to));
        execFileSync('qemu-img', ['compare', '-q', '-f', format, '-F', 'raw', to, reference]);
        if (r > 0) times[i]!.push(ms);
        fs.rmSync(to);
      }
    }
    console.log(`chain: ${layers} layers, ${sizeMiB} MiB virtual, ~${dataMiB} MiB written per layer; median of ${runs} runs`);
    for (const [i, [name]] of variants.entries()) {
      console.log(
        `  ${name.padEnd(40)} ${median(times[i]!).toFixed(0).padStart(7)} ms   (${times[i]!.map((t) => t.toFixed(0)).join(', ')})`,
      );
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

main();
