// Benchmark (not a test): wall time of a running-VM backup in the e2e lab with our
// growing poll (100 ms, x1.5, capped at 1 s) against the original design's fixed
// 5-second poll, measured in the same run on the same guest and NAS.
//   npm run bench:backup [-- --data-mib 384 --runs 3]
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { createQcow2, ensureLab, guestWrite, loopNas, makeNasImage, startGuest } from '../test/e2e/lab.js';
import { machineLine, median } from './lib/stats.js';

const arg = (name: string, dflt: number): number => {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? Number(process.argv[i + 1]) : dflt;
};
const MiB = 1024 * 1024;
const dataMiB = arg('data-mib', 384);
const runs = arg('runs', 5);
const BIN = fileURLToPath(new URL('../bin/nasbackup', import.meta.url));
const VM = `nbe2e-bench-${process.pid}`;

async function main(): Promise<void> {
  await ensureLab();
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbe2e-bench-'));
  const tmp = path.join(dir, 'tmp');
  fs.mkdirSync(tmp);
  const disk = path.join(dir, '6a0b6f3e-0000-4000-8000-00000000b001');
  await createQcow2(disk, (dataMiB + 64) * MiB);
  const img = makeNasImage(path.join(dir, 'nas.img'), `${Math.max(1024, dataMiB * 4)}M`);
  const guest = await startGuest({ name: VM, disks: [disk], dir });
  try {
    for (let off = 0; off < dataMiB; off += 64) {
      await guestWrite(VM, {
        target: 'vda',
        pattern: 0x10 + ((off / 64) % 200),
        offset: off * MiB,
        length: Math.min(64, dataMiB - off) * MiB,
      });
    }
    const variants: Array<[string, NodeJS.ProcessEnv]> = [
      ['nasbackup (growing poll, 0.1 s -> 1 s)', {}],
      ['original design (fixed 5 s poll)', { NASBACKUP_JOB_POLL_INITIAL: '5', NASBACKUP_JOB_POLL_MAX: '5' }],
    ];
    const times: number[][] = variants.map(() => []);
    let n = 0;
    // Run 0 warms caches (page cache, libvirt capabilities) and is not counted.
    for (let r = 0; r <= runs; r++) {
      for (const [i, [, env]] of variants.entries()) {
        const p = `${VM}/2026.01.01.00.00.${String(++n).padStart(2, '0')}`;
        const nas = loopNas(img);
        const t0 = process.hrtime.bigint();
        const res = spawnSync(BIN, ['-o', 'backup', '-v', VM, ...nas, '-p', p, '-q', 'false', '-d', ''], {
          env: { ...process.env, ...env, TMPDIR: tmp, NASBACKUP_LOG_FILE: path.join(dir, 'agent.log') },
          encoding: 'utf8',
        });
        const ms = Number(process.hrtime.bigint() - t0) / 1e6;
        if (res.status !== 0) throw new Error(`backup failed (${res.status}):\n${res.stdout}`);
        if (r > 0) times[i]!.push(ms);
        spawnSync(BIN, ['-o', 'delete', ...nas, '-p', p], {
          env: { ...process.env, TMPDIR: tmp, NASBACKUP_LOG_FILE: path.join(dir, 'agent.log') },
        });
      }
    }
    console.log(`running-VM backup, ${dataMiB} MiB of data, ${runs} runs each (TCG guest, loop-ext4 NAS); ${machineLine()}`);
    for (const [i, [name]] of variants.entries()) {
      console.log(
        `  ${name.padEnd(42)} median ${(median(times[i]!) / 1000).toFixed(2)} s  runs ${times[i]!.map((t) => (t / 1000).toFixed(2)).join(' ')}`,
      );
    }
    console.log(`  ratio nasbackup / original design: ${(median(times[0]!) / median(times[1]!)).toFixed(2)}x`);
  } finally {
    await guest.destroy().catch(() => {});
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

await main();
