// copyImage fed a stream of ranges (the native rebase hands each crash-safe batch's ranges on as
// it walks) and lent buffers reused call after call.
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { copyImage, normalizeRanges, type CopyBufferPool, type CopyRun, type CopySource } from '../../lib/qcow2/index.js';
import { memorySource, numRuns } from './gen.js';

describe('copyImage: streamed ranges, lent buffers', () => {
  it('streamed ranges: the same runs as the array, consumed as the copy goes, out-of-order refused', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.array(fc.tuple(fc.nat(63), fc.integer({ min: 1, max: 6 })), { minLength: 1, maxLength: 12 }),
        fc.boolean(),
        async (pieces, small) => {
          // 64 granules of 64 KiB, some zero: ranges in 4 KiB steps (widened to the unit).
          const size = 64 * 65536;
          const content = Buffer.alloc(size);
          for (let g = 0; g < 64; g += 3) content.fill(g + 1, g * 65536, g * 65536 + 65536);
          const ranges = normalizeRanges(
            pieces.map(([g, n]) => ({ offset: g * 65536 + 4096, length: n * 40000 })),
            1,
            size,
          );
          const opts = { unit: 65536, requestBytes: small ? 65536 : 4 << 20 };
          const seenA: CopyRun[] = [];
          const seenB: CopyRun[] = [];
          const strip = (r: CopyRun): CopyRun => ({ offset: r.offset, length: r.length, kind: r.kind });
          const a = await copyImage(memorySource(content, 65536), null, { ...opts, ranges, onRun: (r) => void seenA.push(strip(r)) });
          let pulled = 0;
          const stream = (async function* () {
            for (const r of ranges) {
              pulled++;
              yield r;
            }
          })();
          const b = await copyImage(memorySource(content, 65536), null, {
            ...opts,
            ranges: stream,
            onRun: (r) => void seenB.push(strip(r)),
          });
          expect(pulled).toBe(ranges.length);
          expect(seenB).toEqual(seenA);
          expect(b.totalBytes).toBe(a.totalBytes);
          expect(b.dataBytes).toBe(a.dataBytes);
        },
      ),
      { numRuns: numRuns(40) },
    );
    const backwards = (async function* () {
      yield { offset: 1 << 20, length: 65536 };
      yield { offset: 0, length: 65536 };
    })();
    await expect(copyImage(memorySource(Buffer.alloc(4 << 20, 1), 65536), null, { ranges: backwards })).rejects.toMatchObject({
      code: 'QCOW2_RANGE',
    });
  });

  it('a shared buffer pool: reused by copy after copy, whole again after a failure, caps the request size', async () => {
    const size = 8 << 20;
    const free: Buffer[] = Array.from({ length: 3 }, () => Buffer.allocUnsafe(1 << 20));
    const waiters: Array<(b: Buffer) => void> = [];
    const pool: CopyBufferPool = {
      size: 1 << 20,
      get available() {
        return free.length;
      },
      take: () => {
        const b = free.pop();
        return b ? Promise.resolve(b) : new Promise((r) => waiters.push(r));
      },
      give: (b) => {
        const w = waiters.shift();
        if (w) w(b);
        else free.push(b);
      },
    };
    const content = Buffer.alloc(size, 7);
    const bufs = new Set<ArrayBufferLike>();
    const sizes = new Set<number>();
    const sink = {
      unit: 65536,
      writeData: async (_o: number, b: Buffer) => {
        bufs.add(b.buffer);
        sizes.add(b.length);
      },
      writeZero: async () => {},
    };
    for (let i = 0; i < 3; i++) await copyImage(memorySource(content, 65536), sink, { bufferPool: pool, requestBytes: 4 << 20 });
    expect(bufs.size).toBeLessThanOrEqual(3);
    expect(Math.max(...sizes)).toBe(1 << 20);
    expect(pool.available).toBe(3);
    let reads = 0;
    const failing: CopySource = {
      virtualSize: size,
      status: async (o, n) => ({ length: Math.min(n, size - o), kind: 'data' }),
      readInto: async (b) => {
        if (++reads === 2) throw new Error('EIO');
        b.fill(1);
      },
    };
    await expect(copyImage(failing, sink, { bufferPool: pool })).rejects.toThrow('EIO');
    expect(pool.available).toBe(3);
    await expect(
      copyImage(failing, sink, {
        bufferPool: pool,
        checkpoint: () => {
          throw new Error('stop');
        },
      }),
    ).rejects.toThrow('stop');
    expect(pool.available).toBe(3);
  });
});
