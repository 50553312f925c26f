// Today's upstream agents (contract §12): what the `merged` and `newest` profiles do that
// the merged/backported upstream script does, each proven here or in the test named:
//   #13424 tolerant sizes ............................ here (tolerantApparentSize; a size that cannot be read)
//   #13424 an unmount that times out after a good backup only warns ... here (merged, newest; rebase-era keeps exit 20)
//   #13643 stopped sizes by file size, not `ls` ........ here (a hostile `ls` on PATH changes nothing)
//   #12822 cleanup resumes a VM paused for the backup ... here (merged), and failures.test.ts "job Failed (NAS full)"
//   #13538 /dev/drbdNNNN named by volume UUID .......... test/store/disks.test.ts "resolveVolumeId"
//   #14203 BACKUP_SIZE_TOTAL= for the newest parser ..... here (running, legacy-full), running.test.ts "full, agent
//          profile newest", stopped.test.ts "newest", test/core/agent-output.test.ts (every profile parses)
//   -M legacy-full ...................................... here (merged, newest); golden rule legacy-full-mode
//   INCREMENTAL_FALLBACK=true ........................... here (merged, a missing parent bitmap), checkpoints.test.ts
//          "bitmap inconsistent on one disk (merged agent …)", stopped.test.ts "-M incremental (merged agent)"
//   --parent-paths ...................................... here (merged incremental), running.test.ts "incremental …"
import { execFileSync } from 'node:child_process';
import { readdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { tolerantApparentSize, type SizeFs } from '../../lib/ops/backup/workdir.js';
import { leftovers, logText, writeShim } from '../helpers/cli.js';
import { removeTempDirs, tempDir } from '../helpers/tmp.js';
import {
  backup,
  callLines,
  compareImages,
  completedBlock,
  DATA_VOL,
  dataFile,
  duSb,
  expectClean,
  fullFlags,
  incrementalFlags,
  MiB,
  NEW_BITMAP,
  PARENT_BITMAP,
  PARENT_TS,
  ROOT_VOL,
  rootFile,
  scenario,
  VM,
} from './scenario.js';

afterAll(removeTempDirs);

const PROFILES = ['merged', 'newest'] as const;
const tail = (profile: 'merged' | 'newest', du: string): string => (profile === 'newest' ? `BACKUP_SIZE_TOTAL=${du}\n${du}\n` : `${du}\n`);
const agent = (profile: string): NodeJS.ProcessEnv => ({ NASBACKUP_AGENT_PROFILE: profile });

describe.concurrent("today's agents: merged and newest profiles (contract §12)", () => {
  it.each(PROFILES)('%s: -M legacy-full is a full backup without checkpoint; no BITMAP_CREATED', async (profile) => {
    const s = scenario(`prof-legacy-${profile}`);
    const r = await backup(s, { extra: ['-M', 'legacy-full'] }, agent(profile));
    expect(r).toMatchObject({ code: 0, stderr: '' });
    expect(r.stdout).toBe(completedBlock(16 * MiB) + tail(profile, duSb(s.final)));
    expect(callLines(s).filter((c) => c.startsWith('backup-begin'))).toEqual([expect.not.stringContaining('--checkpointxml') as unknown]);
    expect(s.fake.checkpointNames(VM)).toEqual([]);
    expect(compareImages(join(s.final, `root.${ROOT_VOL}.qcow2`), s.rootDisk)).toBe('Images are identical.');
    expectClean(s);
  });

  it.each(PROFILES)('%s: --parent-paths (one per disk): a thin incremental on each parent, no marker', async (profile) => {
    const s = scenario(`prof-inc-${profile}`, {
      dataDisk: true,
      parentOnNas: true,
      domain: { checkpoints: [PARENT_BITMAP], disks: [{ bitmaps: [PARENT_BITMAP] }, { bitmaps: [PARENT_BITMAP] }] },
    });
    const r = await backup(s, { extra: incrementalFlags([rootFile(PARENT_TS), dataFile(PARENT_TS)]) }, agent(profile));
    expect(r.code).toBe(0);
    expect(r.stdout).not.toContain('INCREMENTAL_FALLBACK');
    expect(r.stdout).not.toContain('BITMAP_CREATED');
    expect(r.stdout.endsWith(tail(profile, duSb(s.final)))).toBe(true);
    expect(compareImages(join(s.final, `root.${ROOT_VOL}.qcow2`), s.rootDisk)).toBe('Images are identical.');
    expect(compareImages(join(s.final, `datadisk.${DATA_VOL}.qcow2`), s.dataDisk!)).toBe('Images are identical.');
    expect(s.fake.checkpointNames(VM)).toEqual([NEW_BITMAP]);
    expectClean(s);
  });

  it.each(PROFILES)('%s: a parent bitmap that is gone: a full backup and INCREMENTAL_FALLBACK=true first', async (profile) => {
    const s = scenario(`prof-fb-${profile}`, { parentOnNas: true });
    const r = await backup(s, { extra: incrementalFlags([rootFile(PARENT_TS)]) }, agent(profile));
    expect(r.code).toBe(0);
    expect(r.stdout).toBe('INCREMENTAL_FALLBACK=true\n' + completedBlock(16 * MiB) + tail(profile, duSb(s.final)));
    expectClean(s);
  });

  it.each(PROFILES)('%s: the job fails and pauses the VM (NAS full): cleanup resumes it (#12822)', async (profile) => {
    const s = scenario(`prof-resume-${profile}`, {
      domain: { job: { behaviour: 'failed', errorMessage: 'No space left on device', pauseOnFailure: true } },
    });
    const r = await backup(s, { extra: fullFlags() }, agent(profile));
    expect(r.code).toBe(1);
    // One line naming the cause (issue 19 item 1), the VM resumed either way.
    expect(r.stdout).toBe(
      `The NAS ran out of space during the backup of ${VM} (No space left on device): backup stopped, partial files removed, VM resumed\n`,
    );
    expect(callLines(s).at(-1)).toBe(`resume ${VM}`);
    expect(s.fake.domain(VM).state).toBe('running');
    expectClean(s);
  });

  it.each(PROFILES)("%s: stopped-VM sizes are the files' sizes, whatever `ls` prints (#13643)", async (profile) => {
    const s = scenario(`prof-ls-${profile}`, { dataDisk: true, state: 'shut off' });
    // An `ls -l` with another column layout (Ubuntu 26.04's broke the original's awk): never used.
    writeShim(s.sb, 'ls', `echo "-rw-r--r-- 1 0 0 Jul 6 12:00 917504 root.x.qcow2"; exit 0`);
    const r = await backup(s, { disks: `${s.rootDisk},${s.dataDisk}` }, agent(profile));
    expect(r).toMatchObject({ code: 0, stderr: '' });
    const sizes = [`datadisk.${DATA_VOL}.qcow2`, `root.${ROOT_VOL}.qcow2`].map((f) => `${statSync(join(s.final, f)).size}\n`).join('');
    expect(r.stdout).toBe((profile === 'newest' ? `BACKUP_SIZE_TOTAL=${duSb(s.final)}\n` : '') + sizes);
    expect(logText(s.sb)).not.toMatch(/exec: ls /);
    expectClean(s);
  });
});

describe.concurrent('#13424: an unmount that times out after a good backup', () => {
  /** `umount` that hangs past NASBACKUP_UMOUNT_TIMEOUT, every attempt (the lazy one too): the mount stays. */
  async function hangingUnmount(profile: string) {
    const s = scenario(`prof-umount-${profile}`);
    writeShim(s.sb, 'umount', 'exec sleep 30');
    const r = await backup(
      s,
      { extra: fullFlags() },
      { ...agent(profile), NASBACKUP_UMOUNT_TIMEOUT: '0.3', NASBACKUP_UMOUNT_ATTEMPTS: '1' },
    );
    const left = leftovers(s.sb);
    // Take down what the hanging umount left, whatever the assertions say.
    for (const m of left.mounts) execFileSync('/usr/bin/umount', [m]);
    for (const d of readdirSync(s.sb.tmp)) execFileSync('rm', ['-d', join(s.sb.tmp, d)], { stdio: 'ignore' });
    return { s, r, left };
  }

  it.each(PROFILES)("%s: only warns: exit 0, the backup's own stdout, the warning in the log", async (profile) => {
    const { s, r, left } = await hangingUnmount(profile);
    expect(left.mounts).toHaveLength(1);
    expect(r.code).toBe(0);
    expect(r.stdout).toBe(completedBlock(16 * MiB) + tail(profile, duSb(s.final)));
    expect(logText(s.sb)).toMatch(
      new RegExp(
        `Warning: after the complete backup ${VM}/2025\\.01\\.04\\.00\\.00\\.00: Failed to unmount \\S+csbackup\\.\\w{5}: .*\\(not a failure for the ${profile} agent\\)`,
      ),
    );
    expect(compareImages(join(s.final, `root.${ROOT_VOL}.qcow2`), s.rootDisk)).toBe('Images are identical.');
  });

  it('rebase-era: the original pairing keeps exit 20 (Backup cleanup failed), the backup itself complete', async () => {
    const { s, r, left } = await hangingUnmount('rebase-era');
    expect(left.mounts).toHaveLength(1);
    expect(r.code).toBe(20);
    expect(r.stdout).toMatch(
      /\nFailed to unmount \S+csbackup\.\w{5}: [^\n]*\n(Failed to remove mount point [^\n]*\n)?Backup cleanup failed\n$/,
    );
    expect(compareImages(join(s.final, `root.${ROOT_VOL}.qcow2`), s.rootDisk)).toBe('Images are identical.');
  });
});

describe('#13424: tolerant sizes', () => {
  it('an entry that cannot be read counts 0 and is logged; the rest is summed like du -sb', async () => {
    const dir = tempDir('tolerant');
    execFileSync('sh', ['-c', `printf 12345 > ${dir}/a; printf 1234567 > ${dir}/b; mkdir ${dir}/sub; printf 99 > ${dir}/sub/c`]);
    const real = await import('node:fs/promises');
    const logged: string[] = [];
    const fs: SizeFs = {
      lstat: (p, o) => (p.endsWith('/b') ? Promise.reject(new Error('ENOENT: gone meanwhile')) : real.lstat(p, o)),
      readdir: (p) => (p.endsWith('/sub') ? Promise.reject(new Error('EIO: i/o error')) : real.readdir(p)),
    };
    const total = await tolerantApparentSize(dir, (m) => logged.push(m), fs);
    const st = (p: string): bigint => BigInt(statSync(p).size);
    expect(total).toBe(st(dir) + 5n + st(join(dir, 'sub')));
    expect(logged).toEqual([
      `Warning: cannot read the size of ${dir}/b (ENOENT: gone meanwhile); counting 0 for it`,
      `Warning: cannot list ${dir}/sub (EIO: i/o error); counting only the folder itself`,
    ]);
    // Nothing unreadable: exactly du -sb.
    expect(String(await tolerantApparentSize(dir, () => {}))).toBe(execFileSync('du', ['-sb', dir], { encoding: 'utf8' }).split('\t')[0]);
  });
});
