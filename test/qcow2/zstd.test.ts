// The zstd frame scanner: finds where a compressed cluster's frame ends inside its sectors,
// and answers null (never throws, never reads past the buffer) for anything else.
import { execFileSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import fc from 'fast-check';
import { afterAll, describe, expect, it } from 'vitest';
import { Qcow2Image } from '../../lib/qcow2/image.js';
import { zstdFrameLength } from '../../lib/qcow2/zstd.js';
import { removeTempDirs, tempDir } from '../helpers/tmp.js';

afterAll(removeTempDirs);

/** The stored bytes (whole sectors) of each compressed cluster QEMU wrote with zstd. */
async function qemuZstdClusters(): Promise<Buffer[]> {
  const d = tempDir('q2zstdf');
  const p = join(d, 'z.qcow2');
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'compression_type=zstd,cluster_size=65536', p, '1M']);
  // A constant pattern (RLE blocks) and text-like bytes from a small alphabet (Huffman-coded blocks).
  execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'write -c -P 5 0 64k', p]);
  const text = Buffer.alloc(65536);
  let x = 12345;
  for (let i = 0; i < text.length; i++) {
    x = (x * 1103515245 + 12345) >>> 0;
    text[i] = 97 + ((x >>> 16) % 16);
  }
  const src = join(d, 'text.raw');
  writeFileSync(src, text);
  execFileSync('qemu-io', ['-f', 'qcow2', '-c', `write -c -s ${src} 65536 64k`, p]);
  const img = await Qcow2Image.open(p);
  const file = readFileSync(p);
  const out: Buffer[] = [];
  try {
    for (let c = 0; c < 2; c++) {
      const e = await img.entry(c);
      expect(e.type).toBe('compressed');
      if (e.type === 'compressed') out.push(file.subarray(e.host, e.host + e.size));
    }
  } finally {
    await img.close();
  }
  return out;
}

describe('zstdFrameLength', () => {
  it('ends the frame inside the stored sectors of clusters QEMU compressed', async () => {
    for (const stored of await qemuZstdClusters()) {
      const n = zstdFrameLength(stored);
      expect(n).not.toBeNull();
      expect(n!).toBeGreaterThan(8);
      expect(n!).toBeLessThanOrEqual(stored.length);
      // Cut short anywhere inside the frame: not a complete frame.
      for (const cut of [0, 4, 5, 6, n! - 1]) expect(zstdFrameLength(stored.subarray(0, cut))).toBeNull();
      // What follows the frame does not change where it ends.
      expect(zstdFrameLength(Buffer.concat([stored.subarray(0, n!), Buffer.alloc(700, 0xff)]))).toBe(n);
    }
  });

  it('rejects a wrong magic, the reserved header bit and the reserved block type', () => {
    const frame = Buffer.from([0x28, 0xb5, 0x2f, 0xfd, 0x20, 0x05, 0x09, 0x00, 0x00, 0x61]); // single segment, 1-byte content size, one last raw block of 1 byte
    expect(zstdFrameLength(Buffer.concat([Buffer.from([0, 0, 0, 0]), frame.subarray(4)]))).toBeNull();
    const reserved = Buffer.from(frame);
    reserved[4] = reserved[4]! | 0x08;
    expect(zstdFrameLength(reserved)).toBeNull();
    const badBlock = Buffer.from(frame);
    badBlock[6] = 0x07; // last block, type 3
    expect(zstdFrameLength(badBlock)).toBeNull();
  });

  it('never throws and never points past the buffer, whatever the bytes', () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 300 }), fc.boolean(), (bytes, magic) => {
        const b = Buffer.from(bytes);
        if (magic && b.length >= 4) b.writeUInt32LE(0xfd2fb528, 0);
        const n = zstdFrameLength(b);
        expect(n === null || (n > 0 && n <= b.length)).toBe(true);
      }),
      { numRuns: 2000 },
    );
  });
});
