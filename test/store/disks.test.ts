// Disk naming and identity: the volume id a disk's backup file is named after, and
// the parent each disk continues from, matched by that id — never by position.
import { mkdirSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { backupFileName, matchParents, resolveVolumeId, volumeId, volumeIdOfBackupFile, type NamedDisk } from '../../lib/store/disks.js';
import { removeTempDirs, tempDir } from '../helpers/tmp.js';
import { type NasbackupError } from '../../lib/errors.js';

const ROOT = 'b3f4c2a0-6d1e-4f7a-9c2b-1e5d8a7f3c01';
const DATA = 'c9e8d7f6-2a3b-4c5d-8e9f-0a1b2c3d4e02';
const DATA2 = '5f2c7e1a-0000-4000-8000-000000000001';

describe('volumeId', () => {
  it.each([
    ['/mnt/7f3c9a12-4b5d-3e6f-a1b2-c3d4e5f60718/b3f4c2a0-6d1e-4f7a-9c2b-1e5d8a7f3c01', ROOT],
    ['/var/lib/libvirt/images/b3f4c2a0-6d1e-4f7a-9c2b-1e5d8a7f3c01.qcow2', `${ROOT}.qcow2`],
    [`rbd:cloudstack/${ROOT}:mon_host=10.0.0.1\\;10.0.0.2:auth_supported=cephx:id=admin:key=AQB==`, ROOT],
    [`rbd:cloudstack/${ROOT}`, ROOT],
    [`/dev/drbd/by-res/cs-${ROOT}/0`, ROOT],
    [`/dev/drbd/by-res/cs-${ROOT}/1`, ROOT],
    ['/dev/drbd1001', 'drbd1001'],
  ])('%s -> %s', (source, id) => {
    expect(volumeId(source)).toBe(id);
  });
});

afterAll(removeTempDirs);

describe('resolveVolumeId: a LINSTOR disk attached as its DRBD minor is named by its volume UUID (#13538)', () => {
  /** A /dev as udev leaves it for LINSTOR: drbd/by-res/cs-<uuid>/<n> → ../../../drbdNNNN. */
  function dev(links: Record<string, string>): { dev: string; byRes: string } {
    const root = tempDir('dev');
    const byRes = join(root, 'drbd', 'by-res');
    for (const [rel, target] of Object.entries(links)) {
      mkdirSync(join(byRes, rel, '..'), { recursive: true });
      symlinkSync(target, join(byRes, rel));
    }
    for (const minor of ['drbd1000', 'drbd1001', 'drbd1002']) writeFileSync(join(root, minor), '');
    return { dev: root, byRes };
  }

  it('<dev>/drbd1001 → the uuid of the cs-<uuid> link that points at it (udev relative links, or absolute ones)', async () => {
    const d = dev({ [`cs-${DATA}/0`]: '../../../drbd1000', [`cs-${ROOT}/0`]: '../../../drbd1001' });
    symlinkSync(join(d.dev, 'drbd1002'), join(d.byRes, `cs-${DATA}`, '1'));
    expect(await resolveVolumeId(join(d.dev, 'drbd1001'), d.byRes)).toBe(ROOT);
    expect(await resolveVolumeId(join(d.dev, 'drbd1000'), d.byRes)).toBe(DATA);
    expect(await resolveVolumeId(join(d.dev, 'drbd1002'), d.byRes)).toBe(DATA);
  });

  it('a minor no link names is refused (VOLUME_ID_UNKNOWN), naming the device', async () => {
    const d = dev({ [`cs-${ROOT}/0`]: '../../../drbd1001' });
    await expect(resolveVolumeId(join(d.dev, 'drbd1002'), d.byRes)).rejects.toMatchObject({
      code: 'VOLUME_ID_UNKNOWN',
      message: expect.stringContaining(`Cannot tell the volume of ${join(d.dev, 'drbd1002')}: no LINSTOR link`) as unknown,
    });
  });

  it('every other source keeps its volumeId (no lookup); the default looks in /dev/drbd/by-res', async () => {
    expect(await resolveVolumeId(`/dev/drbd/by-res/cs-${ROOT}/0`)).toBe(ROOT);
    expect(await resolveVolumeId(`/mnt/p/${DATA}`)).toBe(DATA);
    expect(await resolveVolumeId('/dev/drbdX')).toBe('drbdX');
    expect(await resolveVolumeId('/srv/drbd1001')).toBe('drbd1001');
    // On this host no LINSTOR link exists: a minor is refused rather than named drbd1001.
    await expect(resolveVolumeId('/dev/drbd1001')).rejects.toMatchObject({ code: 'VOLUME_ID_UNKNOWN' });
  });
});

describe('backup file names', () => {
  it('root.<vol>.qcow2 for the first disk, datadisk.<vol>.qcow2 for every other', () => {
    expect([0, 1, 2].map((i) => backupFileName(i, 'v'))).toEqual(['root.v.qcow2', 'datadisk.v.qcow2', 'datadisk.v.qcow2']);
  });
  it('the volume id read back from a (mount-relative) backup file name', () => {
    expect(volumeIdOfBackupFile(`i-2-10-VM/2025.01.01.00.00.00/root.${ROOT}.qcow2`)).toBe(ROOT);
    expect(volumeIdOfBackupFile(`datadisk.${DATA}.qcow2`)).toBe(DATA);
    expect(volumeIdOfBackupFile(`root.${ROOT}.qcow2.qcow2`)).toBe(`${ROOT}.qcow2`);
    expect(volumeIdOfBackupFile('i-2-10-VM/2025.01.01.00.00.00/domain-config.xml')).toBeNull();
    expect(volumeIdOfBackupFile('root.qcow2')).toBeNull();
  });
});

describe('matchParents', () => {
  const disks: NamedDisk[] = [
    { volId: ROOT, file: `root.${ROOT}.qcow2` },
    { volId: DATA, file: `datadisk.${DATA}.qcow2` },
    { volId: DATA2, file: `datadisk.${DATA2}.qcow2` },
  ];
  const P = 'i-2-10-VM/2025.01.01.00.00.00';
  const none = async () => false;
  const code = async (p: Promise<unknown>): Promise<string> =>
    p.then(
      () => 'resolved',
      (e: NasbackupError) => `${e.code}: ${e.message}`,
    );

  it('pairs by volume id whatever the order (the agent sorts by deviceId, libvirt lists by target)', async () => {
    const parents = [`${P}/datadisk.${DATA2}.qcow2`, `${P}/root.${ROOT}.qcow2`, `${P}/datadisk.${DATA}.qcow2`];
    expect(await matchParents(disks, parents, none)).toEqual([
      `${P}/root.${ROOT}.qcow2`,
      `${P}/datadisk.${DATA}.qcow2`,
      `${P}/datadisk.${DATA2}.qcow2`,
    ]);
  });

  it('parents may come from different folders (a disk added later starts its chain later)', async () => {
    const parents = [`${P}/root.${ROOT}.qcow2`, `i-2-10-VM/2025.01.02.00.00.00/datadisk.${DATA}.qcow2`, `${P}/datadisk.${DATA2}.qcow2`];
    expect(await matchParents(disks, parents, none)).toEqual(parents);
  });

  it("G1 (--parent-path, root only): the other disks' parents are inferred beside it when they exist", async () => {
    const seen: string[] = [];
    const exists = async (rel: string) => {
      seen.push(rel);
      return true;
    };
    expect(await matchParents(disks, [`${P}/root.${ROOT}.qcow2`], exists)).toEqual([
      `${P}/root.${ROOT}.qcow2`,
      `${P}/datadisk.${DATA}.qcow2`,
      `${P}/datadisk.${DATA2}.qcow2`,
    ]);
    expect(seen).toEqual([`${P}/datadisk.${DATA}.qcow2`, `${P}/datadisk.${DATA2}.qcow2`]);
  });

  it('an inferred parent that is not there: the disk index and volume are named', async () => {
    const exists = async (rel: string) => rel.includes(DATA);
    expect(await code(matchParents(disks, [`${P}/root.${ROOT}.qcow2`], exists))).toBe(
      `INVALID_ARGUMENT: PARENT_PATHS list shorter than DISK_PATHS — missing parent for disk index 2 (volume ${DATA2})`,
    );
  });

  it('no inference when the given parents are in different folders', async () => {
    const parents = [`${P}/root.${ROOT}.qcow2`, `i-2-10-VM/2025.01.02.00.00.00/datadisk.${DATA}.qcow2`];
    expect(await code(matchParents(disks, parents, async () => true))).toMatch(
      /^INVALID_ARGUMENT: PARENT_PATHS list shorter than DISK_PATHS — missing parent for disk index 2 /,
    );
  });

  it("a parent of a volume the VM does not have (a longer list, or another VM's file) is refused", async () => {
    const other = '00000000-0000-4000-8000-000000000000';
    expect(await code(matchParents(disks.slice(0, 1), [`${P}/root.${ROOT}.qcow2`, `${P}/datadisk.${DATA}.qcow2`], none))).toBe(
      `INVALID_ARGUMENT: Parent paths do not match the VM's disks: no disk with volume ${DATA} (disks: ${ROOT})`,
    );
    expect(await code(matchParents(disks.slice(0, 1), [`${P}/root.${other}.qcow2`], none))).toMatch(
      new RegExp(`no disk with volume ${other}`),
    );
  });

  it('two parents for one volume, or a parent that is not a backup disk file, are refused', async () => {
    expect(await code(matchParents(disks, [`${P}/root.${ROOT}.qcow2`, `x/y/root.${ROOT}.qcow2`], none))).toBe(
      `INVALID_ARGUMENT: Two parent paths for volume ${ROOT}`,
    );
    expect(await code(matchParents(disks, [`${P}/domain-config.xml`], none))).toMatch(
      /^INVALID_ARGUMENT: Parent path is not a backup disk file/,
    );
  });
});
