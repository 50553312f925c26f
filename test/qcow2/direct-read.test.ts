// NodeBlockFile's direct reads (restore reads its chain with them): whole pages into page-aligned
// memory go past the page cache on a local disk's file system (a loop-mounted ext4 here), all
// else through it; tmpfs and a refusing kernel fall back to the page cache. The bytes are the
// file's either way. Needs root (mount, losetup), as the CI runs.
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { closeSync, constants, mkdirSync, openSync, readSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { markPageAligned, NodeBlockFile, pageAlignedBuffers } from '../../lib/qcow2/io.js';
import { removeTempDirs, tempDir } from '../helpers/tmp.js';

const MiB = 1 << 20;
const root = tempDir('direct-read');
const ext4 = join(root, 'ext4');
const tmpfs = join(root, 'tmpfs');
let loop = '';
// Off the page grid at its end: the last read is short.
const content = randomBytes(4 * MiB + 1000);

/** Pages of `file` in the page cache (util-linux fincore). */
const cachedPages = (file: string): number =>
  Number(execFileSync('fincore', ['--bytes', '--noheadings', '--output', 'PAGES', file], { encoding: 'utf8' }).trim());
/** Drop `file`'s pages from the page cache (dd's nocache flag: posix_fadvise DONTNEED over the whole file). */
const dropCache = (file: string): void => void execFileSync('dd', [`if=${file}`, 'iflag=nocache', 'count=0', 'status=none']);

/** `f` reads no page direct: a page-aligned MiB read at `at` comes through the page cache, equal to the file; `f` is closed. */
async function expectThroughCache(f: NodeBlockFile, at: number): Promise<void> {
  try {
    expect(f.readsDirect).toBe(false);
    const [buf] = pageAlignedBuffers(1, MiB) as [Buffer];
    expect(await f.read(buf, 0, MiB, at)).toBe(MiB);
    expect(buf.equals(content.subarray(at, at + MiB))).toBe(true);
    expect(f.bytesRead).toEqual({ direct: 0, buffered: MiB });
  } finally {
    await f.close();
  }
}

beforeAll(() => {
  const img = join(root, 'ext4.img');
  execFileSync('truncate', ['-s', '64M', img]);
  execFileSync('mkfs.ext4', ['-q', '-F', img]);
  loop = execFileSync('losetup', ['-f', '--show', img], { encoding: 'utf8' }).trim();
  mkdirSync(ext4);
  execFileSync('mount', [loop, ext4]);
  mkdirSync(tmpfs);
  execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=16m', 'tmpfs', tmpfs]);
  for (const d of [ext4, tmpfs]) writeFileSync(join(d, 'f.bin'), content);
  execFileSync('sync');
});

afterAll(() => {
  for (const d of [ext4, tmpfs]) execFileSync('umount', [d], { stdio: 'ignore' });
  if (loop) execFileSync('losetup', ['-d', loop]);
  removeTempDirs();
});

describe('NodeBlockFile direct reads', () => {
  it('on ext4: whole pages into page-aligned memory are read past the page cache, the rest through it, all equal to the file', async () => {
    const path = join(ext4, 'f.bin');
    dropCache(path);
    const f = await NodeBlockFile.open(path, false, { directReads: true });
    try {
      expect(f.readsDirect).toBe(true);
      const [buf] = pageAlignedBuffers(1, 2 * MiB) as [Buffer];
      expect(await f.read(buf, 0, 2 * MiB, MiB)).toBe(2 * MiB);
      expect(buf.equals(content.subarray(MiB, 3 * MiB))).toBe(true);
      expect(f.bytesRead).toEqual({ direct: 2 * MiB, buffered: 0 });
      // Nothing of it went through the page cache.
      expect(cachedPages(path)).toBe(0);

      // Through the cache: memory not known to be page-aligned, a file offset or a length off the page grid.
      const plain = Buffer.alloc(8192);
      expect(await f.read(plain, 0, 8192, 4096)).toBe(8192);
      expect(plain.equals(content.subarray(4096, 12288))).toBe(true);
      expect(await f.read(buf, 0, 4096, 512)).toBe(4096);
      expect(buf.subarray(0, 4096).equals(content.subarray(512, 4608))).toBe(true);
      expect(await f.read(buf, 4096, 1000, 8192)).toBe(1000);
      expect(buf.subarray(4096, 5096).equals(content.subarray(8192, 9192))).toBe(true);
      expect(f.bytesRead).toEqual({ direct: 2 * MiB, buffered: 8192 + 4096 + 1000 });

      // The last page: short at the end of the file, then nothing more.
      buf.fill(0xee, 0, 8192);
      expect(await f.read(buf, 0, 8192, 4 * MiB)).toBe(1000);
      expect(buf.subarray(0, 1000).equals(content.subarray(4 * MiB))).toBe(true);
      expect(f.bytesRead.direct).toBe(2 * MiB + 1000);
    } finally {
      await f.close();
    }
    // Not asked for: no direct reads at all.
    await expectThroughCache(await NodeBlockFile.open(path, false), 0);
  });

  it('on tmpfs (not a local disk file system): everything through the page cache', async () => {
    await expectThroughCache(await NodeBlockFile.open(join(tmpfs, 'f.bin'), false, { directReads: true }), MiB);
  });

  it('a writable file never reads direct', async () => {
    const f = await NodeBlockFile.open(join(ext4, 'f.bin'), true, { directReads: true });
    try {
      expect(f.readsDirect).toBe(false);
    } finally {
      await f.close();
    }
  });

  it('the kernel refusing a direct read (EINVAL): that read and every later one go through the page cache', async () => {
    const path = join(ext4, 'f.bin');
    // Memory from malloc starts 16 bytes past a page (glibc's header): marked page-aligned by
    // mistake, the kernel refuses O_DIRECT into it. Checked first, so the test has teeth.
    const wrong = Buffer.from(new ArrayBuffer(2 * MiB));
    const fd = openSync(path, constants.O_RDONLY | constants.O_DIRECT);
    try {
      expect(() => readSync(fd, wrong, 0, 4096, 0)).toThrow(/EINVAL/);
    } finally {
      closeSync(fd);
    }
    markPageAligned(wrong.buffer);
    const f = await NodeBlockFile.open(path, false, { directReads: true });
    try {
      expect(f.readsDirect).toBe(true);
      expect(await f.read(wrong, 0, MiB, 0)).toBe(MiB);
      expect(wrong.subarray(0, MiB).equals(content.subarray(0, MiB))).toBe(true);
      expect(f.readsDirect).toBe(false);
      // A truly aligned buffer now goes through the cache too.
      const [buf] = pageAlignedBuffers(1, MiB) as [Buffer];
      expect(await f.read(buf, 0, MiB, MiB)).toBe(MiB);
      expect(buf.equals(content.subarray(MiB, 2 * MiB))).toBe(true);
      expect(f.bytesRead).toEqual({ direct: 0, buffered: 2 * MiB });
    } finally {
      await f.close();
    }
  });
});
