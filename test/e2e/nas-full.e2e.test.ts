// A NAS too small for a running guest's full backup (apache/cloudstack#12821), and a long,
// throttled backup (apache/cloudstack#13883), on real libvirt + QEMU (TCG). The NAS is a
// loop-mounted ext4 image that bin/nasbackup mounts itself (`-t ext4 -s <img> -m loop`).
// One guest for the file; it must be running after every run.
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  agentCommand,
  checkpointNames,
  createQcow2,
  ensureLab,
  type Guest,
  guestWrite,
  loopNas,
  makeNasImage,
  type Outcome,
  type Sandbox,
  sandbox,
  startGuest,
  virsh,
  waitFor,
} from './lab.js';

const MiB = 1024 * 1024;
const VM = `nbe2e-nasfull-${process.pid}`;
const ROOT_VOL = '5e2b8c1d-7a3f-4e9b-b1c2-d3e4f5a6b7c8';
const DATA = 1024 * MiB;

describe.sequential('a NAS too small, and a long backup, on a real guest', () => {
  let sb: Sandbox;
  let small = '';
  let large = '';
  let mid = '';
  let rootDisk = '';
  let guest: Guest | undefined;
  let ts = 0;
  let heartbeatBackup = '';

  const nextPath = () => `${VM}/2026.02.01.00.00.${String(++ts).padStart(2, '0')}`;

  const cli = (args: string[], env: NodeJS.ProcessEnv = {}): Promise<Outcome> => sb.cli(args, env);

  const backupArgs = (img: string, p: string, bitmap: string) => [
    '-o',
    'backup',
    '-v',
    VM,
    ...loopNas(img),
    '-p',
    p,
    '-q',
    'false',
    '-d',
    '',
    '-M',
    'full',
    '--bitmap-new',
    bitmap,
  ];

  /** Look at a NAS between runs (never while bin/nasbackup has it mounted). */
  const withNas = <T>(img: string, fn: (root: string) => T): T => sb.withNas(img, fn);

  /** Only ext4's own lost+found: no instance folder, no lock, no partial backup. */
  const nasUntouched = (img: string) => expect(withNas(img, (root) => fs.readdirSync(root))).toEqual(['lost+found']);

  async function state(): Promise<string> {
    return (await virsh(['domstate', VM, '--reason'], { check: true })).stdout.trim();
  }

  const nothingMounted = () => expect(sb.leftovers()).toEqual({ tmp: [], mounted: false });

  const logSince = (at: number) => fs.readFileSync(sb.logFile, 'utf8').slice(at);
  const logSize = () => (fs.existsSync(sb.logFile) ? fs.statSync(sb.logFile).size : 0);
  // No root reserve: the free space QEMU (root) sees is the free space we see.
  const mkNas = (name: string, size: string) => makeNasImage(path.join(sb.dir, name), size, { rootReserve: false });

  /**
   * A virsh that slows the push job to `speed` bytes/s as soon as backup-begin returns (QMP
   * block-job-set-speed on every block job): the test's throttle, not the program's.
   */
  function throttlingVirsh(speed: number): string {
    const shim = path.join(sb.dir, `virsh-throttle-${speed}`);
    fs.writeFileSync(
      shim,
      `#!/bin/bash
virsh "$@"; rc=$?
if [[ $rc == 0 && " $* " == *" backup-begin "* ]]; then
  for dev in $(virsh -c qemu:///system qemu-monitor-command ${VM} '{"execute":"query-block-jobs"}' | grep -o '"device":"[^"]*"' | cut -d'"' -f4); do
    virsh -c qemu:///system qemu-monitor-command ${VM} "{\\"execute\\":\\"block-job-set-speed\\",\\"arguments\\":{\\"device\\":\\"$dev\\",\\"speed\\":${speed}}}" >/dev/null
  done
fi
exit $rc
`,
      { mode: 0o755 },
    );
    return shim;
  }

  beforeAll(async () => {
    await ensureLab();
    sb = sandbox('nbe2e-nasfull-');
    rootDisk = path.join(sb.pool, ROOT_VOL);
    await createQcow2(rootDisk, 1280 * MiB);
    // 1 GiB of data, written before boot (host side): more than the small NAS holds, and enough
    // that a push job is still copying when the test's throttle lands.
    execFileSync('qemu-io', ['-f', 'qcow2', '-c', `write -P 0x31 0 ${DATA}`, rootDisk], { stdio: 'ignore' });
    small = mkNas('small-nas.img', '24M');
    large = mkNas('large-nas.img', '1600M');
    // Larger than what the job copies at full speed before its throttle lands (up to ~650 MiB
    // measured), smaller than that plus the guest's copy-before-writes (the test's dd below).
    mid = mkNas('mid-nas.img', '800M');
    guest = await startGuest({ name: VM, disks: [rootDisk], dir: sb.dir });
  }, 600_000);

  afterAll(async () => {
    await guest?.destroy().catch(() => {});
    sb?.remove();
  });

  it('the free-space check refuses the backup before anything is written: one line, exit 1, the guest running', async () => {
    const at = logSize();
    const out = await cli(backupArgs(small, nextPath(), 'backup-1800000001'));
    expect(out.code).toBe(1);
    expect(out.stdout).toMatch(
      new RegExp(
        `^Not enough free space on the NAS for the backup of ${VM}: about [\\d.]+ GiB needed \\([\\d.]+ GiB estimated \\+ 10% margin\\), [\\d.]+ MiB free; nothing was written\n$`,
      ),
    );
    const log = logSince(at);
    expect(log).toMatch(/Estimate for vda: 1\.0 GiB \(allocation of a 1-image chain\)/);
    expect(log).not.toContain('backup-begin');
    nasUntouched(small);
    nothingMounted();
    expect(await state()).toMatch(/^running/);
    expect(await checkpointNames(VM)).toEqual([]);
  });

  it('check off: the NAS fills up during the job; the job is stopped, nothing is left, the guest keeps running, one line', async () => {
    const at = logSize();
    const out = await cli(backupArgs(small, nextPath(), 'backup-1800000002'), { NASBACKUP_SPACE_CHECK: '0' });
    const log = logSince(at);
    expect(out.code, `${out.stdout}\n${log}`).toBe(1);
    expect(out.stdout).toMatch(
      new RegExp(`^The NAS ran out of space during the backup of ${VM} \\(.+\\): backup stopped, partial files removed(, VM resumed)?\n$`),
    );
    console.log(`stdout: ${out.stdout}`);
    expect(log).toContain('ERROR [NAS_FULL]');
    expect(log).toContain('backup-begin');
    nasUntouched(small);
    nothingMounted();
    expect(await state()).toMatch(/^running/);
    expect(await checkpointNames(VM)).toEqual([]);
  });

  it('a throttled backup: heartbeats (bytes, rate, ETA) in the log, the deadline from the data, stdout as always', async () => {
    const shim = throttlingVirsh(48 * MiB);
    const at = logSize();
    const p = nextPath();
    heartbeatBackup = p;
    const out = await cli(backupArgs(large, p, 'backup-1800000003'), { NASBACKUP_VIRSH: shim, NASBACKUP_HEARTBEAT_INTERVAL: '1' });
    const log = logSince(at);
    expect(out.code, `${out.stdout}\n${log}`).toBe(0);
    // The agent's bytes: the completed job's statistics, the byte total, BITMAP_CREATED last.
    const lines = out.stdout.trimEnd().split('\n');
    expect(lines.pop()).toBe('BITMAP_CREATED=backup-1800000003');
    expect(lines.pop()).toMatch(/^\d+$/);
    expect(out.stdout).toMatch(/^Job type:\s+Completed\s*\nOperation:\s+Backup/);
    expect(out.stdout).not.toContain('ETA');
    expect(log).toMatch(new RegExp(`Backup job of ${VM}: deadline \\d+ min \\d+ s \\([\\d.]+ GiB at 10\\.0 MiB/s \\+ 10 min 0 s\\)`));
    const beats = log
      .split('\n')
      .filter((l) =>
        new RegExp(`> Backup of ${VM}: [\\d.]+ [KMG]iB of [\\d.]+ GiB \\(\\d+%\\) after \\d+ s, [\\d.]+ [KM]?i?B/s, ETA `).test(l),
      );
    console.log(
      [...log.split('\n').filter((l) => l.includes(': deadline ')), ...beats.slice(0, 3), `(${beats.length} heartbeats)`].join('\n'),
    );
    expect(beats.length, log).toBeGreaterThanOrEqual(2);
    expect(await state()).toMatch(/^running/);
    expect(withNas(large, (root) => fs.readdirSync(path.join(root, p)).sort())).toContain(`root.${ROOT_VOL}.qcow2`);
    nothingMounted();
  });

  it("an incremental's estimate is the parent bitmap's dirty count (QMP query-block), and it fits", async () => {
    await guestWrite(VM, { target: 'vda', pattern: 0x44, offset: 200 * MiB, length: 4 * MiB });
    const at = logSize();
    const p = nextPath();
    const out = await cli([
      ...backupArgs(large, p, 'backup-1800000005').slice(0, -4),
      '-M',
      'incremental',
      '--bitmap-new',
      'backup-1800000005',
      '--bitmap-parent',
      'backup-1800000003',
      '--parent-paths',
      `${heartbeatBackup}/root.${ROOT_VOL}.qcow2`,
    ]);
    const log = logSince(at);
    expect(out.code, `${out.stdout}\n${log}`).toBe(0);
    expect(out.stdout.trimEnd().split('\n').pop()).toBe('BITMAP_CREATED=backup-1800000005');
    expect(log).toContain('Estimate for vda: 4.0 MiB (dirty bytes of bitmap backup-1800000003)');
    expect(log).toMatch(new RegExp(`Backup job of ${VM}: deadline 10 min 0 s \\(4\\.0 MiB at 10\\.0 MiB/s \\+ 10 min 0 s\\)`));
    expect(await checkpointNames(VM)).toEqual(['backup-1800000005']);
    nothingMounted();
  });

  it('the guest writes while the NAS fills up: its write fails in the backup, QEMU pauses it (I/O error); the job is stopped, nothing is left, the guest resumed', async () => {
    const at = logSize();
    // A NAS the job fills only partly before the throttle (1 MiB/s) lands: the guest's own
    // writes beyond what the job copied (their old data copied into the push target first) fill
    // it. So a guest write is what fails: the burst before the throttle copies 40-650 MiB of the
    // 1 GiB, the dd's copy-before-writes bring the target to at least 936 MiB (> the NAS's 800).
    const run = cli(backupArgs(mid, nextPath(), 'backup-1800000004'), {
      NASBACKUP_SPACE_CHECK: '0',
      NASBACKUP_VIRSH: throttlingVirsh(MiB),
    });
    await waitFor('the push job', 60_000, async () => /Job type:\s+Unbounded/.test((await virsh(['domjobinfo', VM])).stdout));
    await agentCommand(VM, 'guest-exec', {
      path: '/bin/dd',
      arg: ['if=/dev/zero', 'of=/dev/vda', 'bs=1M', 'seek=128', 'count=896', 'oflag=direct'],
    });
    const out = await run;
    const log = logSince(at);
    console.log(
      `stdout: ${out.stdout}${log
        .split('\n')
        .filter((l) => /paused|resum|NAS_FULL|failed:/.test(l))
        .join('\n')}`,
    );
    expect(out.code, `${out.stdout}\n${log}`).toBe(1);
    expect(out.stdout).toMatch(
      new RegExp(`^The NAS ran out of space during the backup of ${VM} \\(.+\\): backup stopped, partial files removed, VM resumed\n$`),
    );
    expect(log).toMatch(new RegExp(`VM ${VM} is paused \\((I/O error|ioerror)[^)]*\\) by the backup's full NAS; resuming it`));
    nasUntouched(mid);
    nothingMounted();
    expect(await state()).toMatch(/^running/);
    expect(await checkpointNames(VM)).toEqual(['backup-1800000005']);
  });
});
