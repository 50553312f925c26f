// The new-image writer and the copy engine against the real qemu-img: every image written is
// clean for `qemu-img check` and equal (`qemu-img compare`) to what was copied.
import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import fc from 'fast-check';
import { afterAll, describe, expect, it } from 'vitest';
import {
  copyImage,
  ImageChain,
  normalizeRanges,
  Qcow2Writer,
  RawFileSink,
  type CopyBufferPool,
  type CopyRun,
  type CopySource,
} from '../../lib/qcow2/index.js';
import { removeTempDirs, tempDir } from '../helpers/tmp.js';
import { buildChain, chainArb, checkCode, compareWithRaw, memorySource, numRuns, qemuInfo, rawContent } from './gen.js';

afterAll(removeTempDirs);
const dir = tempDir('q2copy');
let k = 0;
const fresh = (): string => {
  const d = join(dir, String(k++));
  mkdirSync(d);
  return d;
};

describe('Qcow2Writer', () => {
  it('random extents, cluster sizes, sizes off the cluster grid, compression: clean and equal', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.record({
          bits: fc.constantFrom(9, 12, 16, 17, 21),
          sectors: fc.integer({ min: 1, max: 16 * 1024 }),
          compress: fc.boolean(),
          // Background fdatasyncs while writes are in flight (the stopped copy's writeback).
          flush: fc.constantFrom(0, 0, 4096, 1 << 20),
          writes: fc.array(fc.record({ at: fc.nat(), n: fc.integer({ min: 1, max: 6 }), fill: fc.integer({ min: 0, max: 3 }) }), {
            maxLength: 12,
          }),
        }),
        async ({ bits, sectors, compress, flush, writes }) => {
          const d = fresh();
          const cs = 1 << bits;
          const size = sectors * 512;
          const clusters = Math.ceil(size / cs);
          const raw = Buffer.alloc(size);
          const w = await Qcow2Writer.create(join(d, 'w.qcow2'), {
            virtualSize: size,
            clusterBits: bits,
            compress,
            flushEveryBytes: flush,
          });
          const jobs: Array<Promise<void>> = [];
          const seen = new Set<number>();
          for (const x of writes) {
            const c = x.at % clusters;
            const cn = Math.min(x.n, clusters - c);
            // A compressed cluster is written once (a second write is refused); plain ones are overwritten in place.
            if (compress && Array.from({ length: cn }, (_, i) => c + i).some((i) => seen.has(i))) continue;
            for (let i = c; i < c + cn; i++) seen.add(i);
            const end = Math.min(size, (c + cn) * cs);
            const b = Buffer.alloc(end - c * cs);
            // fill 0: zeros, 1: a pattern (compresses), 2: random, 3: half pattern half random
            if (x.fill === 1) b.fill(c & 255 || 1);
            if (x.fill >= 2) for (let i = x.fill === 3 ? b.length >> 1 : 0; i < b.length; i++) b[i] = (Math.random() * 256) | 0;
            b.copy(raw, c * cs);
            jobs.push(w.writeData(c * cs, b));
          }
          await Promise.all(jobs);
          const r = await w.finish();
          expect(r.fileBytes).toBe(statSync(join(d, 'w.qcow2')).size);
          writeFileSync(join(d, 'ref.raw'), raw);
          const chk = checkCode(join(d, 'w.qcow2'));
          expect(chk.code, chk.out).toBe(0);
          const cmp = compareWithRaw(join(d, 'w.qcow2'), join(d, 'ref.raw'));
          expect(cmp.code, cmp.out).toBe(0);
          expect(qemuInfo(join(d, 'w.qcow2'))['virtual-size']).toBe(size);
        },
      ),
      { numRuns: numRuns(25) },
    );
  });

  it('data writes reach the file one at a time, in call order (an overwrite lands last)', async () => {
    const d = fresh();
    const cs = 65536;
    const w = await Qcow2Writer.create(join(d, 'o.qcow2'), { virtualSize: 32 * cs });
    // Each write to the file stays in flight for a turn of the event loop; the data ones (their
    // buffers are ours; tables and refcounts are the writer's) are counted while in flight.
    const fh = (w as unknown as { fh: { write: (buf: Buffer, ...rest: number[]) => Promise<unknown> } }).fh;
    const ours = new Set<ArrayBufferLike>();
    const write = fh.write.bind(fh);
    let inFlight = 0;
    let most = 0;
    fh.write = async (buf: Buffer, ...rest: number[]) => {
      const data = ours.has(buf.buffer);
      if (data) most = Math.max(most, ++inFlight);
      try {
        await new Promise((r) => setImmediate(r));
        return await write(buf, ...rest);
      } finally {
        if (data) inFlight--;
      }
    };
    const raw = Buffer.alloc(32 * cs);
    const jobs: Array<Promise<void>> = [];
    // Clusters 0-15 once each, then 4-7 overwritten twice: the last call's bytes must win.
    const calls = [...Array.from({ length: 16 }, (_, c) => [c, 1, c + 1]), [4, 4, 100], [4, 4, 101]] as Array<[number, number, number]>;
    for (const [c, n, fill] of calls) {
      const b = Buffer.alloc(n * cs, fill);
      ours.add(b.buffer);
      b.copy(raw, c * cs);
      jobs.push(w.writeData(c * cs, b));
    }
    await Promise.all(jobs);
    await w.finish();
    expect(most).toBe(1);
    writeFileSync(join(d, 'ref.raw'), raw);
    expect(checkCode(join(d, 'o.qcow2')).code).toBe(0);
    const cmp = compareWithRaw(join(d, 'o.qcow2'), join(d, 'ref.raw'));
    expect(cmp.code, cmp.out).toBe(0);
  });

  it('a backing reference with its format; zero clusters hide the backing data', async () => {
    const d = fresh();
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', join(d, 'base.qcow2'), '4M']);
    execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 7 0 4M', join(d, 'base.qcow2')], { stdio: 'ignore' });
    const w = await Qcow2Writer.create(join(d, 'top.qcow2'), { virtualSize: 4 << 20, backing: { name: 'base.qcow2', format: 'qcow2' } });
    await w.writeData(1 << 20, Buffer.alloc(65536, 9));
    await w.writeZero(2 << 20, 1 << 20);
    const r = await w.finish();
    expect(r.zeroBytes).toBe(1 << 20);
    const info = qemuInfo(join(d, 'top.qcow2'));
    expect(info['backing-filename']).toBe('base.qcow2');
    expect(info['backing-filename-format']).toBe('qcow2');
    expect(checkCode(join(d, 'top.qcow2')).code).toBe(0);
    const flat = rawContent(join(d, 'top.qcow2'), d);
    const want = Buffer.alloc(4 << 20, 7);
    want.fill(9, 1 << 20, (1 << 20) + 65536);
    want.fill(0, 2 << 20, 3 << 20);
    expect(flat.equals(want)).toBe(true);
  });

  it('100 GiB virtual, a few clusters: a small file, clean', async () => {
    const d = fresh();
    const size = 100 * 2 ** 30;
    const w = await Qcow2Writer.create(join(d, 'big.qcow2'), { virtualSize: size });
    for (const off of [0, 37 * 2 ** 30, size - 65536]) await w.writeData(off, Buffer.alloc(65536, 5));
    const r = await w.finish();
    expect(r.fileBytes).toBeLessThan(2 << 20);
    expect(checkCode(join(d, 'big.qcow2')).code).toBe(0);
    const map = JSON.parse(execFileSync('qemu-img', ['map', '--output=json', join(d, 'big.qcow2')], { encoding: 'utf8' })) as Array<{
      start: number;
      data: boolean;
    }>;
    expect(map.filter((e) => e.data).map((e) => e.start)).toEqual([0, 37 * 2 ** 30, size - 65536]);
  });

  it('refcount structures spanning several blocks (512-byte clusters, thousands of them)', async () => {
    const d = fresh();
    const size = 8 << 20;
    const w = await Qcow2Writer.create(join(d, 's.qcow2'), { virtualSize: size, clusterBits: 9 });
    const raw = Buffer.alloc(size);
    for (let i = 0; i < size; i += 4096) raw.writeUInt32BE(i, i);
    await w.writeData(0, raw);
    await w.finish();
    writeFileSync(join(d, 'ref.raw'), raw);
    expect(checkCode(join(d, 's.qcow2')).code).toBe(0);
    expect(compareWithRaw(join(d, 's.qcow2'), join(d, 'ref.raw')).code).toBe(0);
  });

  it('O_EXCL: refuses an existing file; abort removes its own file', async () => {
    const d = fresh();
    writeFileSync(join(d, 'x'), 'keep');
    await expect(Qcow2Writer.create(join(d, 'x'), { virtualSize: 1 << 20 })).rejects.toThrow(/cannot create/);
    expect(readFileSync(join(d, 'x'), 'utf8')).toBe('keep');
    const w = await Qcow2Writer.create(join(d, 'y'), { virtualSize: 1 << 20 });
    await w.writeData(0, Buffer.alloc(65536, 1));
    await w.abort();
    expect(existsSync(join(d, 'y'))).toBe(false);
  });

  it('refuses unaligned writes and sizes that are not sector multiples', async () => {
    const d = fresh();
    await expect(Qcow2Writer.create(join(d, 'a'), { virtualSize: 1000 })).rejects.toThrow(/multiple of 512/);
    const w = await Qcow2Writer.create(join(d, 'b'), { virtualSize: 1 << 20 });
    expect(() => w.writeData(512, Buffer.alloc(65536))).toThrow(/cluster-aligned/);
    expect(() => w.writeData(0, Buffer.alloc(1000))).toThrow(/cluster-aligned/);
    await w.abort();
  });
});

describe('copyImage', () => {
  it('random chains (qemu-io) into a Qcow2Writer: clean, equal, runs in guest order covering the disk', async () => {
    await fc.assert(
      fc.asyncProperty(
        chainArb({ maxLayers: 3 }),
        fc.record({
          bits: fc.constantFrom(9, 12, 16, 21),
          req: fc.constantFrom(4096, 65536, 1 << 20, 4 << 20),
          buffers: fc.integer({ min: 1, max: 5 }),
          compress: fc.boolean(),
        }),
        async (spec, o) => {
          const d = fresh();
          const paths = buildChain(d, spec);
          const top = paths.at(-1)!;
          const chain = await ImageChain.open(top);
          const w = await Qcow2Writer.create(join(d, 'out.qcow2'), {
            virtualSize: chain.virtualSize,
            clusterBits: o.bits,
            compress: o.compress,
          });
          const runs: CopyRun[] = [];
          try {
            await copyImage(chain, w, {
              requestBytes: o.req,
              buffers: o.buffers,
              onRun: (r) => {
                runs.push({ offset: r.offset, length: r.length, kind: r.kind });
              },
            });
            await w.finish();
          } finally {
            await chain.close();
          }
          let pos = 0;
          for (const r of runs) {
            expect(r.offset).toBe(pos);
            pos += r.length;
          }
          expect(pos).toBe(chain.virtualSize);
          const chk = checkCode(join(d, 'out.qcow2'));
          expect(chk.code, chk.out).toBe(0);
          const cmp = spawnSync('qemu-img', ['compare', '-U', '-f', 'qcow2', '-F', 'qcow2', join(d, 'out.qcow2'), top], {
            encoding: 'utf8',
          });
          expect(cmp.status, cmp.stdout + cmp.stderr).toBe(0);
        },
      ),
      { numRuns: numRuns(25) },
    );
  });

  it('ranges: only those units are copied (onto a backing, the rest comes from it)', async () => {
    const d = fresh();
    const size = 8 << 20;
    const content = Buffer.alloc(size);
    for (let i = 0; i < size; i += 65536) content.fill((i >> 16) + 1, i, i + 65536);
    content.fill(0, 3 << 20, 4 << 20); // a zero range inside the dirty part
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', join(d, 'base.qcow2'), String(size)]);
    execFileSync('qemu-io', ['-f', 'qcow2', '-c', `write -P 200 0 ${size}`, join(d, 'base.qcow2')], { stdio: 'ignore' });
    const w = await Qcow2Writer.create(join(d, 'inc.qcow2'), { virtualSize: size, backing: { name: 'base.qcow2', format: 'qcow2' } });
    const ranges = [
      { offset: (2 << 20) + 100, length: 3 << 20 }, // widened to whole clusters
      { offset: 7 << 20, length: 65536 },
    ];
    const s = await copyImage(memorySource(content, 65536), w, { ranges, requestBytes: 1 << 20 });
    await w.finish();
    expect(s.totalBytes).toBe((3 << 20) + 65536 + 65536);
    expect(checkCode(join(d, 'inc.qcow2')).code).toBe(0);
    const flat = rawContent(join(d, 'inc.qcow2'), d);
    const want = Buffer.alloc(size, 200);
    for (const r of normalizeRanges(ranges, 65536, size)) content.copy(want, r.offset, r.offset, r.offset + r.length);
    expect(flat.equals(want)).toBe(true);
  });

  it('zero detection: all-zero data units are not stored; a raw sink stays sparse', async () => {
    const d = fresh();
    const size = 4 << 20;
    const content = Buffer.alloc(size);
    content.fill(1, 65536, 131072);
    // The source calls everything data: zeros must still be found.
    const src: CopySource = {
      virtualSize: size,
      status: async (o, n) => ({ length: Math.min(n, size - o), kind: 'data' }),
      readInto: async (b, at, o, n) => void content.copy(b, at, o, o + n),
    };
    const w = await Qcow2Writer.create(join(d, 'z.qcow2'), { virtualSize: size });
    const s = await copyImage(src, w);
    const r = await w.finish();
    expect(s.dataBytes).toBe(65536);
    expect(r.dataBytes).toBe(65536);
    const raw = await RawFileSink.create(join(d, 'z.raw'), size);
    await copyImage(src, raw);
    await raw.finish();
    expect(readFileSync(join(d, 'z.raw')).equals(content)).toBe(true);
    expect(statSync(join(d, 'z.raw')).blocks * 512).toBeLessThan(1 << 20);
  });

  it('cancellation: the checkpoint stops it, nothing is left in flight', async () => {
    const d = fresh();
    const size = 16 << 20;
    const content = Buffer.alloc(size, 3);
    const w = await Qcow2Writer.create(join(d, 'c.qcow2'), { virtualSize: size });
    let n = 0;
    await expect(
      copyImage(memorySource(content, 65536), w, {
        requestBytes: 1 << 20,
        checkpoint: () => {
          if (++n === 5) throw new Error('stop');
        },
      }),
    ).rejects.toThrow('stop');
    await w.abort();
    expect(existsSync(join(d, 'c.qcow2'))).toBe(false);
  });

  it('a failing read fails the copy after the other reads settle', async () => {
    const size = 16 << 20;
    let reads = 0;
    const src: CopySource = {
      virtualSize: size,
      status: async (o, n) => ({ length: Math.min(n, size - o), kind: 'data' }),
      readInto: async (b) => {
        if (++reads === 3) throw new Error('EIO');
        b.fill(1);
      },
    };
    await expect(copyImage(src, null, { requestBytes: 1 << 20 })).rejects.toThrow('EIO');
  });

  it('lent buffers (bufferPool): requests fit them, and every one is given back, on success and when a read fails', async () => {
    const size = 16 << 20;
    const lent = (): CopyBufferPool & { out: number; most: number } => {
      const free: Buffer[] = Array.from({ length: 3 }, () => Buffer.alloc(256 << 10));
      const p = {
        size: 256 << 10,
        out: 0,
        most: 0,
        get available() {
          return free.length;
        },
        take: async () => {
          const b = free.pop();
          if (!b) throw new Error('taken while none is free');
          p.out++;
          p.most = Math.max(p.most, p.out);
          return b;
        },
        give: (b: Buffer) => {
          p.out--;
          free.push(b);
        },
      };
      return p;
    };
    let reads = 0;
    let failAt = 0;
    const src: CopySource = {
      virtualSize: size,
      status: async (o, n) => ({ length: Math.min(n, size - o), kind: 'data' }),
      readInto: async (b, at, o, n) => {
        expect(n).toBeLessThanOrEqual(256 << 10);
        if (++reads === failAt) throw new Error('EIO');
        b.fill(o & 255 || 1, at, at + n);
      },
    };
    const ok = lent();
    const st = await copyImage(src, null, { requestBytes: 4 << 20, bufferPool: ok });
    expect(st.readBytes).toBe(size);
    expect([ok.out, ok.available, ok.most]).toEqual([0, 3, 3]);
    for (const at of [1, 2, 5, 30]) {
      reads = 0;
      failAt = at;
      const bad = lent();
      await expect(copyImage(src, null, { requestBytes: 256 << 10, bufferPool: bad })).rejects.toThrow('EIO');
      expect([bad.out, bad.available]).toEqual([0, 3]);
    }
  });

  it('rate limit: bytes per second bound the read rate', async () => {
    const size = 4 << 20;
    const content = Buffer.alloc(size, 1);
    const s = await copyImage(memorySource(content, 65536), null, { requestBytes: 1 << 20, rateBytesPerSec: 8 << 20 });
    // 4 MiB at 8 MiB/s: the last request may start only after 3 MiB took their time.
    expect(s.elapsedMs).toBeGreaterThanOrEqual(350);
  });
});

describe('copy buffers are page-aligned', () => {
  // O_DIRECT refuses a buffer that is not aligned to the device's block: the kernel's own check
  // of the address (JavaScript cannot see it). Skipped where the file system has no O_DIRECT.
  it('every buffer of pageAlignedBuffers passes an O_DIRECT write; a large malloc buffer does not', async () => {
    const { pageAlignedBuffers } = await import('../../lib/qcow2/io.js');
    const { openSync, writeSync, closeSync, constants } = await import('node:fs');
    const file = join(dir, 'direct.bin');
    let fd: number;
    try {
      fd = openSync(file, constants.O_WRONLY | constants.O_CREAT | constants.O_DIRECT, 0o600);
    } catch {
      return; // no O_DIRECT here
    }
    try {
      const bufs = pageAlignedBuffers(3, 1 << 20);
      expect(bufs.map((b) => b.length)).toEqual([1 << 20, 1 << 20, 1 << 20]);
      // Distinct memory: writing one leaves the others.
      bufs[0]!.fill(1);
      bufs[1]!.fill(2);
      expect(bufs[0]![bufs[0]!.length - 1]).toBe(1);
      for (const b of bufs) expect(writeSync(fd, b, 0, 4096, 0)).toBe(4096);
      // The check has teeth: 16 bytes off (where a large malloc'd Buffer starts) is refused.
      expect(() => writeSync(fd, bufs[2]!.subarray(16), 0, 4096, 0)).toThrow(/EINVAL/);
    } finally {
      closeSync(fd);
    }
  });
});
