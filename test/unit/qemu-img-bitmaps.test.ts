// parseImageBitmaps on what the installed qemu-img really prints for each kind of image.
import { execFileSync } from 'node:child_process';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { parseImageBitmaps } from '../../lib/clients/qemu-img.js';
import { removeTempDirs, tempDir } from '../helpers/tmp.js';

afterAll(removeTempDirs);

const info = (path: string): string => execFileSync('qemu-img', ['info', '--output=json', path], { encoding: 'utf8' });

describe('parseImageBitmaps', () => {
  it('qcow2 with an enabled and a disabled bitmap: names and flags', () => {
    const f = join(tempDir('qi-bitmaps'), 'a.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', f, '1M']);
    execFileSync('qemu-img', ['bitmap', '--add', f, 'on']);
    execFileSync('qemu-img', ['bitmap', '--add', '--disable', f, 'off']);
    expect(parseImageBitmaps(info(f))).toEqual([
      { name: 'on', flags: ['auto'] },
      { name: 'off', flags: [] },
    ]);
  });

  it('qcow2 without bitmaps, and a raw image: none', () => {
    const dir = tempDir('qi-none');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', join(dir, 'b.qcow2'), '1M']);
    execFileSync('qemu-img', ['create', '-q', '-f', 'raw', join(dir, 'c.raw'), '1M']);
    expect(parseImageBitmaps(info(join(dir, 'b.qcow2')))).toEqual([]);
    expect(parseImageBitmaps(info(join(dir, 'c.raw')))).toEqual([]);
  });

  it('not JSON: throws (the caller then trusts no bitmap)', () => {
    expect(() => parseImageBitmaps('qemu-img: Could not open')).toThrow();
  });
});
