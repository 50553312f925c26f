// The later upstream options of #12898 on -o backup: -b limits the copy rate on both
// paths (the running push job through QMP block-job-set-speed, shared by the disks still
// copying; the stopped copy through qemu-img's own rate limit), -c compresses where the
// result stays a valid chain member (the stopped copy) and is refused with its reason on
// the running path, -e stays refused with its reason. Bad values: one line, exit 1,
// nothing run, nothing written.
import { execFileSync } from 'node:child_process';
import { existsSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { logText, run } from '../helpers/cli.js';
import { removeTempDirs } from '../helpers/tmp.js';
import { makeImage } from '../helpers/qemu.js';
import {
  backup,
  compareImages,
  completedBlock,
  DATA_VOL,
  dataFile,
  duSb,
  expectClean,
  fullFlags,
  MiB,
  nasPaths,
  NEW_BITMAP,
  qemuInfo,
  ROOT_VOL,
  rootFile,
  scenario,
  VM,
  type Scenario,
} from './scenario.js';
import { bindNas } from '../helpers/cli.js';

afterAll(removeTempDirs);

const stoppedDisks = (s: Scenario): string => [s.rootDisk, s.dataDisk].filter(Boolean).join(',');

/** Nothing happened: no virsh call at all, nothing on the NAS, nothing mounted. */
function expectUntouched(s: Scenario): void {
  expect(s.fake.commands()).toEqual([]);
  expect(nasPaths(s.sb)).toEqual([]);
  expectClean(s);
}

describe.concurrent('-b/--bandwidth', () => {
  it('running VM, two disks: the limit is set in the same virsh session as backup-begin, shared by the disks, moved to the one still copying; stdout as without -b', async () => {
    const s = scenario('opt-bw-run', { dataDisk: true, domain: { job: { runningPolls: 30 } } });
    const r = await backup(s, { extra: [...fullFlags(), '-b', '8'] });
    expect(r).toMatchObject({ code: 0, stderr: '' });
    // The agent's bytes do not change with -b.
    expect(r.stdout).toBe(completedBlock(24 * MiB) + `${duSb(s.final)}\nBITMAP_CREATED=${NEW_BITMAP}\n`);
    // backup-begin and the limits in one virsh batch (one process: nothing runs unthrottled while a second virsh starts).
    const batch = s.fake.calls().filter((c) => (c as { batch?: boolean }).batch === true);
    expect(batch.map((c) => c.argv.slice(2).join(' '))).toEqual([
      expect.stringMatching(/^backup-begin --domain i-2-10-VM --backupxml /) as unknown,
      `blockjob ${VM} vda --bandwidth ${4 * MiB} --bytes`,
      `blockjob ${VM} vdb --bandwidth ${4 * MiB} --bytes`,
    ]);
    // 8 MiB/s for the backup: 4 MiB/s per disk while both copy; vdb gets all of it once vda is done.
    expect(s.fake.domain(VM).jobSpeeds).toEqual([
      { device: 'backup-vda-libvirt-1-format', speed: 4 * MiB },
      { device: 'backup-vdb-libvirt-2-format', speed: 4 * MiB },
      { device: 'backup-vdb-libvirt-2-format', speed: 8 * MiB },
    ]);
    expect(logText(s.sb)).toContain(`Rate limit 8 MiB/s for the backup of ${VM}: 2 job(s) copying, 4 MiB/s each`);
    expect(logText(s.sb)).toContain(`Rate limit 8 MiB/s for the backup of ${VM}: 1 job(s) copying, 8 MiB/s each`);
    expect(compareImages(join(s.sb.nas, rootFile()), s.rootDisk)).toBe('Images are identical.');
    expect(compareImages(join(s.sb.nas, dataFile()), s.dataDisk!)).toBe('Images are identical.');
    expectClean(s);
  });

  it('running VM: a limit that cannot be set makes a faster backup, not a failed one (logged)', async () => {
    const s = scenario('opt-bw-fail', {
      domain: { job: { runningPolls: 2 } },
      fail: {
        blockjob: { stderr: 'error: Operation not supported: block job speed cannot be changed\n' },
        'qemu-monitor-command:block-job-set-speed': { stderr: 'error: internal error: unable to execute QEMU command\n' },
      },
    });
    const r = await backup(s, { extra: ['-b', '2.5'] });
    expect(r.code).toBe(0);
    expect(r.stdout).toBe(completedBlock(16 * MiB) + `${duSb(s.final)}\n`);
    expect(logText(s.sb)).toContain(
      'Warning: cannot limit the rate of a backup job of i-2-10-VM: error: Operation not supported: block job speed cannot be changed',
    );
    expect(logText(s.sb)).toMatch(/Warning: cannot limit the rate of backup job backup-vda-libvirt-1-format of i-2-10-VM/);
    expectClean(s);
  });

  it('running VM: a job that concluded before its limit landed is logged as done, not as a warning', async () => {
    const s = scenario('opt-bw-done', {
      fail: {
        blockjob: {
          stderr:
            "error: internal error: unable to execute QEMU command 'block-job-set-speed': Job 'backup-vda-libvirt-1-format' in state 'concluded' cannot accept command verb 'set-speed'\n",
        },
      },
    });
    const r = await backup(s, { extra: ['-b', '2.5'] });
    expect(r.code).toBe(0);
    expect(r.stdout).toBe(completedBlock(16 * MiB) + `${duSb(s.final)}\n`);
    expect(logText(s.sb)).toContain('A backup job of i-2-10-VM finished before its rate limit was set');
    expect(logText(s.sb)).not.toContain('Warning: cannot limit the rate of a backup job');
    expectClean(s);
  });

  it.each([
    ['qcow2', 'the native copy engine', /Copied \S+ to \S+: /],
    ['raw', 'qemu-img convert -r (bytes/s)', /exec: qemu-img convert -m 16 -W -r 1048576 -f raw -O qcow2 /],
  ])('stopped VM, a %s disk: %s copies under the limit; the rate stays below it', async (format, _how, logLine) => {
    const s = scenario(`opt-bw-stop-${format}`, { state: 'shut off' });
    // 6 MiB of data to copy at 1 MiB/s (qemu-img's limiter lets its first requests of up to
    // 2 MiB each through before it delays: enough data that the limit dominates).
    const writes = [
      { pattern: 0x31, offset: 0, length: 4 * MiB },
      { pattern: 0x32, offset: 8 * MiB, length: 2 * MiB },
    ];
    makeImage(s.rootDisk, { size: 16 * MiB, writes });
    if (format === 'raw') {
      execFileSync('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', s.rootDisk, `${s.rootDisk}.raw`]);
      execFileSync('mv', [`${s.rootDisk}.raw`, s.rootDisk]);
    }
    const t0 = Date.now();
    const r = await backup(s, { disks: s.rootDisk, extra: ['--bandwidth', '1'] });
    const seconds = (Date.now() - t0) / 1000;
    expect(r).toMatchObject({ code: 0, stderr: '' });
    expect(r.stdout).toBe(`${statSync(join(s.sb.nas, rootFile())).size}\n`);
    expect(logText(s.sb)).toMatch(logLine);
    expect(logText(s.sb)).toContain(`Stopped-VM copy of ${VM}: rate limit 1 MiB/s`);
    // Loosely: what was copied over the whole run's time, well below what an unlimited copy
    // does (hundreds of MiB/s) and under 2 × the limit (the burst before the limiter acts).
    expect(6 / seconds).toBeLessThan(2);
    expect(compareImages(join(s.sb.nas, rootFile()), s.rootDisk)).toBe('Images are identical.');
    expectClean(s);
  });

  it.each([
    ['0', '"0"'],
    ['x', '"x"'],
    ['-1', '"-1"'],
    ['', '""'],
    ['1e3', '"1e3"'],
    ['0.0000001', '"0.0000001"'],
    ['2000000', '"2000000"'],
  ])('-b %j: one line on stdout, exit 1, nothing run, nothing written', async (value, shown) => {
    const s = scenario('opt-bw-bad');
    const r = await backup(s, { extra: ['-b', value] });
    expect(r).toEqual({
      code: 1,
      signal: null,
      stdout: `Invalid -b/--bandwidth: ${shown} (expected a positive number of MiB/s, at most 1048576)\n`,
      stderr: '',
    });
    expect(logText(s.sb)).toContain('ERROR [INVALID_ARGUMENT] Invalid -b/--bandwidth');
    expectUntouched(s);
  });

  it('the other operations copy no disk: -b/-c accepted and logged; a bad -b still refused', async () => {
    const s = scenario('opt-bw-stats');
    const ok = await run(s.sb, ['-o', 'stats', ...bindNas(s.sb), '-b', '5', '-c']);
    expect(ok.code).toBe(0);
    expect(ok.stdout).toMatch(/^\S+\n\d+ \d+\n$/);
    expect(logText(s.sb)).toContain('-b/--bandwidth applies to backups only; ignored for -o stats');
    expect(logText(s.sb)).toContain('-c/--compress applies to backups only; ignored for -o stats');
    const bad = await run(s.sb, ['-o', 'stats', ...bindNas(s.sb), '-b', 'fast']);
    expect(bad).toMatchObject({
      code: 1,
      stdout: 'Invalid -b/--bandwidth: "fast" (expected a positive number of MiB/s, at most 1048576)\n',
    });
  });
});

describe.concurrent('-c/--compress', () => {
  it('running VM (no -d): refused with the reason before anything runs', async () => {
    const s = scenario('opt-c-run');
    const r = await backup(s, { extra: ['-c'] });
    expect(r).toEqual({
      code: 1,
      signal: null,
      stdout:
        "Option -c/--compress is not supported by this nasbackup for a running VM: libvirt's push backup has QEMU write the backup file, and it cannot write compressed clusters (stopped-VM backups can be compressed)\n",
      stderr: '',
    });
    expect(logText(s.sb)).toContain('ERROR [UNSUPPORTED_OPTION]');
    expectUntouched(s);
  });

  it('-d given but the VM runs: refused once virsh list says so, before the NAS is mounted', async () => {
    const s = scenario('opt-c-run-d');
    const r = await backup(s, { disks: s.rootDisk, extra: ['--compress'] });
    expect(r.code).toBe(1);
    expect(r.stdout).toMatch(/^Option -c\/--compress is not supported by this nasbackup for a running VM: /);
    expect(s.fake.commands().map((c) => c[0])).toEqual(['version', 'list']);
    expect(nasPaths(s.sb)).toEqual([]);
    expectClean(s);
  });

  it.each([
    ['qcow2', /Copied \S+ to \S+: /],
    ['raw', /exec: qemu-img convert -m 16 -W -c -f raw -O qcow2 /],
  ])(
    'stopped VM, %s disks: compressed clusters, the same content, a sound image a later incremental chains onto',
    async (format, logLine) => {
      const s = scenario(`opt-c-stop-${format}`, { dataDisk: true, state: 'shut off' });
      const plain = scenario(`opt-c-plain-${format}`, { dataDisk: true, state: 'shut off' });
      if (format === 'raw')
        for (const disk of [s.rootDisk, s.dataDisk!, plain.rootDisk, plain.dataDisk!]) {
          execFileSync('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', disk, `${disk}.raw`]);
          execFileSync('mv', [`${disk}.raw`, disk]);
        }
      const r = await backup(s, { disks: stoppedDisks(s), extra: ['-c', ...fullFlags()] });
      const p = await backup(plain, { disks: stoppedDisks(plain), extra: fullFlags() });
      expect(r).toMatchObject({ code: 0, stderr: '' });
      expect(p.code).toBe(0);
      const root = join(s.sb.nas, rootFile());
      expect(logText(s.sb)).toMatch(logLine);
      // The agent's lines: one size per file (datadisk first), the compressed sizes (raw disks carry no bitmap).
      expect(r.stdout).toBe(
        (format === 'qcow2' ? `BITMAP_CREATED=${NEW_BITMAP}\n` : '') +
          `${statSync(join(s.sb.nas, dataFile())).size}\n${statSync(root).size}\n`,
      );
      expect(compareImages(root, s.rootDisk)).toBe('Images are identical.');
      expect(compareImages(join(s.sb.nas, dataFile()), s.dataDisk!)).toBe('Images are identical.');
      // Compressed: smaller than the plain copy of the same disk (pattern data compresses well).
      expect(statSync(root).size).toBeLessThan(statSync(join(plain.sb.nas, rootFile())).size / 2);
      const check = JSON.parse(execFileSync('qemu-img', ['check', '--output=json', root], { encoding: 'utf8' })) as Record<string, number>;
      expect(check['compressed-clusters']).toBeGreaterThan(0);
      expect(check['check-errors']).toBe(0);
      // A valid chain member: an incremental on top reads through it, and nasbackup's own
      // reader proves every layer against the manifest.
      const inc = join(s.sb.root, 'inc.qcow2');
      execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', root, '-F', 'qcow2', inc]);
      execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x77 0 64k', inc], { stdio: 'ignore' });
      expect(JSON.parse(execFileSync('qemu-img', ['info', '--output=json', '--backing-chain', inc], { encoding: 'utf8' })).length).toBe(2);
      const v = await run(s.sb, ['chain', 'verify', ...bindNas(s.sb), '--vm', VM]);
      expect(v.code).toBe(0);
      expect(v.stdout).toContain(`OK   ${rootFile()}`);
      expect(v.stdout).toContain(`OK   ${VM}/2025.01.04.00.00.00/datadisk.${DATA_VOL}.qcow2`);
      expect(qemuInfo(root)['format']).toBe('qcow2');
      expect(existsSync(join(s.sb.nas, `${VM}/2025.01.04.00.00.00/root.${ROOT_VOL}.qcow2`))).toBe(true);
      expectClean(s);
    },
  );
});

describe.concurrent('-e/--encrypt', () => {
  it.each([['backup'], ['stats']])('-o %s: refused with the reason (an unrecorded key strands backups), nothing run', async (op) => {
    const s = scenario('opt-e');
    const argv =
      op === 'backup'
        ? ['-o', 'backup', '-v', VM, ...bindNas(s.sb), '-p', `${VM}/2025.01.04.00.00.00`, '-q', 'false', '-d', '']
        : ['-o', 'stats', ...bindNas(s.sb)];
    const r = await run(s.sb, [...argv, '-e', '/etc/cloudstack/backup.key']);
    expect(r).toEqual({
      code: 1,
      signal: null,
      stdout:
        'Option -e/--encrypt is not supported by this nasbackup: backups would not be encrypted, and nothing would record which key encrypted which backup (a rotated passphrase would strand the older backups of the chain)\n',
      stderr: '',
    });
    expectUntouched(s);
  });
});
