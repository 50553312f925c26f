// Backup options and parallel backups on real libvirt + QEMU (TCG): -b measurably limits
// a running backup's copy rate (QEMU's own job statistics, sampled while it runs), and two
// guests backed up at the same moment onto one NAS (each run mounting it on its own) both
// get complete backups. The NAS is a folder bind-mounted by each run (`-t none -m bind`):
// a loop-mounted image would be a separate ext4 mount per run, which is no NAS.
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createQcow2, ensureLab, type Guest, type Outcome, type Sandbox, sandbox, sleep, startGuest, virsh } from './lab.js';

const MiB = 1024 * 1024;
const BIG = `nbe2e-opt-${process.pid}`;
const SMALL = `nbe2e-opt2-${process.pid}`;
const BIG_VOL = '4a1b2c3d-0e0f-4a5b-8c7d-6e5f4a3b2c01';
const SMALL_VOL = '5b2c3d4e-1f10-4b6c-9d8e-7f6a5b4c3d02';
/**
 * The big guest's disk and its data. The limit goes on the job right after backup-begin
 * returns, and QEMU copies at full speed until then (up to ~250 MiB seen here, ~150 ms):
 * the data must outlast that burst so the job spends ~20 s at the limit.
 */
const BIG_SIZE = 1024 * MiB;
const BIG_DATA = 960 * MiB;
const LIMIT_MIB = 32;

/** `File processed` and `Time elapsed` of a domjobinfo block, in bytes and ms. */
function jobFigures(block: string): { bytes: number; ms: number } {
  const unit: Record<string, number> = { B: 1, KiB: 1024, MiB, GiB: 1024 * MiB };
  const p = /File processed:\s+([\d.]+) (B|KiB|MiB|GiB)/.exec(block);
  const t = /Time elapsed:\s+(\d+)\s+ms/.exec(block);
  if (!p || !t) throw new Error(`no job figures in:\n${block}`);
  return { bytes: Number(p[1]) * unit[p[2]!]!, ms: Number(t[1]) };
}

describe.sequential('backup options and parallel backups on real guests', () => {
  let sb: Sandbox;
  let nas = '';
  let big: Guest | undefined;
  let small: Guest | undefined;
  let bigDisk = '';
  let smallDisk = '';
  let ts = 0;

  const cli = (args: string[]): Promise<Outcome> => sb.cli(args);

  const backupArgs = (vm: string, p: string, extra: string[] = []): string[] => [
    '-o',
    'backup',
    '-v',
    vm,
    '-t',
    'none',
    '-s',
    nas,
    '-m',
    'bind',
    '-p',
    p,
    '-q',
    'false',
    '-d',
    '',
    ...extra,
  ];
  const nextPath = (vm: string) => `${vm}/2026.02.01.00.00.${String(++ts).padStart(2, '0')}`;

  /** Exit 0, the job block, the byte total last (rebase-era, no checkpoint asked). */
  function expectGood(out: Outcome, p: string): { bytes: number; ms: number } {
    expect(out.code).toBe(0);
    const lines = out.stdout.trimEnd().split('\n');
    const total = lines.at(-1)!;
    expect(total).toMatch(/^\d+$/);
    expect(total).toBe(execFileSync('du', ['-sb', path.join(nas, p)], { encoding: 'utf8' }).split('\t')[0]);
    expect(out.stdout).toMatch(/^Job type:\s+Completed/);
    return jobFigures(out.stdout);
  }

  async function expectEqualsLive(vm: string, file: string, live: string): Promise<void> {
    await virsh(['suspend', vm], { check: true });
    try {
      expect(execFileSync('qemu-img', ['compare', '-U', file, live], { encoding: 'utf8' })).toContain('Images are identical');
    } finally {
      await virsh(['resume', vm], { check: true });
    }
  }

  const nothingLeft = () => expect(sb.leftovers()).toEqual({ tmp: [], mounted: false });

  beforeAll(async () => {
    await ensureLab();
    sb = sandbox('nbe2e-opt-');
    nas = path.join(sb.dir, 'nas');
    fs.mkdirSync(nas);
    bigDisk = path.join(sb.pool, BIG_VOL);
    smallDisk = path.join(sb.pool, SMALL_VOL);
    await createQcow2(bigDisk, BIG_SIZE);
    await createQcow2(smallDisk, 64 * MiB);
    // Data the backup must copy (a pattern, so nothing reads as zeros).
    execFileSync('qemu-io', ['-f', 'qcow2', '-c', `write -P 0x5a 0 ${BIG_DATA}`, bigDisk], { stdio: 'ignore' });
    execFileSync('qemu-io', ['-f', 'qcow2', '-c', `write -P 0x6b 0 ${24 * MiB}`, smallDisk], { stdio: 'ignore' });
    big = await startGuest({ name: BIG, disks: [bigDisk], dir: sb.dir });
    small = await startGuest({ name: SMALL, disks: [smallDisk], dir: sb.dir });
  }, 600_000);

  afterAll(async () => {
    await big?.destroy().catch(() => {});
    await small?.destroy().catch(() => {});
    sb?.remove();
  });

  let unthrottled = { bytes: 0, ms: 0 };

  it('without -b: the reference run (QEMU copies as fast as it can)', async () => {
    const p = nextPath(BIG);
    unthrottled = expectGood(await cli(backupArgs(BIG, p)), p);
    console.log(
      `unthrottled: ${(unthrottled.bytes / MiB).toFixed(0)} MiB in ${unthrottled.ms} ms = ${(((unthrottled.bytes / MiB) * 1000) / unthrottled.ms).toFixed(1)} MiB/s`,
    );
    await expectEqualsLive(BIG, path.join(nas, p, `root.${BIG_VOL}.qcow2`), bigDisk);
    nothingLeft();
  });

  it(`-b ${LIMIT_MIB}: the job's limit is set, its copy rate stays below the limit × 1.5, the backup is complete`, async () => {
    const p = nextPath(BIG);
    const run = cli(backupArgs(BIG, p, ['-b', String(LIMIT_MIB)]));
    // Sample QEMU's own view of the job while it runs: offset (bytes copied) and speed (its limit).
    const samples: Array<{ t: number; offset: number; speed: number }> = [];
    let finished = false;
    void run.then(() => (finished = true));
    while (!finished) {
      const r = await virsh(['qemu-monitor-command', BIG, '{"execute":"query-block-jobs"}'], { timeoutMs: 30_000 });
      const job =
        r.exitCode === 0
          ? (JSON.parse(r.stdout) as { return: Array<Record<string, unknown>> }).return.find((j) => j.type === 'backup')
          : undefined;
      if (job && job.status === 'running') samples.push({ t: Date.now(), offset: Number(job.offset), speed: Number(job.speed) });
      await sleep(1000);
    }
    const out = await run;
    const throttled = expectGood(out, p);
    const limited = samples.filter((s) => s.speed === LIMIT_MIB * MiB);
    if (limited.length < 4) console.log(`samples: ${JSON.stringify(samples)}\nlog:\n${fs.readFileSync(sb.logFile, 'utf8')}`);
    expect(limited.length).toBeGreaterThanOrEqual(4);
    // The steady state: the second half of the samples taken at the limit.
    const from = limited[Math.floor(limited.length / 2)]!;
    const to = limited.at(-1)!;
    const rate = (to.offset - from.offset) / MiB / ((to.t - from.t) / 1000);
    const overall = throttled.bytes / MiB / (throttled.ms / 1000);
    console.log(
      `-b ${LIMIT_MIB}: job ${(throttled.bytes / MiB).toFixed(0)} MiB in ${throttled.ms} ms (${overall.toFixed(1)} MiB/s overall), ` +
        `${rate.toFixed(2)} MiB/s over the last ${((to.t - from.t) / 1000).toFixed(1)} s; unthrottled ${unthrottled.ms} ms`,
    );
    expect(rate).toBeLessThan(LIMIT_MIB * 1.5);
    expect(rate).toBeGreaterThan(0);
    // Measurably slower than the same backup without -b (loose: twice the time).
    expect(throttled.ms).toBeGreaterThan(2 * unthrottled.ms);
    expect(fs.readFileSync(sb.logFile, 'utf8')).toContain(`Rate limit ${LIMIT_MIB} MiB/s for the backup of ${BIG}: 1 job(s) copying`);
    await expectEqualsLive(BIG, path.join(nas, p, `root.${BIG_VOL}.qcow2`), bigDisk);
    nothingLeft();
  });

  it('two guests backed up at the same moment onto one NAS: both complete, sizes right, nothing left', async () => {
    const pb = nextPath(BIG);
    const ps = nextPath(SMALL);
    const [ob, os2] = await Promise.all([
      cli(backupArgs(BIG, pb, ['-M', 'full', '--bitmap-new', 'backup-1770000001'])),
      cli(backupArgs(SMALL, ps, ['-M', 'full', '--bitmap-new', 'backup-1770000002'])),
    ]);
    // rebase-era format: BITMAP_CREATED= after the total.
    for (const [o, p, bm] of [
      [ob, pb, 'backup-1770000001'],
      [os2, ps, 'backup-1770000002'],
    ] as const) {
      expect(o.code).toBe(0);
      const lines = o.stdout.trimEnd().split('\n');
      expect(lines.pop()).toBe(`BITMAP_CREATED=${bm}`);
      expect(lines.pop()).toBe(execFileSync('du', ['-sb', path.join(nas, p)], { encoding: 'utf8' }).split('\t')[0]);
    }
    await expectEqualsLive(BIG, path.join(nas, pb, `root.${BIG_VOL}.qcow2`), bigDisk);
    await expectEqualsLive(SMALL, path.join(nas, ps, `root.${SMALL_VOL}.qcow2`), smallDisk);
    expect((await virsh(['checkpoint-list', BIG, '--name'], { check: true })).stdout.trim()).toBe('backup-1770000001');
    expect((await virsh(['checkpoint-list', SMALL, '--name'], { check: true })).stdout.trim()).toBe('backup-1770000002');
    expect(fs.readdirSync(path.join(nas, BIG)).filter((n) => n.endsWith('.partial') || n.startsWith('.nasbackup'))).toEqual([]);
    expect(fs.readdirSync(path.join(nas, SMALL)).filter((n) => n.endsWith('.partial') || n.startsWith('.nasbackup'))).toEqual([]);
    nothingLeft();
  });
});
