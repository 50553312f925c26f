// The fake virsh itself: its answers are libvirt 9.0's, byte for byte (texts as
// recorded from virsh and in the golden transcripts), its effects are libvirt's, and
// the shim's fast answers are exactly what the fake would print.
import { spawn } from 'node:child_process';
import { existsSync, mkdirSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { removeTempDirs } from '../helpers/tmp.js';
import { FAKE_VIRSH, type FakeVirsh } from '../fakes/virsh-state.js';
import { MiB, NEW_BITMAP, PARENT_BITMAP, qemuInfo, scenario, VM } from './scenario.js';

afterAll(removeTempDirs);

interface Answer {
  code: number | null;
  stdout: string;
  stderr: string;
}

function call(command: string, args: string[], env: NodeJS.ProcessEnv = {}): Promise<Answer> {
  return new Promise((res) => {
    const c = spawn(command, args, { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    c.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    c.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    c.on('close', (code) => res({ code, stdout, stderr }));
  });
}

/** Through the `virsh` the program runs (the shim: fast answers, or the fake). */
const virsh = (shims: string, ...args: string[]): Promise<Answer> => call(join(shims, 'virsh'), ['-c', 'qemu:///system', ...args]);
/** The fake itself, bypassing the shim's fast path. */
const direct = (fake: FakeVirsh, ...args: string[]): Promise<Answer> =>
  call(process.execPath, [FAKE_VIRSH, '-c', 'qemu:///system', ...args], { FAKE_VIRSH_STATE: fake.statePath });

describe('fake virsh: libvirt 9 output formats', () => {
  it('tables, pads and the trailing empty line, as virsh prints them', async () => {
    const s = scenario('fake-fmt', {
      dataDisk: true,
      cdrom: true,
      domain: { checkpoints: [{ name: PARENT_BITMAP, creationTime: 1735689600 }] },
    });
    const v = (...a: string[]) => virsh(s.sb.shims, ...a);
    const w = Math.max(s.rootDisk.length, 'Source'.length);
    const [version, list, blk, names, info, state, nic] = await Promise.all([
      call(join(s.sb.shims, 'virsh'), ['version']),
      v('list'),
      v('domblklist', VM, '--details'),
      v('checkpoint-list', VM, '--name'),
      v('dominfo', VM),
      v('domstate', VM),
      v('domiflist', VM),
    ]);
    expect(version.stdout).toBe(
      'Compiled against library: libvirt 9.0.0\nUsing library: libvirt 9.0.0\nUsing API: QEMU 9.0.0\nRunning hypervisor: QEMU 7.2.0\n\n',
    );
    expect(list.stdout).toBe(
      ' Id   Name        State\n---------------------------\n 3    i-3-12-VM   running\n 7    i-2-10-VM   running\n\n',
    );
    expect(blk.stdout).toBe(
      ' Type   Device   Target   Source\n' +
        '-'.repeat(1 + 4 + 3 + 6 + 3 + 6 + 3 + w + 2) +
        '\n' +
        ` file   disk     vda      ${s.rootDisk}\n` +
        ` file   disk     vdb      ${s.dataDisk}\n` +
        ' file   cdrom    hdc      -\n\n',
    );
    expect(names.stdout).toBe(`${PARENT_BITMAP}\n\n`);
    expect(info.stdout).toMatch(
      /^Id: {13}7\nName: {11}i-2-10-VM\nUUID: {11}4c0c1f2e-8d7a-4b1e-9f3a-2d6e5b7c8a90\nOS Type: {8}hvm\nState: {10}running\n/,
    );
    expect(state.stdout).toBe('running\n\n');
    expect(nic.stdout).toBe(
      ' Interface   Type     Source     Model    MAC\n-------------------------------------------------------------\n vnet0       bridge   cloudbr0   virtio   02:00:4c:5e:00:01\n\n',
    );
  });

  it("the shim's fast answers and call log equal the fake's own", async () => {
    const s = scenario('fake-fast', { dataDisk: true, cdrom: true });
    const queries = [
      ['list'],
      ['domblklist', VM, '--details'],
      ['domblklist', VM],
      ['dumpxml', VM],
      ['dominfo', VM],
      ['domiflist', VM],
      ['domstate', VM],
      ['checkpoint-list', VM, '--name'],
    ];
    const slow = await Promise.all(queries.map((q) => direct(s.fake, ...q)));
    expect(existsSync(`${s.fake.statePath}.fast`)).toBe(true); // rendered when the state was written
    const fast = await Promise.all(queries.map((q) => virsh(s.sb.shims, ...q)));
    expect(fast).toEqual(slow);
    const calls = s.fake.calls();
    expect(calls.slice(queries.length).every((c) => c.fast === true)).toBe(true);
    const argv = calls.map((c) => JSON.stringify(c.argv));
    expect(argv.slice(queries.length).sort()).toEqual(argv.slice(0, queries.length).sort());
  });

  it("errors: virsh's texts on stderr, an empty line on stdout, exit 1", async () => {
    const s = scenario('fake-err');
    const [agent, gone, abort] = await Promise.all([
      virsh(s.sb.shims, 'qemu-agent-command', VM, '--timeout', '5', '{"execute":"guest-fsfreeze-freeze"}'),
      virsh(s.sb.shims, 'dominfo', 'i-9-99-VM'),
      virsh(s.sb.shims, 'domjobabort', VM),
    ]);
    expect(agent).toEqual({ code: 1, stdout: '\n', stderr: 'error: Guest agent is not responding: QEMU guest agent is not connected\n' });
    expect(gone).toEqual({ code: 1, stdout: '\n', stderr: "error: failed to get domain 'i-9-99-VM'\n" });
    expect(abort).toEqual({ code: 1, stdout: '\n', stderr: 'error: Requested operation is not valid: no job is active on the domain\n' });
  });
});

describe('fake virsh: a push backup as libvirt runs it', () => {
  const bxml = (target: string, incremental?: string): string =>
    `<domainbackup mode='push'>${incremental ? `<incremental>${incremental}</incremental>` : ''}<disks>` +
    `<disk name='vda' backup='yes' type='file' backupmode='full'><driver type='qcow2'/><target file='${target}' /></disk></disks></domainbackup>`;

  it('full with a checkpoint: writes the target (0600), registers the checkpoint and bitmap, then reports the job', async () => {
    const s = scenario('fake-full');
    const dir = join(s.sb.root, 'out');
    mkdirSync(dir);
    writeFileSync(join(dir, 'b.xml'), bxml(join(dir, 'vda.qcow2')));
    writeFileSync(
      join(dir, 'c.xml'),
      `<domaincheckpoint><name>${NEW_BITMAP}</name><disks><disk name='vda' checkpoint='bitmap'/></disks></domaincheckpoint>`,
    );
    const begin = await virsh(
      s.sb.shims,
      'backup-begin',
      '--domain',
      VM,
      '--backupxml',
      join(dir, 'b.xml'),
      '--checkpointxml',
      join(dir, 'c.xml'),
    );
    expect(begin).toEqual({ code: 0, stdout: 'Backup started\n\n', stderr: '' });
    expect((statSync(join(dir, 'vda.qcow2')).mode & 0o777).toString(8)).toBe('600');
    expect(qemuInfo(join(dir, 'vda.qcow2'))['virtual-size']).toBe(16 * MiB);
    expect(s.fake.checkpointNames(VM)).toEqual([NEW_BITMAP]);
    expect(s.fake.bitmaps(VM, 'vda')).toEqual([NEW_BITMAP]);
    const done =
      'Job type:         Completed   \nOperation:        Backup      \nTime elapsed:     133          ms\n' +
      'File processed:   16.000 MiB\nFile remaining:   0.000 B\nFile total:       16.000 MiB\n\n';
    expect((await virsh(s.sb.shims, 'domjobinfo', VM, '--completed', '--keep-completed')).stdout).toBe(done);
    expect((await virsh(s.sb.shims, 'domjobinfo', VM, '--completed')).stdout).toBe(done);
    // --completed without --keep-completed consumed the statistics.
    expect((await virsh(s.sb.shims, 'domjobinfo', VM, '--completed')).stdout).toBe('Job type:         None        \n\n');
  });

  it("incremental: the target is backed by the live disk; an unknown checkpoint is libvirt's error", async () => {
    const s = scenario('fake-inc', {
      domain: { checkpoints: [{ name: PARENT_BITMAP, creationTime: 1735689600 }], disks: [{ bitmaps: [PARENT_BITMAP] }] },
    });
    const dir = join(s.sb.root, 'out');
    mkdirSync(dir);
    writeFileSync(join(dir, 'b.xml'), bxml(join(dir, 'inc.qcow2'), PARENT_BITMAP));
    writeFileSync(join(dir, 'x.xml'), bxml(join(dir, 'x.qcow2'), 'nonexistent'));
    const bad = await virsh(s.sb.shims, 'backup-begin', '--domain', VM, '--backupxml', join(dir, 'x.xml'));
    expect(bad).toEqual({
      code: 1,
      stdout: '\n',
      stderr: "error: Domain checkpoint not found: Checkpoint 'nonexistent' for incremental backup of disk 'vda' not found\n",
    });
    expect(existsSync(join(dir, 'x.qcow2'))).toBe(false);
    expect((await virsh(s.sb.shims, 'backup-begin', '--domain', VM, '--backupxml', join(dir, 'b.xml'))).code).toBe(0);
    expect(qemuInfo(join(dir, 'inc.qcow2'))['backing-filename']).toBe(s.rootDisk);
  });

  it('a failed job: two lines with --completed, the error only with --anystats; the targets deleted', async () => {
    const s = scenario('fake-failed', {
      domain: { job: { behaviour: 'failed', errorMessage: 'No space left on device', timeElapsedMs: 71 } },
    });
    const dir = join(s.sb.root, 'out');
    mkdirSync(dir);
    writeFileSync(join(dir, 'b.xml'), bxml(join(dir, 'vda.qcow2')));
    expect((await virsh(s.sb.shims, 'backup-begin', '--domain', VM, '--backupxml', join(dir, 'b.xml'))).code).toBe(0);
    expect((await virsh(s.sb.shims, 'domjobinfo', VM, '--completed', '--keep-completed')).stdout).toBe(
      'Job type:         Failed      \nOperation:        Backup      \n\n',
    );
    expect((await virsh(s.sb.shims, 'domjobinfo', VM, '--completed', '--keep-completed', '--anystats')).stdout).toBe(
      'Job type:         Failed      \nOperation:        Backup      \nTime elapsed:     71           ms\n' +
        'File processed:   12.000 MiB\nFile remaining:   4.000 MiB\nFile total:       16.000 MiB\nError message:    No space left on device\n\n',
    );
    expect(existsSync(join(dir, 'vda.qcow2'))).toBe(false);
  });
});

describe('fake virsh: overlapping calls', () => {
  it('are served one at a time, as libvirtd serves them: a change made while a slow call runs survives its write-back', async () => {
    const s = scenario('fake-overlap', {
      domain: { checkpoints: [{ name: PARENT_BITMAP, creationTime: 1735689600 }] },
      // Slowed after it loaded the state; `times` makes it write the state back (its count).
      fail: { domjobinfo: { delayMs: 1500, times: 1 } },
    });
    const slow = direct(s.fake, 'domjobinfo', VM, '--completed');
    await new Promise((r) => setTimeout(r, 500));
    expect((await direct(s.fake, 'checkpoint-delete', VM, PARENT_BITMAP)).code).toBe(0);
    expect((await slow).code).toBe(0);
    expect(s.fake.checkpointNames(VM)).toEqual([]);
  });
});
