// Benchmark (not a test): `nasbackup chain verify` on a 50-deep chain against the
// usual shell approach — `qemu-img info --backing-chain` plus `qemu-img check` for
// every file — measured in the same run on the same files.
//   npm run bench:verify [-- --depth 50 --runs 3]
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const arg = (name: string, dflt: number): number => {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? Number(process.argv[i + 1]) : dflt;
};
const depth = arg('depth', 50);
const runs = arg('runs', 3);
const BIN = fileURLToPath(new URL('../bin/nasbackup', import.meta.url));
const VM = 'i-9-99-VM';
const FILE = 'root.5f2c7e1a-0000-4000-8000-000000000001.qcow2';
const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

function time(fn: () => void): number {
  const t0 = process.hrtime.bigint();
  fn();
  return Number(process.hrtime.bigint() - t0) / 1e6;
}

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nasbackup-bench-verify-'));
const nas = path.join(dir, 'nas');
try {
  const files: string[] = [];
  for (let i = 0; i < depth; i++) {
    const ts = `2025.01.01.00.${String(Math.floor(i / 60)).padStart(2, '0')}.${String(i % 60).padStart(2, '0')}`;
    const f = path.join(nas, VM, ts, FILE);
    fs.mkdirSync(path.dirname(f), { recursive: true });
    if (i === 0) execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', f, '1G']);
    else
      execFileSync('qemu-img', [
        'create',
        '-q',
        '-f',
        'qcow2',
        '-b',
        `../${path.basename(path.dirname(files[i - 1]!))}/${FILE}`,
        '-F',
        'qcow2',
        f,
      ]);
    execFileSync('qemu-io', ['-f', 'qcow2', '-c', `write -P ${(i % 250) + 1} ${i * 4}M 1M`, f], { stdio: 'ignore' });
    files.push(f);
  }
  const env = { ...process.env, NASBACKUP_VERSION_CHECK: 'off', NASBACKUP_LOG_FILE: path.join(dir, 'agent.log'), TMPDIR: dir };
  const ours: number[] = [];
  const shell: number[] = [];
  for (let r = 0; r <= runs; r++) {
    const a = time(() => {
      const res = spawnSync(BIN, ['chain', 'verify', '-t', 'none', '-s', nas, '-m', 'bind', '--vm', VM], { env, encoding: 'utf8' });
      if (res.status !== 0) throw new Error(`chain verify failed:\n${res.stdout}`);
    });
    const b = time(() => {
      for (const f of files) {
        execFileSync('qemu-img', ['info', '--backing-chain', '--output=json', f], { stdio: 'ignore' });
        execFileSync('qemu-img', ['check', f], { stdio: 'ignore' });
      }
    });
    if (r > 0) {
      ours.push(a);
      shell.push(b);
    }
  }
  console.log(`chain verify, ${depth}-deep chain, ${runs} runs each (after one warm-up run)`);
  console.log(`  nasbackup chain verify (mount, headers, qemu-img check x2 in flight): median ${(median(ours) / 1000).toFixed(2)} s`);
  console.log(`  qemu-img info --backing-chain + qemu-img check per file:          median ${(median(shell) / 1000).toFixed(2)} s`);
  console.log(`  ratio nasbackup / shell: ${(median(ours) / median(shell)).toFixed(2)}x`);
} finally {
  fs.rmSync(dir, { recursive: true, force: true });
}
