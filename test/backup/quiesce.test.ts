// Quiescing (-q true) and the domain states that decide the path: the guest frozen
// only around backup-begin and always thawed; a missing agent said out loud (or
// fatal when required); paused VMs backed up live and left paused; other states and
// unknown VMs refused before anything is mounted.
import { afterAll, describe, expect, it } from 'vitest';
import { logText } from '../helpers/cli.js';
import { snapshotTree } from '../helpers/tree.js';
import { removeTempDirs } from '../helpers/tmp.js';
import { backup, callLines, completedBlock, duSb, expectClean, fullFlags, MiB, NEW_BITMAP, scenario, VM } from './scenario.js';

afterAll(removeTempDirs);

const FREEZE = `qemu-agent-command ${VM} --timeout 60 {"execute":"guest-fsfreeze-freeze"}`;
const THAW = `qemu-agent-command ${VM} --timeout 60 {"execute":"guest-fsfreeze-thaw"}`;
const NOT_CONNECTED = 'error: Guest agent is not responding: QEMU guest agent is not connected';
const agentUp = { connected: true, frozen: false, filesystems: 2 };

describe.concurrent('-o backup -q true', () => {
  it('freezes right before backup-begin and thaws right after it', async () => {
    const s = scenario('qz-ok', { domain: { agent: agentUp } });
    const r = await backup(s, { quiesce: true, extra: fullFlags() });
    expect(r.code).toBe(0);
    expect(r.stdout).toBe(completedBlock(16 * MiB) + `${duSb(s.final)}\nBITMAP_CREATED=${NEW_BITMAP}\n`);
    const calls = callLines(s);
    const f = calls.indexOf(FREEZE);
    expect(f).toBeGreaterThan(0);
    expect(calls[f + 1]).toMatch(/^backup-begin /);
    expect(calls[f + 2]).toBe(THAW);
    expect(calls.filter((c) => c.startsWith('qemu-agent-command'))).toEqual([FREEZE, THAW]);
    expect(s.fake.domain(VM).agent!.frozen).toBe(false);
    expectClean(s);
  });

  it('no guest agent: crash-consistent, with a warning line first (the original went silent)', async () => {
    const s = scenario('qz-noagent');
    const r = await backup(s, { quiesce: true, extra: fullFlags() });
    expect(r.code).toBe(0);
    expect(r.stdout).toBe(
      `Quiesce failed, backup is crash-consistent: ${NOT_CONNECTED}\n` +
        completedBlock(16 * MiB) +
        `${duSb(s.final)}\nBITMAP_CREATED=${NEW_BITMAP}\n`,
    );
    // The failed freeze is followed by one best-effort thaw, before backup-begin.
    const calls = callLines(s);
    expect(calls.filter((c) => c.startsWith('qemu-agent-command'))).toEqual([FREEZE, THAW]);
    expect(calls.indexOf(THAW)).toBeLessThan(calls.findIndex((c) => c.startsWith('backup-begin')));
    expect(s.fake.checkpointNames(VM)).toEqual([NEW_BITMAP]);
    expectClean(s);
  });

  it('no guest agent and NASBACKUP_QUIESCE_REQUIRED=1: a failure before backup-begin, nothing written', async () => {
    const s = scenario('qz-required');
    const before = snapshotTree(s.sb.nas);
    const r = await backup(s, { quiesce: true, extra: fullFlags() }, { NASBACKUP_QUIESCE_REQUIRED: '1' });
    expect(r).toMatchObject({ code: 1, stdout: `Failed to freeze the filesystems of vm ${VM}\n${NOT_CONNECTED}\n` });
    expect(s.fake.names()).not.toContain('backup-begin');
    expect(s.fake.checkpointNames(VM)).toEqual([]);
    expect(snapshotTree(s.sb.nas)).toEqual(before);
    expectClean(s);
  });

  it('a freeze whose reply is lost (agent timeout) may still have frozen the guest: it is thawed', async () => {
    const lost = 'error: Guest agent is not responding: Guest agent not available for now\n';
    const s = scenario('qz-lost', {
      domain: { agent: agentUp },
      fail: { 'qemu-agent-command:guest-fsfreeze-freeze': { apply: true, stderr: lost } },
    });
    const r = await backup(s, { quiesce: true, extra: fullFlags() });
    expect(r.code).toBe(0);
    expect(r.stdout.split('\n')[0]).toBe(`Quiesce failed, backup is crash-consistent: ${lost.trim()}`);
    const calls = callLines(s);
    expect(calls.slice(calls.indexOf(FREEZE), calls.indexOf(FREEZE) + 3)).toEqual([FREEZE, THAW, expect.stringMatching(/^backup-begin /)]);
    expect(s.fake.domain(VM).agent!.frozen).toBe(false);
    expectClean(s);
  });

  it('thaw keeps failing: the backup fails, the job is aborted, the new checkpoint and folder removed, thaw retried until it works', async () => {
    const thawErr = "error: internal error: unable to execute QEMU agent command 'guest-fsfreeze-thaw': Guest agent is busy\n";
    const s = scenario('qz-thaw', {
      domain: { agent: agentUp, job: { behaviour: 'completed', runningPolls: 100 } },
      fail: { 'qemu-agent-command:guest-fsfreeze-thaw': { times: 3, stderr: thawErr } },
    });
    const before = snapshotTree(s.sb.nas);
    const r = await backup(s, { quiesce: true, extra: fullFlags() });
    expect(r).toMatchObject({ code: 1, stdout: `Failed to thaw the filesystem for vm ${VM}: ${thawErr}` });
    const calls = callLines(s);
    const begin = calls.findIndex((c) => c.startsWith('backup-begin'));
    expect(calls.slice(begin + 1)).toEqual([
      THAW,
      THAW,
      THAW,
      THAW, // the cleanup's own attempt, which succeeds
      `domjobabort ${VM}`,
      `domjobinfo ${VM}`,
      `checkpoint-delete ${VM} ${NEW_BITMAP}`,
      `domstate ${VM} --reason`,
    ]);
    expect(s.fake.domain(VM).agent!.frozen).toBe(false);
    expect(s.fake.domain(VM).runtime!.active).toBeNull();
    expect(s.fake.checkpointNames(VM)).toEqual([]);
    expect(snapshotTree(s.sb.nas)).toEqual(before);
    expectClean(s);
  });

  it('thaw fails once: retried, the backup succeeds', async () => {
    const s = scenario('qz-thaw1', {
      domain: { agent: agentUp },
      fail: {
        'qemu-agent-command:guest-fsfreeze-thaw': {
          times: 1,
          stderr: 'error: Guest agent is not responding: Guest agent not available for now\n',
        },
      },
    });
    const r = await backup(s, { quiesce: true, extra: fullFlags() });
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/^Job type:/);
    expect(callLines(s).filter((c) => c === THAW)).toHaveLength(2);
    expect(logText(s.sb)).toContain(`Thaw of ${VM} failed (attempt 1/3)`);
    expect(s.fake.domain(VM).agent!.frozen).toBe(false);
    expectClean(s);
  });
});

describe.concurrent('-o backup: the domain state decides', () => {
  it('paused: backed up as a live domain, quiesce skipped with a warning, left paused', async () => {
    const s = scenario('st-paused', { state: 'paused', domain: { agent: agentUp } });
    const r = await backup(s, { quiesce: true });
    expect(r.code).toBe(0);
    expect(r.stdout).toBe(
      `Quiesce skipped: VM ${VM} is paused, its disks are already quiet\n` + completedBlock(16 * MiB) + `${duSb(s.final)}\n`,
    );
    const names = s.fake.names();
    expect(names).toContain('backup-begin');
    expect(names).not.toContain('qemu-agent-command');
    expect(names).not.toContain('resume');
    expect(s.fake.domain(VM).state).toBe('paused');
    expectClean(s);
  });

  it('in shutdown: refused with a clear message before anything is mounted', async () => {
    const s = scenario('st-shutdown', { state: 'in shutdown' });
    const before = snapshotTree(s.sb.nas);
    const r = await backup(s, { extra: fullFlags() });
    expect(r).toMatchObject({ code: 1, stdout: `VM ${VM} is in shutdown; back it up when it is running or stopped\n` });
    expect(s.fake.names()).toEqual(['version', 'list']);
    expect(snapshotTree(s.sb.nas)).toEqual(before);
    expectClean(s);
  });

  it.each([
    ['shut off', { state: 'shut off' }],
    ['unknown to libvirt', { undefinedVm: true }],
  ])('%s with -d "": NO_DISKS, nothing on the NAS (the original made an empty "successful" backup)', async (_name, o) => {
    const s = scenario('st-nodisks', o);
    const before = snapshotTree(s.sb.nas);
    const r = await backup(s);
    expect(r).toMatchObject({ code: 1, stdout: `VM ${VM} is not running and no disk paths (-d) were given; nothing to back up\n` });
    expect(s.fake.names()).toEqual(['version', 'list']);
    expect(snapshotTree(s.sb.nas)).toEqual(before);
    expect(logText(s.sb)).toContain('ERROR [NO_DISKS]');
    expectClean(s);
  });
});
