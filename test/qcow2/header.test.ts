import { readFileSync, writeFileSync, symlinkSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { readHeader, decodeHeader } from '../../lib/qcow2/header.js';
import { readChain, indexInChain, isFollowableBackingName } from '../../lib/qcow2/chain.js';
import { makeImage, info } from '../helpers/qemu.js';
import { removeTempDirs, tempDir } from '../helpers/tmp.js';

afterAll(removeTempDirs);

const dir = tempDir('qcow2');
const codeOf = async (p: Promise<unknown>): Promise<string> =>
  p.then(
    () => 'ok',
    (e: { code: string }) => e.code,
  );

describe('header decode agrees with qemu-img info', () => {
  it.each([
    ['v3 default', ['-o', 'compat=1.1']],
    ['v2', ['-o', 'compat=0.10']],
    ['512 B clusters', ['-o', 'cluster_size=512']],
    ['2 MiB clusters', ['-o', 'cluster_size=2M']],
    ['zstd', ['-o', 'compression_type=zstd']],
  ])('%s', async (name, extra) => {
    const base = join(dir, `${name.replace(/\W/g, '_')}-base.qcow2`);
    const top = join(dir, `${name.replace(/\W/g, '_')}-top.qcow2`);
    makeImage(base, { size: 3 * 1024 * 1024 + 512, extra });
    makeImage(top, { backing: base.split('/').at(-1)!, extra });
    const h = await readHeader(top);
    const qi = info(top);
    expect(h.clusterSize).toBe(qi['cluster-size']);
    expect(Number(h.size)).toBe(qi['virtual-size']);
    expect(h.backingFile).toBe(qi['backing-filename']);
    expect(h.backingFormat).toBe(qi['backing-filename-format']);
    const compat = (qi['format-specific'] as { data: { compat: string } }).data.compat;
    expect(h.version).toBe(compat === '0.10' ? 2 : 3);
    expect((await readHeader(base)).backingFile).toBeNull();
  });
});

describe('malformed headers give coded errors', () => {
  const good = join(dir, 'good.qcow2');
  makeImage(good, { size: 1 << 20 });
  const bytes = readFileSync(good).subarray(0, 65536);
  const variant = (name: string, mutate: (b: Buffer) => Buffer): string => {
    const p = join(dir, name);
    writeFileSync(p, mutate(Buffer.from(bytes)));
    return p;
  };
  it.each([
    ['bad-magic', (b: Buffer) => (b.writeUInt32BE(0x12345678, 0), b), 'QCOW2_BAD_MAGIC'],
    ['version-9', (b: Buffer) => (b.writeUInt32BE(9, 4), b), 'QCOW2_UNSUPPORTED_VERSION'],
    ['cluster-bits-30', (b: Buffer) => (b.writeUInt32BE(30, 20), b), 'QCOW2_BAD_HEADER'],
    ['header-length-odd', (b: Buffer) => (b.writeUInt32BE(107, 100), b), 'QCOW2_BAD_HEADER'],
    ['truncated-20', (b: Buffer) => b.subarray(0, 20), 'QCOW2_TRUNCATED'],
    ['truncated-80', (b: Buffer) => b.subarray(0, 80), 'QCOW2_TRUNCATED'],
    ['empty', () => Buffer.alloc(0), 'QCOW2_BAD_MAGIC'],
    ['backing-name-2000', (b: Buffer) => (b.writeBigUInt64BE(512n, 8), b.writeUInt32BE(2000, 16), b), 'QCOW2_BACKING_NAME'],
    ['backing-name-outside-cluster', (b: Buffer) => (b.writeBigUInt64BE(65530n, 8), b.writeUInt32BE(100, 16), b), 'QCOW2_BACKING_NAME'],
    [
      'extension-overrun',
      (b: Buffer) => (b.writeUInt32BE(0x1234, b.readUInt32BE(100)), b.writeUInt32BE(0xffffff, b.readUInt32BE(100) + 4), b),
      'QCOW2_BAD_HEADER',
    ],
  ])('%s -> %s', async (name, mutate, code) => {
    expect(await codeOf(readHeader(variant(name, mutate)))).toBe(code);
  });
  it('a raw file is not qcow2', async () => {
    const p = join(dir, 'raw.img');
    writeFileSync(p, Buffer.alloc(4096));
    expect(await codeOf(readHeader(p))).toBe('QCOW2_BAD_MAGIC');
  });
  it('decodeHeader never throws anything but Qcow2Error on random bytes', () => {
    for (let i = 0; i < 200; i++) {
      const b = Buffer.from(bytes.subarray(0, 512));
      for (let k = 0; k < 8; k++) b[Math.floor(Math.random() * 128)] = Math.floor(Math.random() * 256);
      try {
        decodeHeader(b);
      } catch (e) {
        expect((e as Error).name).toBe('Qcow2Error');
      }
    }
  });
});

describe('chains', () => {
  const c = tempDir('chain');
  makeImage(join(c, 'a/full.qcow2'), { size: 1 << 20 });
  makeImage(join(c, 'b/inc1.qcow2'), { backing: '../a/full.qcow2' });
  makeImage(join(c, 'c/inc2.qcow2'), { backing: '../b/inc1.qcow2' });

  it('follows relative backing names from each file’s directory', async () => {
    const chain = await readChain(join(c, 'c/inc2.qcow2'));
    expect(chain.layers.map((l) => l.path)).toEqual([join(c, 'c/inc2.qcow2'), join(c, 'b/inc1.qcow2'), join(c, 'a/full.qcow2')]);
    expect(await indexInChain(chain, join(c, 'a/full.qcow2'))).toBe(2);
    expect(await indexInChain(chain, join(c, 'b/inc1.qcow2'))).toBe(1);
    expect(await indexInChain(chain, join(c, 'c/inc2.qcow2'))).toBe(-1);
  });
  it('names the missing backing file', async () => {
    makeImage(join(c, 'd/orphan.qcow2'), { backing: '../gone/full.qcow2', size: 1 << 20, extra: ['-u'] });
    await expect(readChain(join(c, 'd/orphan.qcow2'))).rejects.toMatchObject({
      code: 'QCOW2_CHAIN_MISSING',
      path: join(c, 'gone/full.qcow2'),
    });
  });
  it('detects a cycle', async () => {
    makeImage(join(c, 'e/x.qcow2'), { size: 1 << 20 });
    makeImage(join(c, 'e/y.qcow2'), { backing: 'x.qcow2' });
    // Point x back at y with an unsafe rebase.
    const { execFileSync } = await import('node:child_process');
    execFileSync('qemu-img', ['rebase', '-u', '-b', 'y.qcow2', '-F', 'qcow2', join(c, 'e/x.qcow2')]);
    await expect(readChain(join(c, 'e/y.qcow2'))).rejects.toMatchObject({ code: 'QCOW2_CHAIN_CYCLE' });
  });
  it('does not follow protocol or json: names', () => {
    expect(isFollowableBackingName('nbd://h/x')).toBe(false);
    expect(isFollowableBackingName('json:{"file":{}}')).toBe(false);
    expect(isFollowableBackingName('../a/b.qcow2')).toBe(true);
    expect(isFollowableBackingName('/abs/b.qcow2')).toBe(true);
  });
  it('a symlinked file is the same layer', async () => {
    symlinkSync(join(c, 'a/full.qcow2'), join(c, 'link.qcow2'));
    const chain = await readChain(join(c, 'c/inc2.qcow2'));
    expect(await indexInChain(chain, join(c, 'link.qcow2'))).toBe(2);
  });
});
