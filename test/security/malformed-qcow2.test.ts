// Malformed-input corpus: every damaged image gives a coded Qcow2Error — never a crash,
// a hang or a huge allocation. The corpus is generated from a good image; each file is
// named after the code it must produce.
import { execFileSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import fc from 'fast-check';
import { afterAll, describe, expect, it } from 'vitest';
import { Qcow2Error } from '../../lib/qcow2/errors.js';
import { imageInfo } from '../../lib/qcow2/info.js';
import { ImageChain } from '../../lib/qcow2/view.js';
import { removeTempDirs, tempDir } from '../helpers/tmp.js';

afterAll(removeTempDirs);

const dir = tempDir('q2bad');
const good = join(dir, 'good.qcow2');
execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', good, '4M']);
execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 1 0 64k', '-c', 'write -c -P 2 1M 4k', good], { stdio: 'ignore' });
const bytes = readFileSync(good);
const L1 = Number(bytes.readBigUInt64BE(40));
const RT = Number(bytes.readBigUInt64BE(48));
const L2 = Number(bytes.readBigUInt64BE(L1) & 0x00fffffffffffe00n);

/** Open, map and read the whole image; resolve to the error code (or 'ok'). */
async function exercise(path: string): Promise<string> {
  try {
    await imageInfo(path);
    const c = await ImageChain.open(path);
    try {
      await c.map();
      await c.read(0, c.virtualSize);
    } finally {
      await c.close();
    }
    return 'ok';
  } catch (e) {
    if (e instanceof Qcow2Error) return e.code;
    throw e;
  }
}

type Mutation = (b: Buffer) => Buffer;
const corpus: Array<[string, Mutation]> = [
  ['truncated-header.QCOW2_TRUNCATED', (b) => b.subarray(0, 30)],
  ['truncated-v3-fields.QCOW2_TRUNCATED', (b) => b.subarray(0, 90)],
  ['bad-magic.QCOW2_BAD_MAGIC', (b) => (b.writeUInt32BE(0xdeadbeef, 0), b)],
  ['version-9.QCOW2_UNSUPPORTED_VERSION', (b) => (b.writeUInt32BE(9, 4), b)],
  ['cluster-bits-40.QCOW2_BAD_HEADER', (b) => (b.writeUInt32BE(40, 20), b)],
  ['refcount-order-7.QCOW2_BAD_HEADER', (b) => (b.writeUInt32BE(7, 96), b)],
  ['unknown-incompatible-bit.QCOW2_UNKNOWN_INCOMPATIBLE', (b) => (b.writeBigUInt64BE(1n << 40n, 72), b)],
  ['external-data-file.QCOW2_EXTERNAL_DATA_FILE', (b) => (b.writeBigUInt64BE(1n << 2n, 72), b)],
  ['aes-encrypted.QCOW2_UNSUPPORTED_FEATURE', (b) => (b.writeUInt32BE(1, 32), b)],
  ['absurd-virtual-size.QCOW2_TOO_LARGE', (b) => (b.writeBigUInt64BE(1n << 62n, 24), b)],
  ['size-beyond-l1.QCOW2_CORRUPT', (b) => (b.writeBigUInt64BE(1n << 40n, 24), b)],
  ['absurd-l1-size.QCOW2_TOO_LARGE', (b) => (b.writeUInt32BE(0x7fffffff, 36), b)],
  ['absurd-refcount-table.QCOW2_TOO_LARGE', (b) => (b.writeUInt32BE(0x10000000, 56), b)],
  ['l1-past-eof.QCOW2_CORRUPT', (b) => (b.writeBigUInt64BE(BigInt(b.length + 4096 * 10), 40), b)],
  ['l1-unaligned.QCOW2_CORRUPT', (b) => (b.writeBigUInt64BE(BigInt(L1 + 8), 40), b)],
  ['refcount-table-past-eof.QCOW2_CORRUPT', (b) => (b.writeBigUInt64BE(BigInt(b.length * 4), 48), b)],
  ['l2-past-eof.QCOW2_CORRUPT', (b) => (b.writeBigUInt64BE((1n << 63n) | BigInt(b.length * 8), L1), b)],
  [
    'l2-is-header.QCOW2_CORRUPT',
    (b) => (b.writeBigUInt64BE(1n << 63n, L1), b.writeBigUInt64BE((1n << 63n) | 0n, L1), b.writeBigUInt64BE(0x200n, L1), b),
  ],
  ['l2-is-l1-cycle.QCOW2_CORRUPT', (b) => (b.writeBigUInt64BE((1n << 63n) | BigInt(L1), L1), b)],
  ['l2-is-refcount-table.QCOW2_CORRUPT', (b) => (b.writeBigUInt64BE((1n << 63n) | BigInt(RT), L1), b)],
  ['data-past-eof.QCOW2_CORRUPT', (b) => (b.writeBigUInt64BE((1n << 63n) | BigInt(b.length * 16), L2), b)],
  ['data-unaligned.QCOW2_CORRUPT', (b) => (b.writeBigUInt64BE((1n << 63n) | BigInt(L2 + 512), L2), b)],
  [
    'compressed-garbage.QCOW2_COMPRESSED_DATA',
    (b) => {
      const e = b.readBigUInt64BE(L2 + 256 * 8); // cluster of guest offset 1 MiB
      const x = 62n - BigInt(12 - 8);
      const host = Number(e & ((1n << x) - 1n));
      b.fill(0xff, host, Math.min(b.length, host + 64));
      return b;
    },
  ],
  ['backing-name-too-long.QCOW2_BACKING_NAME', (b) => (b.writeBigUInt64BE(512n, 8), b.writeUInt32BE(5000, 16), b)],
  [
    'extension-overrun.QCOW2_BAD_HEADER',
    (b) => {
      const hl = b.readUInt32BE(100);
      b.writeUInt32BE(0x0badcafe, hl);
      b.writeUInt32BE(0x7fffffff, hl + 4);
      return b;
    },
  ],
];

describe('malformed images give coded errors', () => {
  it('the unmodified image reads fine', async () => {
    expect(await exercise(good)).toBe('ok');
  });
  it.each(corpus)('%s', async (name, mutate) => {
    const p = join(dir, `${name}.qcow2`);
    writeFileSync(p, mutate(Buffer.from(bytes)));
    expect(await exercise(p)).toBe(name.split('.')[1]);
  });
  it('an L2 cycle through two L1 entries is harmless to read and refused for writing', async () => {
    const big = join(dir, 'two-l1.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', big, '8M']);
    execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 1 0 4k', big], { stdio: 'ignore' });
    const b = readFileSync(big);
    const l1 = Number(b.readBigUInt64BE(40));
    b.writeBigUInt64BE(b.readBigUInt64BE(l1), l1 + 8); // L1[1] = L1[0]
    writeFileSync(big, b);
    expect(await exercise(big)).toBe('ok');
    const top = join(dir, 'two-l1-top.qcow2');
    const mid = join(dir, 'two-l1-mid.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', '-b', 'two-l1.qcow2', '-F', 'qcow2', mid]);
    execFileSync('cp', [big, join(dir, 'two-l1-copy.qcow2')]);
    execFileSync('qemu-img', ['rebase', '-u', '-b', 'two-l1.qcow2', '-F', 'qcow2', mid]);
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'two-l1-copy.qcow2', '-F', 'qcow2', top]);
    const { nativeRebase } = await import('../../lib/qcow2/rebase.js');
    // The damaged image as a rebase target is refused before anything is written.
    const { copyFileSync } = await import('node:fs');
    const tgt = join(dir, 'two-l1-target.qcow2');
    copyFileSync(big, tgt);
    execFileSync('qemu-img', ['rebase', '-u', '-b', 'two-l1-mid.qcow2', '-F', 'qcow2', tgt]);
    const before = readFileSync(tgt);
    await expect(nativeRebase({ target: tgt, newBacking: big, newBackingName: 'two-l1.qcow2' })).rejects.toMatchObject({
      code: 'QCOW2_CORRUPT',
    });
    expect(readFileSync(tgt).equals(before)).toBe(true);
  });
  it('random byte damage to metadata never escapes as anything but a Qcow2Error', async () => {
    const meta = [0, L1, L2, RT];
    let i = 0;
    await fc.assert(
      fc.asyncProperty(
        fc.array(fc.tuple(fc.constantFrom(...meta), fc.nat(511), fc.nat(255)), { minLength: 1, maxLength: 6 }),
        async (edits) => {
          const b = Buffer.from(bytes);
          for (const [base, off, v] of edits) b[base + off] = v;
          const p = join(dir, `fuzz-${i++}.qcow2`);
          writeFileSync(p, b);
          const code = await exercise(p); // throws (fails the test) on a non-Qcow2Error
          expect(typeof code).toBe('string');
        },
      ),
      { numRuns: Number(process.env.NASBACKUP_QCOW2_RUNS ?? 150) },
    );
  });
});
