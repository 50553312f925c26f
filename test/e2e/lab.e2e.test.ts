// Smoke test of the e2e lab itself: a real TCG guest with an agent, a host-side
// write, a real push backup with a checkpoint, and fsfreeze. If this fails,
// product e2e tests cannot be trusted either.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  agentCommand,
  createQcow2,
  ensureLab,
  type Guest,
  guestWrite,
  mkfsExt4,
  qemuLogPath,
  run,
  startGuest,
  virsh,
  waitFor,
} from './lab.js';

const MiB = 1024 * 1024;

describe.sequential('e2e lab smoke', () => {
  let dir = '';
  let guest: Guest | undefined;
  const name = `nbe2e-smoke-${process.pid}`;

  beforeAll(async () => {
    await ensureLab();
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbe2e-'));
  }, 600_000);

  afterAll(async () => {
    await guest?.destroy().catch(() => {});
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  it('boots a guest whose agent answers', async () => {
    await createQcow2(path.join(dir, 'root.qcow2'), 64 * MiB);
    await mkfsExt4(path.join(dir, 'data.qcow2'), 32 * MiB);
    guest = await startGuest({
      name,
      disks: [path.join(dir, 'root.qcow2'), path.join(dir, 'data.qcow2')],
      dir,
    });
    console.log(`guest ready after ${guest.timings.readyMs} ms, agent after ${guest.timings.agentMs} ms`);
    expect(await agentCommand(name, 'guest-ping')).toEqual({ return: {} });
    expect(fs.readFileSync(guest.consoleLog, 'utf8')).toContain('mounted /dev/vdb');
  }, 180_000);

  it('writes into the running disk from the host', async () => {
    await guestWrite(name, { target: 'vda', pattern: 0xab, offset: 1 * MiB, length: 1 * MiB });
    await guestWrite(name, { target: 'vda', pattern: 0x5a, offset: 40 * MiB, length: 64 * 1024 });
    await expect(guestWrite(name, { target: 'vdz', pattern: 1, offset: 0, length: 512 })).rejects.toThrow(/no disk vdz/);
    // Past the end of the 64 MiB disk: HMP says nothing, the domain log says it failed.
    await expect(guestWrite(name, { target: 'vda', pattern: 1, offset: 100 * MiB, length: 512 })).rejects.toThrow(/failed/);
  }, 60_000);

  it('takes a full push backup with a checkpoint that matches the live disks', async () => {
    const target = path.join(dir, 'backup');
    fs.mkdirSync(target);
    const bxml = path.join(dir, 'b.xml');
    const cxml = path.join(dir, 'c.xml');
    fs.writeFileSync(
      bxml,
      `<domainbackup mode='push'><disks>
  <disk name='vda' backup='yes' type='file'><driver type='qcow2'/><target file='${target}/vda.qcow2'/></disk>
  <disk name='vdb' backup='yes' type='file'><driver type='qcow2'/><target file='${target}/vdb.qcow2'/></disk>
</disks></domainbackup>\n`,
    );
    fs.writeFileSync(
      cxml,
      `<domaincheckpoint><name>ckp-1</name><disks><disk name='vda' checkpoint='bitmap'/><disk name='vdb' checkpoint='bitmap'/></disks></domaincheckpoint>\n`,
    );

    const t0 = Date.now();
    const begin = await virsh(['backup-begin', name, '--backupxml', bxml, '--checkpointxml', cxml], { check: true });
    expect(begin.stdout).toContain('Backup started');
    // --anystats so a Failed job is reported with its error, not polled forever.
    const jobType = await waitFor('backup job to finish', 120_000, async () => {
      const r = await virsh(['domjobinfo', name, '--completed', '--keep-completed', '--anystats'], { check: true });
      const t = r.stdout.match(/^Job type:\s+(\S+)/m)?.[1];
      return t === 'Completed' || t === 'Failed' ? `${t}\n${r.stdout}` : undefined;
    });
    console.log(`backup finished in ${Date.now() - t0} ms`);
    expect(jobType).toMatch(/^Completed/);
    await virsh(['domjobinfo', name, '--completed'], { check: true }); // consume the stats

    const ckps = await virsh(['checkpoint-list', name, '--name'], { check: true });
    expect(ckps.stdout.split('\n')).toContain('ckp-1');

    // The host-side write must be in the backup.
    const read = await run('qemu-io', ['-r', '-U', '-f', 'qcow2', '-c', `read -P 0xab ${MiB} ${MiB}`, `${target}/vda.qcow2`], {
      check: true,
    });
    expect(read.stdout).toContain(`read ${MiB}/${MiB} bytes`);
    expect(read.stdout).not.toMatch(/verification failed/i);

    // Compare with the live images while the guest cannot write.
    await virsh(['suspend', name], { check: true });
    try {
      for (const [bk, live] of [
        ['vda.qcow2', 'root.qcow2'],
        ['vdb.qcow2', 'data.qcow2'],
      ] as const) {
        const cmp = await run('qemu-img', ['compare', '-U', path.join(target, bk), path.join(dir, live)]);
        expect(cmp.stdout.trim(), `${bk} vs ${live}`).toBe('Images are identical.');
        expect(cmp.exitCode).toBe(0);
      }
    } finally {
      await virsh(['resume', name], { check: true });
    }
  }, 180_000);

  it('backs up into a filesystem mounted after the domain started', async () => {
    // Guards the qemu.conf `namespaces = [ ]` setting: with libvirt's default
    // per-domain mount namespace (and `/` private), QEMU would not see this mount.
    const mnt = path.join(dir, 'late-mnt');
    fs.mkdirSync(mnt);
    await run('mount', ['-t', 'tmpfs', '-o', 'size=96m', 'nbe2e-tmpfs', mnt], { check: true });
    try {
      const bxml = path.join(dir, 'b-late.xml');
      fs.writeFileSync(
        bxml,
        `<domainbackup mode='push'><disks><disk name='vda' backup='yes' type='file'><driver type='qcow2'/><target file='${mnt}/vda.qcow2'/></disk><disk name='vdb' backup='no'/></disks></domainbackup>\n`,
      );
      await virsh(['backup-begin', name, '--backupxml', bxml], { check: true });
      const done = await waitFor('late-mount backup to finish', 120_000, async () => {
        const r = await virsh(['domjobinfo', name, '--completed', '--keep-completed', '--anystats'], { check: true });
        return /^Job type:\s+(Completed|Failed)/m.test(r.stdout) ? r.stdout : undefined;
      });
      expect(done).toMatch(/^Job type:\s+Completed/m);
      await virsh(['domjobinfo', name, '--completed'], { check: true });
      const read = await run('qemu-io', ['-r', '-U', '-f', 'qcow2', '-c', `read -P 0x5a ${40 * MiB} 65536`, `${mnt}/vda.qcow2`]);
      expect(read.stdout).toContain('read 65536/65536 bytes');
    } finally {
      const u = await run('umount', [mnt]);
      if (u.exitCode !== 0) await run('umount', ['-l', mnt]);
    }
  }, 180_000);

  it('freezes and thaws the guest filesystem through the agent', async () => {
    expect(await agentCommand(name, 'guest-fsfreeze-freeze')).toEqual({ return: 1 });
    try {
      expect(await agentCommand(name, 'guest-fsfreeze-status')).toEqual({ return: 'frozen' });
    } finally {
      expect(await agentCommand(name, 'guest-fsfreeze-thaw')).toEqual({ return: 1 });
    }
    expect(await agentCommand(name, 'guest-fsfreeze-status')).toEqual({ return: 'thawed' });
  }, 60_000);

  it('destroys the transient domain', async () => {
    await guest!.destroy();
    await guest!.destroy(); // idempotent
    expect((await virsh(['domstate', name])).exitCode).not.toBe(0);
    guest = undefined;
    fs.rmSync(qemuLogPath(name), { force: true }); // kept only when an earlier step failed
  }, 60_000);

  it('boots an agent-less guest whose agent calls fail fast', async () => {
    const noAgent = `${name}-noagent`;
    await createQcow2(path.join(dir, 'root2.qcow2'), 16 * MiB);
    const g = await startGuest({ name: noAgent, disks: [path.join(dir, 'root2.qcow2')], dir, withAgent: false });
    try {
      expect(g.timings.agentMs).toBeUndefined();
      await expect(agentCommand(noAgent, 'guest-ping')).rejects.toThrow(/not connected|not responding/);
    } finally {
      await g.destroy();
      fs.rmSync(qemuLogPath(noAgent), { force: true });
    }
  }, 180_000);
});
