// -o backup of a running VM, the paths that succeed: bin/nasbackup as a child process,
// the fake virsh answering for libvirt (its backup-begin writes real qcow2 targets),
// the NAS a real bind mount of a local folder. Each test pins the exact stdout the
// agent parses, what lands on the NAS, the calls made, and the domain afterwards.
import { readFileSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { contentSha256 } from '../helpers/qemu.js';
import { removeTempDirs } from '../helpers/tmp.js';
import {
  BACKUP_PATH,
  backup,
  compareImages,
  completedBlock,
  DATA_DIRTY,
  DATA_VOL,
  dataFile,
  duSb,
  expectClean,
  fullFlags,
  incrementalFlags,
  MiB,
  modeOf,
  NEW_BITMAP,
  normalizedCalls,
  othersOnNas,
  PARENT_BITMAP,
  PARENT_TS,
  qemuInfo,
  ROOT_DIRTY,
  ROOT_VOL,
  rootFile,
  scenario,
  seedOtherBackups,
  SIDE_FILES,
  VM,
} from './scenario.js';

afterAll(removeTempDirs);

const sum = (ws: Array<{ length: number }>): number => ws.reduce((a, w) => a + w.length, 0);

describe.concurrent('-o backup, running VM', () => {
  it('legacy (no -M): push backup without checkpoint; stdout = the completed job block, then du -sb', async () => {
    const s = scenario('bk-legacy');
    seedOtherBackups(s.sb);
    const before = othersOnNas(s.sb);
    const r = await backup(s);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    expect(r.stdout).toBe(completedBlock(16 * MiB) + `${duSb(s.final)}\n`);

    expect(readdirSync(s.final).sort()).toEqual([...SIDE_FILES, 'manifest.json', `root.${ROOT_VOL}.qcow2`].sort());
    const root = join(s.final, `root.${ROOT_VOL}.qcow2`);
    expect(compareImages(root, s.rootDisk)).toBe('Images are identical.');
    expect(qemuInfo(root)['backing-filename']).toBeUndefined();
    expect(modeOf(root)).toBe('0600');
    expect(readFileSync(join(s.final, 'dominfo.xml'), 'utf8')).toMatch(/^Id: {13}7\nName: {11}i-2-10-VM\n/);
    expect(readFileSync(join(s.final, 'domain-config.xml'), 'utf8')).toContain(`<source file='${s.rootDisk}' index='2'/>`);
    expect(othersOnNas(s.sb)).toEqual(before);

    expect(normalizedCalls(s)).toEqual([
      'version',
      'list',
      `domblklist ${VM} --details`,
      `qemu-monitor-command ${VM} {"execute":"query-block"}`,
      `domjobinfo ${VM} --completed`,
      `backup-begin --domain ${VM} --backupxml <MP>/${BACKUP_PATH}.partial/backup.xml`,
      `dumpxml ${VM}`,
      `dominfo ${VM}`,
      `domiflist ${VM}`,
      `domblklist ${VM}`,
      `domjobinfo ${VM} --completed --keep-completed`,
      `domjobinfo ${VM} --completed`,
      `domstate ${VM} --reason`,
    ]);
    expect(s.fake.checkpointNames(VM)).toEqual([]);
    expect(s.fake.domain(VM).state).toBe('running');
    expectClean(s);
  });

  it('full, two disks and an empty cdrom (rebase-era): root + datadisk files, checkpoint created, BITMAP_CREATED last', async () => {
    const s = scenario('bk-full2', { dataDisk: true, cdrom: true });
    const r = await backup(s, { extra: fullFlags() });
    expect(r.code).toBe(0);
    expect(r.stdout).toBe(completedBlock(24 * MiB) + `${duSb(s.final)}\nBITMAP_CREATED=${NEW_BITMAP}\n`);
    expect(readdirSync(s.final).sort()).toEqual(
      [`datadisk.${DATA_VOL}.qcow2`, ...SIDE_FILES, 'manifest.json', `root.${ROOT_VOL}.qcow2`].sort(),
    );
    expect(compareImages(join(s.final, `datadisk.${DATA_VOL}.qcow2`), s.dataDisk!)).toBe('Images are identical.');

    // One push target per disk, the cdrom left out; the checkpoint covers both disks.
    const [begin] = s.fake.callsOf('backup-begin');
    expect(begin!.argv.slice(-2)[0]).toBe('--checkpointxml');
    const bxml = begin!.inputs!['--backupxml']!;
    expect([...bxml.matchAll(/<disk name="(\w+)"/g)].map((m) => m[1])).toEqual(['vda', 'vdb']);
    expect(bxml).not.toContain('<incremental>');
    expect(begin!.inputs!['--checkpointxml']).toMatch(
      new RegExp(`<name>${NEW_BITMAP}</name>[\\s\\S]*<disk name="vda" checkpoint="bitmap"/>\\s*<disk name="vdb" checkpoint="bitmap"/>`),
    );
    expect(s.fake.checkpointNames(VM)).toEqual([NEW_BITMAP]);
    expect(s.fake.bitmaps(VM, 'vda')).toEqual([NEW_BITMAP]);
    expect(s.fake.bitmaps(VM, 'vdb')).toEqual([NEW_BITMAP]);
    expectClean(s);
  });

  it.each([
    ['merged', (du: string) => `${du}\n`],
    ['newest', (du: string) => `BACKUP_SIZE_TOTAL=${du}\n${du}\n`],
  ])('full, agent profile %s: no BITMAP_CREATED, the byte total is the last line', async (profile, tail) => {
    const s = scenario(`bk-${profile}`);
    const r = await backup(s, { extra: fullFlags() }, { NASBACKUP_AGENT_PROFILE: profile });
    expect(r.code).toBe(0);
    expect(r.stdout).toBe(completedBlock(16 * MiB) + tail(duSb(s.final)));
    expect(s.fake.checkpointNames(VM)).toEqual([NEW_BITMAP]);
    expectClean(s);
  });

  it('-d given for a VM that is running: the stopped-VM format, one integer per line (file sizes, ls order)', async () => {
    const s = scenario('bk-run-d', { dataDisk: true });
    const r = await backup(s, { disks: `${s.rootDisk},${s.dataDisk}` });
    expect(r.code).toBe(0);
    const sizes = [`datadisk.${DATA_VOL}.qcow2`, `root.${ROOT_VOL}.qcow2`].map((f) => String(readFileSync(join(s.final, f)).length));
    expect(r.stdout).toBe(sizes.map((n) => `${n}\n`).join(''));
    expect(s.fake.names()).toContain('backup-begin');
    expectClean(s);
  });

  it('incremental (parents given data disk first): only the changes, each relinked onto its own parent by a relative name; the chains read as the live disks', async () => {
    const s = scenario('bk-inc', {
      dataDisk: true,
      parentOnNas: true,
      domain: {
        checkpoints: [{ name: PARENT_BITMAP, creationTime: 1735689600 }],
        disks: [{ bitmaps: [PARENT_BITMAP] }, { bitmaps: [PARENT_BITMAP] }],
      },
    });
    seedOtherBackups(s.sb);
    const before = othersOnNas(s.sb);
    // Parents are matched to disks by volume id, not by position (the agent orders by deviceId).
    const r = await backup(s, { extra: incrementalFlags([dataFile(PARENT_TS), rootFile(PARENT_TS)]) });
    expect(r.code).toBe(0);
    expect(r.stdout).toBe(completedBlock(sum(ROOT_DIRTY) + sum(DATA_DIRTY)) + `${duSb(s.final)}\nBITMAP_CREATED=${NEW_BITMAP}\n`);

    for (const [file, live] of [
      [rootFile(), s.rootDisk],
      [dataFile(), s.dataDisk!],
    ] as const) {
      const abs = join(s.sb.nas, file);
      const info = qemuInfo(abs);
      expect(info['backing-filename']).toBe(`../${PARENT_TS}/${file.split('/').pop()}`);
      expect(info['backing-filename-format']).toBe('qcow2');
      expect(contentSha256(abs, s.sb.root)).toBe(contentSha256(live, s.sb.root));
    }
    expect(s.fake.callsOf('backup-begin')[0]!.inputs!['--backupxml']).toContain(`<incremental>${PARENT_BITMAP}</incremental>`);
    // The parent checkpoint is retired, the new one remains; the parent backup is untouched.
    expect(s.fake.checkpointNames(VM)).toEqual([NEW_BITMAP]);
    expect(s.fake.bitmaps(VM, 'vda')).toEqual([NEW_BITMAP]);
    expect(othersOnNas(s.sb)).toEqual(before);
    expectClean(s);
  });
});
