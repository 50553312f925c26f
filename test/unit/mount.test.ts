import { describe, expect, it } from 'vitest';
import { effectiveMountOptions, mountArgs, mountPointsFromMountinfo, unescapeMountPath } from '../../lib/clients/mount.js';
import { makeMountPoint } from '../../lib/nas/session.js';
import { rmdirSync, statSync } from 'node:fs';
import { afterAll } from 'vitest';
import { removeTempDirs, tempDir } from '../helpers/tmp.js';

afterAll(removeTempDirs);

describe('mount command line', () => {
  it('passes -o only when there are options', () => {
    expect(mountArgs({ type: 'nfs', source: 'h:/e', target: '/tmp/csbackup.abcde', options: '' })).toEqual(['-t', 'nfs', 'h:/e', '/tmp/csbackup.abcde']);
    expect(mountArgs({ type: 'nfs', source: 'h:/e', target: '/m', options: 'vers=4.1,timeo=600' })).toEqual(['-t', 'nfs', 'h:/e', '/m', '-o', 'vers=4.1,timeo=600']);
  });
  it('adds nobrl for cifs, never as ",nobrl"', () => {
    expect(effectiveMountOptions('cifs', '')).toBe('nobrl');
    expect(effectiveMountOptions('cifs', 'username=u,vers=3.0')).toBe('username=u,vers=3.0,nobrl');
    expect(effectiveMountOptions('cifs', 'nobrl,vers=3.0')).toBe('nobrl,vers=3.0');
    expect(effectiveMountOptions('nfs', '')).toBe('');
    expect(effectiveMountOptions('nfs', 'vers=3')).toBe('vers=3');
  });
});

describe('mountinfo', () => {
  it('decodes octal escapes', () => {
    expect(unescapeMountPath('/tmp/a\\040b\\011c')).toBe('/tmp/a b\tc');
    const text = '36 35 98:0 / /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw\n';
    expect(mountPointsFromMountinfo(text)).toEqual(['/mnt/with space']);
  });
});

describe('mount point', () => {
  it('is csbackup. plus five characters, mode 0700, fresh each time', async () => {
    const d = tempDir('mp');
    const a = await makeMountPoint(d);
    const b = await makeMountPoint(d);
    expect(a).toMatch(new RegExp(`^${d}/csbackup\\.[A-Za-z0-9]{5}$`));
    expect(a).not.toBe(b);
    expect(statSync(a).mode & 0o777).toBe(0o700);
    rmdirSync(a);
    rmdirSync(b);
  });
});
