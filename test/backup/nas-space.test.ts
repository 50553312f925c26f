// A NAS too small for the backup, and one that fills up while a running backup's job
// runs (apache/cloudstack#12821: VMs left paused for hours). The NAS is a real tmpfs of
// a few MiB (bind-mounted by the program, as every sandbox NAS), the fake virsh plays
// libvirt: its push targets really fill the tmpfs, and it pauses the domain on an I/O
// error as QEMU does when a guest write fails in the backup's copy-before-write.
import { execFileSync } from 'node:child_process';
import { readdirSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { leftovers, logText, writeShim } from '../helpers/cli.js';
import { makeImage } from '../helpers/qemu.js';
import { removeTempDirs, tempDir } from '../helpers/tmp.js';
import {
  BACKUP_PATH,
  backup,
  callLines,
  expectClean,
  fullFlags,
  MiB,
  NEW_BITMAP,
  rootDiskAsRaw,
  scenario,
  VM,
  type Scenario,
  type ScenarioOptions,
} from './scenario.js';

const mounted: string[] = [];
afterAll(() => {
  for (const m of mounted.splice(0)) execFileSync('umount', [m]);
  removeTempDirs();
});

/** A scenario whose NAS folder is a tmpfs of `mib` MiB (its own folder: the sandbox's is checked for leftover mounts). */
function smallNas(tag: string, mib: number, o: ScenarioOptions = {}): Scenario {
  const s = scenario(tag, o);
  const nas = tempDir(`${tag}-nas`);
  execFileSync('mount', ['-t', 'tmpfs', '-o', `size=${mib}m,mode=0755`, 'tmpfs', nas]);
  mounted.push(nas);
  s.sb.nas = nas;
  s.final = join(nas, BACKUP_PATH);
  return s;
}

/** Nothing on the NAS, nothing mounted by the run, no mount point left (the tmpfs itself is the test's). */
function nothingLeft(s: Scenario): void {
  expect(readdirSync(s.sb.nas)).toEqual([]);
  expect(leftovers(s.sb)).toEqual({ dirs: [], mounts: [s.sb.nas] });
}

describe.concurrent('free-space check before anything is written', () => {
  it('running VM: refused with one line (NAS_SPACE_SHORT, exit 1), no lock, no folder, no job, no checkpoint', async () => {
    const s = smallNas('space-run', 8);
    const r = await backup(s, { extra: fullFlags() });
    expect(r.code).toBe(1);
    expect(r.stdout).toMatch(
      new RegExp(
        `^Not enough free space on the NAS for the backup of ${VM}: about [\\d.]+ MiB needed \\([\\d.]+ MiB estimated \\+ 10% margin\\), [\\d.]+ MiB free; nothing was written\n$`,
      ),
    );
    expect(s.fake.names()).not.toContain('backup-begin');
    expect(s.fake.checkpointNames(VM)).toEqual([]);
    expect(logText(s.sb)).toMatch(/ERROR \[NAS_SPACE_SHORT\]/);
    expect(logText(s.sb)).toMatch(/Estimate for vda: [\d.]+ MiB \(allocation of a 1-image chain\)/);
    nothingLeft(s);
    expect(s.fake.domain(VM).state).toBe('running');
  });

  it('stopped VM: refused the same way, from the qcow2 data read natively', async () => {
    const s = smallNas('space-stop', 8, { state: 'shut off' });
    const r = await backup(s, { disks: s.rootDisk, extra: fullFlags() });
    expect(r.code).toBe(1);
    expect(r.stdout).toMatch(new RegExp(`^Not enough free space on the NAS for the backup of ${VM}: .*nothing was written\n$`));
    expect(logText(s.sb)).toMatch(/Estimate for \S+: 1\.3 MiB \(qcow2: data of a 1-layer chain\)/);
    nothingLeft(s);
  });

  it('NASBACKUP_SPACE_CHECK=0: not checked; the small backup fits and succeeds', async () => {
    const s = smallNas('space-off', 8);
    const r = await backup(s, { extra: fullFlags() }, { NASBACKUP_SPACE_CHECK: '0' });
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(new RegExp(`BITMAP_CREATED=${NEW_BITMAP}\n$`));
    expect(logText(s.sb)).toContain('Free-space check skipped (NASBACKUP_SPACE_CHECK=off)');
  });

  it('a margin that fits: NASBACKUP_SPACE_MARGIN=0 on a NAS large enough', async () => {
    const s = smallNas('space-fits', 32);
    const r = await backup(s, { extra: fullFlags() }, { NASBACKUP_SPACE_MARGIN: '0' });
    expect(r.code).toBe(0);
    expect(logText(s.sb)).toMatch(/Free space on the NAS: [\d.]+ MiB; the backup of \S+ needs about [\d.]+ MiB/);
  });
});

describe.concurrent('a NAS that fills up while the job runs', () => {
  it('the VM pauses on an I/O error and the NAS is full: NAS_FULL in one line, job aborted, partial files removed, VM resumed', async () => {
    const s = smallNas('full-pause', 8, {
      domain: { job: { behaviour: 'never', pauseAfterPolls: 2, fillTargetFs: true } },
    });
    const r = await backup(s, { extra: fullFlags() }, { NASBACKUP_SPACE_CHECK: 'false' });
    expect(r.code).toBe(1);
    expect(r.stdout).toBe(
      `The NAS ran out of space during the backup of ${VM} (VM paused on an I/O error): backup stopped, partial files removed, VM resumed\n`,
    );
    const calls = callLines(s);
    expect(calls).toContain(`domjobabort ${VM}`);
    expect(calls).toContain(`checkpoint-delete ${VM} ${NEW_BITMAP}`);
    expect(calls.slice(-2)).toEqual([`domstate ${VM} --reason`, `resume ${VM}`]);
    expect(s.fake.domain(VM).state).toBe('running');
    expect(s.fake.checkpointNames(VM)).toEqual([]);
    nothingLeft(s);
  });

  it('the VM pauses on an I/O error but the NAS has room: IO_ERROR, job aborted, the VM left paused (not ours)', async () => {
    const s = scenario('io-pause', { domain: { job: { behaviour: 'never', pauseAfterPolls: 2 } } });
    const r = await backup(s, { extra: fullFlags() });
    expect(r.code).toBe(1);
    expect(r.stdout).toMatch(new RegExp(`^VM ${VM} paused on an I/O error during the backup \\(the NAS is not full: .* free\\)\n$`));
    expect(callLines(s)).toContain(`domjobabort ${VM}`);
    expect(callLines(s)).not.toContain(`resume ${VM}`);
    expect(s.fake.domain(VM).state).toBe('paused');
    expect(logText(s.sb)).toContain(`Warning: VM ${VM} is paused (I/O error), not by this backup; leaving it paused`);
    expectClean(s);
  });

  it('a VM an operator paused before the backup: never resumed, even when the job fails on a full NAS', async () => {
    const s = scenario('pre-paused', {
      state: 'paused',
      domain: { job: { behaviour: 'failed', errorMessage: 'No space left on device', pauseOnFailure: true } },
    });
    const r = await backup(s, { extra: fullFlags() });
    expect(r.code).toBe(1);
    expect(r.stdout).toBe(
      `The NAS ran out of space during the backup of ${VM} (No space left on device): backup stopped, partial files removed\n`,
    );
    expect(s.fake.names()).not.toContain('resume');
    expect(s.fake.domain(VM).state).toBe('paused');
    expectClean(s);
  });
});

describe.concurrent('a stopped VM: the copy runs out of space, and heartbeats', () => {
  it('the copy fails with ENOSPC: NAS_FULL in one line, nothing left on the NAS', async () => {
    const s = smallNas('full-stopped', 1, { state: 'shut off' });
    const r = await backup(s, { disks: s.rootDisk, extra: fullFlags() }, { NASBACKUP_SPACE_CHECK: '0' });
    expect(r.code).toBe(1);
    expect(r.stdout).toBe(
      `The NAS ran out of space during the backup of stopped VM ${VM} (No space left on device): partial files removed\n`,
    );
    expect(logText(s.sb)).toMatch(/Copy of \S+: .*(No space left on device|ENOSPC)/i);
    nothingLeft(s);
  });

  it('a slow copy logs heartbeats (bytes of the estimate, rate, ETA) in the log, never on stdout', async () => {
    const s = scenario('beat-stopped', { state: 'shut off' });
    // A raw disk goes through qemu-img convert: the real copy, then a pause while the target
    // stays as it is (the heartbeats read its size).
    rootDiskAsRaw(s);
    writeShim(s.sb, 'qemu-img', `/usr/bin/qemu-img "$@" || exit $?\nif [ "$1" = convert ]; then sleep 1; fi`);
    const r = await backup(s, { disks: s.rootDisk, extra: fullFlags() }, { NASBACKUP_HEARTBEAT_INTERVAL: '0.2' });
    expect(r.code).toBe(0);
    expect(r.stdout).not.toContain('ETA');
    expect(logText(s.sb)).toMatch(/Backup of stopped VM \S+: deadline 10 min 0 s \([\d.]+ [KM]iB at 10\.0 MiB\/s \+ 10 min 0 s\)/);
    expect(logText(s.sb)).toMatch(/> Copy of \S+: [\d.]+ [KM]iB of [\d.]+ [KM]iB \(\d+%\) after \d+ s, [\d.]+ [KM]?i?B\/s, ETA \d+ s/);
  });

  it("a native (qcow2) copy: its heartbeats follow the engine's own progress (guest bytes of the whole disk), not the NAS file", async () => {
    const s = scenario('beat-native', { state: 'shut off' });
    // 64 MiB virtual, 4 MiB of data, copied at 1 MiB/s: a few seconds of heartbeats.
    makeImage(s.rootDisk, { size: 64 * MiB, writes: [{ pattern: 0x31, offset: 0, length: 4 * MiB }] });
    const r = await backup(s, { disks: s.rootDisk, extra: ['--bandwidth', '1'] }, { NASBACKUP_HEARTBEAT_INTERVAL: '0.2' });
    expect(r).toMatchObject({ code: 0, stderr: '' });
    expect(r.stdout).not.toContain('ETA');
    // "of 64.0 MiB": the disk's size as the engine reports it (the target file holds ~4 MiB).
    const beats = logText(s.sb)
      .split('\n')
      .filter((l) => l.includes(`> Copy of ${s.rootDisk}: `));
    expect(beats.length).toBeGreaterThan(0);
    for (const l of beats) expect(l).toMatch(/: [\d.]+ (B|KiB|MiB) of 64\.0 MiB \(\d+%\) after \d+ s, [\d.]+ [KM]?i?B\/s, ETA /);
  });
});
