// Benchmark (not a test): what the manifest costs a backup. A stopped-VM backup (qemu-img
// convert of one disk full of data, then the manifest's read and digest of the copy) of a
// ~1 GiB disk onto a bind-mounted folder, timed end to end, median of N runs; the
// manifest step's own time comes from the log. With `--baseline <bin/nasbackup of a build
// without manifests>` the same runs are made with that build, interleaved.
//   npm run build && vite-node scripts/bench-manifest.ts -- [--mib 1024] [--runs 3] [--baseline <bin>]
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const arg = (name: string): string | undefined => {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? process.argv[i + 1] : undefined;
};
const MiB = 1024 * 1024;
const mib = Number(arg('mib') ?? 1024);
const runs = Number(arg('runs') ?? 3);
const baseline = arg('baseline');
const BIN = fileURLToPath(new URL('../bin/nasbackup', import.meta.url));
const VM = 'i-2-99-VM';
const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

function main(): void {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nb-bench-manifest-'));
  try {
    const nas = path.join(dir, 'nas');
    const tmp = path.join(dir, 'tmp');
    const shims = path.join(dir, 'shims');
    for (const d of [nas, tmp, shims]) fs.mkdirSync(d);
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
    const log = path.join(dir, 'agent.log');
    const env = { ...process.env, PATH: `${shims}:${process.env.PATH}`, TMPDIR: tmp, NASBACKUP_LOG_FILE: log, LC_ALL: 'C.UTF-8' };
    const variants: Array<[string, string]> = [['with manifest', BIN]];
    if (baseline) variants.push(['without manifest (baseline build)', baseline]);
    const times: number[][] = variants.map(() => []);
    const steps: number[] = [];
    let n = 0;
    // Run 0 warms the page cache and is not counted.
    for (let r = 0; r <= runs; r++) {
      // Alternate the order, so neither variant always runs right after the other's cleanup.
      const order = [...variants.entries()];
      if (r % 2 === 1) order.reverse();
      for (const [i, [, bin]] of order) {
        const p = `${VM}/2026.01.01.00.00.${String(++n).padStart(2, '0')}`;
        const t0 = process.hrtime.bigint();
        const res = spawnSync(bin, ['-o', 'backup', '-v', VM, '-t', 'none', '-s', nas, '-m', 'bind', '-p', p, '-q', 'false', '-d', disk], {
          env,
          encoding: 'utf8',
        });
        const ms = Number(process.hrtime.bigint() - t0) / 1e6;
        if (res.status !== 0) throw new Error(`backup failed (${res.status}): ${res.stdout}${res.stderr}`);
        const step = [...fs.readFileSync(log, 'utf8').matchAll(/Manifest of (\S+): \d+ disk\(s\) digested in (\d+) ms/g)].find(
          (m) => m[1] === p,
        );
        if (r > 0) {
          times[i]!.push(ms);
          if (step) steps.push(Number(step[2]));
        }
        fs.rmSync(path.join(nas, p), { recursive: true, force: true });
      }
    }
    console.log(`stopped-VM backup of a ${mib} MiB qcow2 disk (all data), median of ${runs} (after one warm-up run):`);
    for (const [i, [name]] of variants.entries())
      console.log(`  ${name}: ${median(times[i]!).toFixed(0)} ms  (runs: ${times[i]!.map((t) => t.toFixed(0)).join(', ')})`);
    if (steps.length)
      console.log(
        `  manifest step (read + SHA-256 of the copy, from the log): ${median(steps)} ms  (${((mib * MiB) / MiB / (median(steps) / 1000)).toFixed(0)} MiB/s)`,
      );
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

main();
