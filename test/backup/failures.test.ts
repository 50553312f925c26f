// -o backup of a running VM when libvirt misbehaves: backup-begin refused, the job
// failing, never ending, vanishing, domjobinfo erroring, a signal mid-job, failures
// after the job started or finished. Every one: exit 1 with libvirt's own words on
// stdout, one cleanup (job aborted when still running, the new checkpoint removed,
// the unfinished folder removed, the NAS unmounted), the VM running afterwards.
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { logText, writeShim } from '../helpers/cli.js';
import { snapshotTree, type TreeEntry } from '../helpers/tree.js';
import { removeTempDirs } from '../helpers/tmp.js';
import {
  backup,
  callLines,
  expectClean,
  fullFlags,
  incrementalFlags,
  NEW_BITMAP,
  PARENT_BITMAP,
  PARENT_TS,
  rootFile,
  ROOT_VOL,
  scenario,
  startBackup,
  VM,
  type Scenario,
} from './scenario.js';

afterAll(removeTempDirs);

const MP = String.raw`\S+/csbackup\.[A-Za-z0-9]{5}`;

/**
 * After any failure: the NAS exactly as before the run (no new folder, nothing
 * partial), nothing mounted, the checkpoints as given, the VM running, no job.
 */
function expectUndone(s: Scenario, before: TreeEntry[], checkpoints: string[] = []): void {
  expectClean(s);
  expect(snapshotTree(s.sb.nas)).toEqual(before);
  expect(s.fake.checkpointNames(VM)).toEqual(checkpoints);
  const d = s.fake.domain(VM);
  expect(d.state).toBe('running');
  expect(d.runtime?.active ?? null).toBeNull();
}

describe.concurrent('-o backup: libvirt failures', () => {
  it('backup-begin refused: its error text on stdout (the original printed nothing), nothing left', async () => {
    const s = scenario('fail-begin', {
      fail: { 'backup-begin': { stderr: 'error: Operation not supported: incremental backup is not supported yet\n' } },
    });
    const before = snapshotTree(s.sb.nas);
    const r = await backup(s, { extra: fullFlags() });
    expect(r).toMatchObject({
      code: 1,
      stdout: `Failed to start the backup of ${VM}\nerror: Operation not supported: incremental backup is not supported yet\n`,
    });
    expect(s.fake.names()).toEqual([
      'version',
      'list',
      'domblklist',
      'qemu-monitor-command',
      'checkpoint-list',
      'domjobinfo',
      'backup-begin',
      'domstate',
    ]);
    expectUndone(s, before);
  });

  it("job Failed (NAS full): one clear line, the job's statistics in the log, new checkpoint removed, the VM it paused resumed", async () => {
    const s = scenario('fail-job', {
      domain: { job: { behaviour: 'failed', errorMessage: 'No space left on device', pauseOnFailure: true } },
    });
    const before = snapshotTree(s.sb.nas);
    const r = await backup(s, { extra: fullFlags() });
    expect(r.code).toBe(1);
    expect(r.stdout).toBe(
      `The NAS ran out of space during the backup of ${VM} (No space left on device): backup stopped, partial files removed, VM resumed\n`,
    );
    expect(logText(s.sb)).toContain('File remaining:   4.000 MiB');
    const calls = callLines(s);
    expect(calls).toContain(`domjobinfo ${VM} --completed --keep-completed --anystats`);
    expect(calls).not.toContain(`domjobabort ${VM}`);
    expect(calls.filter((c) => c.startsWith('checkpoint-delete'))).toEqual([`checkpoint-delete ${VM} ${NEW_BITMAP}`]);
    // Resumed only because it was found paused on an I/O error after the NAS filled up.
    expect(calls.slice(-2)).toEqual([`domstate ${VM} --reason`, `resume ${VM}`]);
    expectUndone(s, before);
    expect(s.fake.bitmaps(VM, 'vda')).toEqual([]);
  });

  it("job Failed on another error: libvirt's words and statistics, a VM paused on that I/O error is left paused (not ours)", async () => {
    const s = scenario('fail-job-io', {
      domain: { job: { behaviour: 'failed', errorMessage: 'Input/output error', pauseOnFailure: true } },
    });
    const r = await backup(s, { extra: fullFlags() });
    expect(r.code).toBe(1);
    expect(r.stdout).toMatch(/^Virsh backup job failed\nInput\/output error\nJob type: +Failed/);
    expect(callLines(s)).not.toContain(`resume ${VM}`);
    expect(s.fake.domain(VM).state).toBe('paused');
    expect(logText(s.sb)).toContain(`Warning: VM ${VM} is paused (I/O error), not by this backup; leaving it paused`);
    expectClean(s);
  });

  it('job never completes: the deadline ends it, domjobabort, nothing left, in bounded time', async () => {
    const s = scenario('fail-never', { domain: { job: { behaviour: 'never' } } });
    const before = snapshotTree(s.sb.nas);
    const t0 = Date.now();
    const r = await backup(s, { extra: fullFlags() }, { NASBACKUP_JOB_TIMEOUT: '2' });
    expect(Date.now() - t0).toBeLessThan(45_000); // not a hang (generous: loaded CI machines)
    expect(r).toMatchObject({ code: 1, stdout: `Backup job of ${VM} did not finish within 2 s\n` });
    const calls = callLines(s);
    const abort = calls.indexOf(`domjobabort ${VM}`);
    expect(abort).toBeGreaterThan(calls.indexOf(`domjobinfo ${VM} --completed --keep-completed`));
    expect(calls.slice(abort + 1)).toEqual([`domjobinfo ${VM}`, `checkpoint-delete ${VM} ${NEW_BITMAP}`, `domstate ${VM} --reason`]);
    // The deadline is the job's: polled for about 2 s after backup-begin, then aborted.
    const at = s.fake.calls().map((c) => c.t);
    const begun = at[calls.findIndex((c) => c.startsWith('backup-begin'))]!;
    expect(at[abort]! - begun).toBeGreaterThanOrEqual(1500);
    expectUndone(s, before);
  });

  it('job vanishes (libvirtd restarted: None/None): a failure after a few polls, not a hang', async () => {
    const s = scenario('fail-vanish', { domain: { job: { behaviour: 'vanish' } } });
    const before = snapshotTree(s.sb.nas);
    const r = await backup(s, { extra: fullFlags() });
    expect(r).toMatchObject({
      code: 1,
      stdout: `Virsh backup job failed\nThe backup job of ${VM} is neither running nor completed (job type None/None); was libvirtd restarted?\n`,
    });
    expect(callLines(s).filter((c) => c === `domjobinfo ${VM} --completed --keep-completed`)).toHaveLength(5);
    expectUndone(s, before);
  });

  it("domjobinfo keeps failing: virsh's error on stdout, the job aborted, cleanup done (the original left the NAS mounted)", async () => {
    const lock = 'error: Timed out during operation: cannot acquire state change lock (held by monitor=remoteDispatchDomainBackupBegin)\n';
    const s = scenario('fail-jobinfo', {
      domain: { job: { behaviour: 'never' } },
      // skip: the program's discard of stale statistics before backup-begin
      fail: { 'domjobinfo:completed': { skip: 1, stderr: lock } },
    });
    const before = snapshotTree(s.sb.nas);
    const r = await backup(s, { extra: fullFlags() });
    expect(r).toMatchObject({ code: 1, stdout: `Cannot read the backup job status of ${VM} (virsh exited with code 1)\n${lock}` });
    const calls = callLines(s);
    expect(calls.filter((c) => c === `domjobinfo ${VM} --completed --keep-completed`)).toHaveLength(3);
    expect(calls).toContain(`domjobabort ${VM}`);
    expectUndone(s, before);
  });

  it('a failure after backup-begin (a side file): the running job is aborted before its files are removed', async () => {
    const s = scenario('fail-side', {
      domain: { job: { behaviour: 'completed', runningPolls: 100 } },
      fail: { dominfo: { stderr: "error: failed to get domain 'i-2-10-VM'\n" } },
    });
    const before = snapshotTree(s.sb.nas);
    const r = await backup(s, { extra: fullFlags() });
    expect(r).toMatchObject({
      code: 1,
      stdout: `virsh dominfo.xml failed (virsh exited with code 1)\nerror: failed to get domain 'i-2-10-VM'\n`,
    });
    const calls = callLines(s);
    expect(calls.slice(calls.indexOf(`dominfo ${VM}`))).toEqual([
      `dominfo ${VM}`,
      `domjobabort ${VM}`,
      `domjobinfo ${VM}`,
      `checkpoint-delete ${VM} ${NEW_BITMAP}`,
      `domstate ${VM} --reason`,
    ]);
    expectUndone(s, before);
  });

  it('a failure after the job finished (relinking an incremental): new checkpoint removed, parent backup and checkpoint kept', async () => {
    const s = scenario('fail-relink', {
      parentOnNas: true,
      domain: { checkpoints: [{ name: PARENT_BITMAP, creationTime: 1735689600 }], disks: [{ bitmaps: [PARENT_BITMAP] }] },
    });
    const before = snapshotTree(s.sb.nas);
    writeShim(
      s.sb,
      'qemu-img',
      `if [ "$1" = rebase ]; then echo "qemu-img: Could not open '$7': Permission denied" >&2; exit 1; fi\nexec /usr/bin/qemu-img "$@"`,
    );
    const parent = snapshotTree(join(s.sb.nas, VM, PARENT_TS));
    const r = await backup(s, { extra: incrementalFlags([rootFile(PARENT_TS)]) });
    expect(r.code).toBe(1);
    expect(r.stdout).toMatch(
      new RegExp(
        `^qemu-img rebase failed for ${MP}/${VM}/2025\\.01\\.04\\.00\\.00\\.00\\.partial/root\\.${ROOT_VOL}\\.qcow2 onto \\.\\./${PARENT_TS.replace(/\./g, '\\.')}/root\\.${ROOT_VOL}\\.qcow2\n` +
          `qemu-img: Could not open '${MP}/\\S+\\.partial/root\\.${ROOT_VOL}\\.qcow2': Permission denied\n$`,
      ),
    );
    const calls = callLines(s);
    expect(calls).not.toContain(`domjobabort ${VM}`);
    expect(calls.filter((c) => c.startsWith('checkpoint-delete'))).toEqual([`checkpoint-delete ${VM} ${NEW_BITMAP}`]);
    expect(snapshotTree(join(s.sb.nas, VM, PARENT_TS))).toEqual(parent);
    expectUndone(s, before, [PARENT_BITMAP]);
    expect(s.fake.bitmaps(VM, 'vda')).toEqual([PARENT_BITMAP]);
  });

  it('a relinked file that does not read as a complete chain: the run fails and nothing is committed', async () => {
    const s = scenario('fail-verify', {
      parentOnNas: true,
      domain: { checkpoints: [{ name: PARENT_BITMAP, creationTime: 1735689600 }], disks: [{ bitmaps: [PARENT_BITMAP] }] },
    });
    // A qemu-img whose rebase writes a wrong backing name (as a buggy or mismatched tool would).
    writeShim(
      s.sb,
      'qemu-img',
      `if [ "$1" = rebase ]; then exec /usr/bin/qemu-img rebase -u -b ../2024.12.30.00.00.00/gone.qcow2 -F qcow2 "$7"; fi\nexec /usr/bin/qemu-img "$@"`,
    );
    const before = snapshotTree(s.sb.nas);
    const r = await backup(s, { extra: incrementalFlags([rootFile(PARENT_TS)]) });
    expect(r.code).toBe(1);
    expect(r.stdout).toMatch(
      new RegExp(
        `^Backup file ${MP}/${VM}/\\S+/root\\.${ROOT_VOL}\\.qcow2 does not read as a complete chain\n.*gone\\.qcow2.* does not exist\n$`,
      ),
    );
    expect(callLines(s).filter((c) => c.startsWith('checkpoint-delete'))).toEqual([`checkpoint-delete ${VM} ${NEW_BITMAP}`]);
    expectUndone(s, before, [PARENT_BITMAP]);
  });

  it('SIGTERM while polling the job: domjobabort, new checkpoint removed, folder removed, NAS unmounted', async () => {
    const s = scenario('fail-sigterm', { domain: { job: { behaviour: 'never' } } });
    const before = snapshotTree(s.sb.nas);
    const { child, done } = startBackup(s, { extra: fullFlags() });
    const calls = `${s.fake.statePath}.calls`;
    const end = Date.now() + 20_000;
    while (!(existsSync(calls) && readFileSync(calls, 'utf8').includes('"--keep-completed"'))) {
      if (Date.now() > end) throw new Error('the job poll never started');
      await new Promise((res) => setTimeout(res, 25));
    }
    child.kill('SIGTERM');
    const r = await done;
    expect(r).toMatchObject({ code: 1, stdout: 'Interrupted by SIGTERM\n' });
    const lines = callLines(s);
    expect(lines.slice(lines.indexOf(`domjobabort ${VM}`))).toEqual([
      `domjobabort ${VM}`,
      `domjobinfo ${VM}`,
      `checkpoint-delete ${VM} ${NEW_BITMAP}`,
      `domstate ${VM} --reason`,
    ]);
    expect(logText(s.sb)).toContain('Received SIGTERM: stopping and cleaning up');
    expectUndone(s, before);
  });
});
