// Several backups at once on one host (apache/cloudstack#12847): four VMs backed up at the
// same moment onto the same NAS, each run mounting it on its own (one TMPDIR for all, one
// agent log, as on a KVM host), each VM answered by its own fake virsh whose backup-begin
// writes real qcow2 targets, or copied for real (stopped VMs). Every backup must be complete
// and right, with its own size, and nothing of one run may touch another's.
import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { hostname } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { makeSandbox, start, type RunOutcome } from '../helpers/cli.js';
import { removeTempDirs } from '../helpers/tmp.js';
import { snapshotTree } from '../helpers/tree.js';
import { compareImages, completedBlock, duSb, FAST_POLL, MiB, ROOT_VOL, DATA_VOL, scenario, TS, type Scenario } from './scenario.js';

afterAll(removeTempDirs);

const VMS = ['i-2-21-VM', 'i-2-22-VM', 'i-3-23-VM', 'i-4-24-VM'];

/** The shared host: one NAS folder, one TMPDIR for the mount points, one agent log. */
function host(tag: string): { nas: string; tmp: string; log: string } {
  const sb = makeSandbox(tag);
  return { nas: sb.nas, tmp: sb.tmp, log: sb.logFile };
}

function argv(vm: string, nas: string, disks: string, extra: string[]): string[] {
  return ['-o', 'backup', '-v', vm, '-t', 'none', '-s', nas, '-m', 'bind', '-p', `${vm}/${TS}`, '-q', 'false', '-d', disks, ...extra];
}

/** What the shared host must look like afterwards: nothing mounted, no mount point, no marker, no lock, no `.partial`. */
function expectHostClean(h: { nas: string; tmp: string }): void {
  expect(readdirSync(h.tmp)).toEqual([]);
  expect(readFileSync('/proc/self/mountinfo', 'utf8')).not.toContain(h.tmp);
  const left = snapshotTree(h.nas)
    .map((e) => e.path)
    .filter((p) => p.endsWith('.partial') || p.includes('.nasbackup') || p.includes('.partial/'));
  expect(left).toEqual([]);
}

describe('four backups at once onto one NAS', () => {
  it('running VMs (push backups overlapping in time): all complete, each with its own size and content', async () => {
    const h = host('par-run');
    const vms: Scenario[] = VMS.map((name, i) =>
      scenario(`par-run-${i}`, { dataDisk: i % 2 === 1, domain: { name, job: { runningPolls: 12 } } }),
    );
    const env = { ...FAST_POLL, TMPDIR: h.tmp, NASBACKUP_LOG_FILE: h.log };
    const runs = vms.map((s, i) => start(s.sb, argv(VMS[i]!, h.nas, '', ['-M', 'full', '--bitmap-new', `backup-17000000${i}`]), env).done);
    const outs: RunOutcome[] = await Promise.all(runs);

    for (const [i, s] of vms.entries()) {
      const vm = VMS[i]!;
      const final = join(h.nas, vm, TS);
      const o = outs[i]!;
      expect({ vm, code: o.code, stderr: o.stderr }).toEqual({ vm, code: 0, stderr: '' });
      const total = (i % 2 === 1 ? 24 : 16) * MiB;
      expect(o.stdout).toBe(completedBlock(total) + `${duSb(final)}\nBITMAP_CREATED=backup-17000000${i}\n`);
      expect(compareImages(join(final, `root.${ROOT_VOL}.qcow2`), s.rootDisk)).toBe('Images are identical.');
      if (s.dataDisk) expect(compareImages(join(final, `datadisk.${DATA_VOL}.qcow2`), s.dataDisk)).toBe('Images are identical.');
      // Each VM got its own checkpoint only, and its own folder only.
      expect(s.fake.checkpointNames(vm)).toEqual([`backup-17000000${i}`]);
      const manifest = JSON.parse(readFileSync(join(final, 'manifest.json'), 'utf8')) as { vm: string; path: string };
      expect([manifest.vm, manifest.path]).toEqual([vm, `${vm}/${TS}`]);
    }
    expect(readdirSync(h.nas).sort()).toEqual([...VMS].sort());
    // They really ran at once: every job began before any finished.
    const spans = vms.map((s) => {
      const calls = s.fake.calls();
      const begin = calls.find((c) => c.argv.includes('backup-begin'))!.t;
      const end = calls.filter((c) => c.argv.includes('domjobinfo')).at(-1)!.t;
      return { begin, end };
    });
    expect(Math.max(...spans.map((x) => x.begin))).toBeLessThan(Math.min(...spans.map((x) => x.end)));
    // Four mounts, four unmounts, each of its own mount point.
    const log = readFileSync(h.log, 'utf8');
    const mounts = [...log.matchAll(/exec: mount -t none \S+ (\S+csbackup\.\w{5}) -o bind -> exit 0/g)].map((m) => m[1]);
    expect(new Set(mounts).size).toBe(4);
    expectHostClean(h);
  });

  it('stopped VMs (real copies at the same time): all complete, sizes are each file’s own', async () => {
    const h = host('par-stop');
    const vms: Scenario[] = VMS.map((name, i) => scenario(`par-stop-${i}`, { dataDisk: true, state: 'shut off', domain: { name } }));
    const env = { TMPDIR: h.tmp, NASBACKUP_LOG_FILE: h.log };
    const outs = await Promise.all(
      vms.map(
        (s, i) =>
          start(s.sb, argv(VMS[i]!, h.nas, `${s.rootDisk},${s.dataDisk}`, ['-M', 'full', '--bitmap-new', `backup-17100000${i}`]), env).done,
      ),
    );
    for (const [i, s] of vms.entries()) {
      const final = join(h.nas, VMS[i]!, TS);
      const sizes = [`datadisk.${DATA_VOL}.qcow2`, `root.${ROOT_VOL}.qcow2`].map((f) => `${statSync(join(final, f)).size}\n`).join('');
      expect({ code: outs[i]!.code, stdout: outs[i]!.stdout }).toEqual({ code: 0, stdout: `BITMAP_CREATED=backup-17100000${i}\n${sizes}` });
      expect(compareImages(join(final, `root.${ROOT_VOL}.qcow2`), s.rootDisk)).toBe('Images are identical.');
      expect(compareImages(join(final, `datadisk.${DATA_VOL}.qcow2`), s.dataDisk!)).toBe('Images are identical.');
    }
    expectHostClean(h);
  });

  it('a dead run left its mount in the shared TMPDIR: the four runs sweep it once between them, and all complete', async () => {
    const h = host('par-sweep');
    // A killed run's leftovers: its mount point (mounted) and owner marker naming a pid that is gone.
    const dead = spawnSync('true').pid;
    const mp = join(h.tmp, 'csbackup.DeAd0');
    mkdirSync(mp);
    execFileSync('mount', ['--bind', h.nas, mp]);
    const info = { host: hostname(), pid: dead, pidStart: null, startedAt: new Date().toISOString(), operation: 'mount' };
    writeFileSync(join(h.tmp, '.csbackup.DeAd0.owner'), JSON.stringify(info) + '\n');
    try {
      const vms: Scenario[] = VMS.map((name, i) => scenario(`par-sweep-${i}`, { state: 'shut off', domain: { name } }));
      const env = { TMPDIR: h.tmp, NASBACKUP_LOG_FILE: h.log };
      const outs = await Promise.all(vms.map((s, i) => start(s.sb, argv(VMS[i]!, h.nas, s.rootDisk, []), env).done));
      for (const [i, o] of outs.entries()) {
        const final = join(h.nas, VMS[i]!, TS);
        expect({ code: o.code, stdout: o.stdout }).toEqual({
          code: 0,
          stdout: `${statSync(join(final, `root.${ROOT_VOL}.qcow2`)).size}\n`,
        });
        expect(compareImages(join(final, `root.${ROOT_VOL}.qcow2`), vms[i]!.rootDisk)).toBe('Images are identical.');
      }
      const log = readFileSync(h.log, 'utf8');
      expect(log).toMatch(/Cleaning up \S+\/csbackup\.DeAd0, left by a dead run/);
      expect(existsSync(mp)).toBe(false);
      expectHostClean(h);
    } finally {
      if (readFileSync('/proc/self/mountinfo', 'utf8').includes(mp)) execFileSync('umount', [mp]);
    }
  });
});
