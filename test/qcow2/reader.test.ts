// Differential tests of the native reader against qemu-img (the oracle) on random chains:
// info, map (qemu-img map --output=json) and guest content (qemu-img convert -O raw).
import { closeSync, openSync, readdirSync, readFileSync, readlinkSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import fc from 'fast-check';
import { afterAll, describe, expect, it } from 'vitest';
import { decodeHeader, encodeHeader } from '../../lib/qcow2/header.js';
import { imageInfo } from '../../lib/qcow2/info.js';
import { nativeRebase } from '../../lib/qcow2/rebase.js';
import { Qcow2Image } from '../../lib/qcow2/image.js';
import { ImageChain, layerExtents } from '../../lib/qcow2/view.js';
import { getRefcount, setRefcount } from '../../lib/qcow2/refcount.js';
import { removeTempDirs, tempDir } from '../helpers/tmp.js';
import { buildChain, chainArb, normaliseMap, numRuns, qemuInfo, qemuMap, rawContent } from './gen.js';
import { execFileSync } from 'node:child_process';

afterAll(removeTempDirs);

const pickInfo = (i: Record<string, unknown>): Record<string, unknown> => {
  const fs = (i['format-specific'] as { data: Record<string, unknown> }).data;
  return {
    'virtual-size': i['virtual-size'],
    'cluster-size': i['cluster-size'],
    'backing-filename': i['backing-filename'],
    'backing-filename-format': i['backing-filename-format'],
    'dirty-flag': i['dirty-flag'],
    compat: fs.compat,
    'compression-type': fs['compression-type'],
    'lazy-refcounts': fs['lazy-refcounts'],
    'refcount-bits': fs['refcount-bits'],
    corrupt: fs.corrupt,
    'extended-l2': fs['extended-l2'],
    bitmaps: fs.bitmaps,
  };
};

describe('reader vs qemu-img on random chains', () => {
  const dir = tempDir('q2read');
  let n = 0;
  it('info, map and content agree (v2/v3, 512 B–2 MiB clusters, extended L2, zero, compressed, discards, short backings)', async () => {
    await fc.assert(
      fc.asyncProperty(chainArb({ minLayers: 1, maxLayers: 3 }), async (spec) => {
        const d = join(dir, String(n++));
        execFileSync('mkdir', ['-p', d]);
        const paths = buildChain(d, spec);
        const top = paths.at(-1)!;
        for (const p of paths) expect(pickInfo((await imageInfo(p)) as unknown as Record<string, unknown>)).toEqual(pickInfo(qemuInfo(p)));
        const chain = await ImageChain.open(top);
        try {
          expect(normaliseMap(await chain.map())).toEqual(normaliseMap(qemuMap(top)));
          const raw = rawContent(top, d);
          const ours = await chain.read(0, chain.virtualSize);
          expect(ours.equals(raw)).toBe(true);
          // Random unaligned ranges, including past the end.
          for (let k = 0; k < 4; k++) {
            const off = Math.floor(Math.random() * chain.virtualSize);
            const len = 1 + Math.floor(Math.random() * 200_000);
            const got = await chain.read(off, len);
            const want = Buffer.alloc(len);
            raw.copy(want, 0, off, Math.min(off + len, raw.length));
            expect(got.equals(want)).toBe(true);
          }
        } finally {
          await chain.close();
        }
      }),
      { numRuns: numRuns(20) },
    );
  });

  it('per-layer map covers the disk and matches qemu-img map of a lone layer', async () => {
    const d = tempDir('q2layer');
    const [p] = buildChain(d, {
      layers: [
        {
          clusterBits: 16,
          v2: false,
          extL2: true,
          size: 3 * 1024 * 1024 + 512,
          ops: ['write -P 1 0 70000', 'write -z 200000 4096', 'write -c -P 3 1048576 65536'],
        },
      ],
    });
    const img = await Qcow2Image.open(p!);
    try {
      const ext = await layerExtents(img);
      expect(ext.reduce((a, e) => a + e.length, 0)).toBe(img.virtualSize);
      expect(ext.map((e) => e.kind).filter((k, i, a) => k !== a[i - 1])).toEqual([
        'data',
        'unallocated',
        'zero',
        'unallocated',
        'compressed',
        'unallocated',
      ]);
    } finally {
      await img.close();
    }
  });

  it('bitmaps and lazy refcounts are reported like qemu-img info', async () => {
    const d = tempDir('q2bm');
    const p = join(d, 'bm.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'lazy_refcounts=on', p, '1M']);
    execFileSync('qemu-img', ['bitmap', '--add', '-g', '131072', p, 'b1']);
    execFileSync('qemu-img', ['bitmap', '--add', '--disable', p, 'second']);
    expect(pickInfo((await imageInfo(p)) as unknown as Record<string, unknown>)).toEqual(pickInfo(qemuInfo(p)));
  });
});

describe('ImageChain.open with the next layers opening ahead', () => {
  /** Files inside `dir` this process holds open now. */
  const openInside = (dir: string): string[] =>
    readdirSync('/proc/self/fd').flatMap((fd) => {
      try {
        const t = readlinkSync(`/proc/self/fd/${fd}`);
        return t.startsWith(`${dir}/`) ? [t] : [];
      } catch {
        return []; // closed meanwhile
      }
    });
  /** An L1 table past the end of the file: the header reads, the image does not open. */
  const breakL1 = (file: string): void => {
    const b = Buffer.alloc(8);
    b.writeBigUInt64BE(1n << 40n);
    const fd = openSync(file, 'r+');
    try {
      writeSync(fd, b, 0, 8, 40);
    } finally {
      closeSync(fd);
    }
  };

  it('the first layer that fails to open is the error, and every image opened ahead is closed', async () => {
    const d = tempDir('chain-open');
    const paths: string[] = [];
    for (let i = 0; i < 9; i++) {
      const f = join(d, `l${i}.qcow2`);
      execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', ...(i ? ['-b', `l${i - 1}.qcow2`, '-F', 'qcow2'] : []), f, '16M']);
      execFileSync('qemu-io', ['-f', 'qcow2', '-c', `write -P ${i + 1} ${i * 65536} 64k`, f], { stdio: 'ignore' });
      paths.unshift(f);
    }
    const whole = await ImageChain.open(paths[0]!);
    try {
      expect(whole.images.map((i) => i.path)).toEqual(paths);
      expect((await whole.read(0, 9 * 65536)).equals(rawContent(paths[0]!, d).subarray(0, 9 * 65536))).toBe(true);
    } finally {
      await whole.close();
    }
    expect(openInside(d)).toEqual([]);
    breakL1(paths[6]!);
    breakL1(paths[2]!);
    const err = await ImageChain.open(paths[0]!).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: 'QCOW2_CORRUPT', path: paths[2] });
    // An image still opening when the error came would hold its file a moment later: wait past that.
    await new Promise((r) => setTimeout(r, 200));
    expect(openInside(d)).toEqual([]);
  });
});

describe('zstd-compressed clusters', () => {
  it('decoded where Node has zstd, else refused with a code (reads and the native rebase alike)', async () => {
    const d = tempDir('q2zstd');
    const base = join(d, 'base.qcow2');
    const mid = join(d, 'mid.qcow2');
    const top = join(d, 'top.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', base, '1M']);
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'compression_type=zstd', '-b', 'base.qcow2', '-F', 'qcow2', mid]);
    execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'write -c -P 5 0 64k', '-c', 'write -P 6 128k 64k', mid]);
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', top]);
    const want = rawContent(top, d);
    const chain = await ImageChain.open(top);
    try {
      if (Qcow2Image.zstdAvailable()) {
        expect((await chain.read(0, 1 << 20)).equals(want)).toBe(true);
      } else {
        await expect(chain.read(0, 65536)).rejects.toMatchObject({ code: 'QCOW2_UNSUPPORTED_FEATURE' });
        expect((await chain.read(65536, 3 * 65536)).equals(want.subarray(65536, 4 * 65536))).toBe(true); // the rest reads
      }
    } finally {
      await chain.close();
    }
    const before = readFileSync(top);
    if (Qcow2Image.zstdAvailable()) {
      await nativeRebase({ target: top, newBacking: base, newBackingName: 'base.qcow2' });
      expect(rawContent(top, d).equals(want)).toBe(true);
    } else {
      await expect(nativeRebase({ target: top, newBacking: base, newBackingName: 'base.qcow2' })).rejects.toMatchObject({
        code: 'QCOW2_UNSUPPORTED_FEATURE',
      });
      expect(readFileSync(top).equals(before)).toBe(true);
    }
  });
});

describe('header codec', () => {
  it('encode(decode(h)) reproduces QEMU headers byte for byte, unknown extensions and fields included', () => {
    const d = tempDir('q2hdr');
    for (const o of ['compat=0.10', 'compat=1.1', 'compression_type=zstd', 'extended_l2=on', 'cluster_size=512']) {
      const base = join(d, `b-${o}.qcow2`);
      const p = join(d, `t-${o}.qcow2`);
      execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', o, base, '1M']);
      execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', o, '-b', base, '-F', 'qcow2', p]);
      const c0 = readFileSync(p).subarray(0, 65536);
      const h = decodeHeader(c0);
      const enc = encodeHeader(h);
      expect(enc.bytes.equals(c0.subarray(0, enc.bytes.length))).toBe(true);
    }
    // An unknown extension and an unknown additional header field survive a rewrite.
    const h = decodeHeader(readFileSync(join(d, 't-compat=1.1.qcow2')).subarray(0, 65536));
    h.headerLength = 120;
    h.headerTail = Buffer.concat([h.headerTail, Buffer.alloc(120 - 104 - h.headerTail.length, 0xab)]);
    h.extensions.unshift({ type: 0x12345678, data: Buffer.from('opaque!') });
    const again = decodeHeader(Buffer.concat([encodeHeader(h).bytes, Buffer.alloc(512)]));
    expect(again.extensions[0]).toEqual({ type: 0x12345678, data: Buffer.from('opaque!') });
    expect(again.headerTail.subarray(8).every((b) => b === 0xab)).toBe(true);
    expect(again.backingFile).toBe(h.backingFile);
    expect(again.backingFormat).toBe('qcow2');
  });

  it('refcount entries of every width round-trip', () => {
    fc.assert(
      fc.property(fc.integer({ min: 0, max: 6 }), fc.nat(1000), fc.bigInt({ min: 0n, max: (1n << 64n) - 1n }), (order, idx, v) => {
        const b = Buffer.alloc(65536);
        const val = v & ((1n << BigInt(1 << order)) - 1n);
        setRefcount(b, idx, order, val);
        expect(getRefcount(b, idx, order)).toBe(val);
        if (idx > 0) expect(getRefcount(b, idx - 1, order)).toBe(0n);
        expect(getRefcount(b, idx + 1, order)).toBe(0n);
      }),
    );
  });

  it('reads refcounts of every width like qemu-img check counts them', async () => {
    const d = tempDir('q2rc');
    for (const bits of [1, 2, 4, 8, 16, 32, 64]) {
      const p = join(d, `rc${bits}.qcow2`);
      execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', `refcount_bits=${bits},cluster_size=4096`, p, '1M']);
      execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 1 0 16k', p], { stdio: 'ignore' });
      const img = await Qcow2Image.open(p);
      try {
        const clusters = Math.ceil(img.fileSize / img.clusterSize);
        let used = 0;
        for (let k = 0; k < clusters + 4; k++) {
          const r = await img.refcount(k);
          expect(r <= 1n).toBe(true);
          used += Number(r);
        }
        expect(used).toBe(clusters);
      } finally {
        await img.close();
      }
    }
  });
});
