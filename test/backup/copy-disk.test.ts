// The stopped path's native copy: random qemu-io chains copied into a new qcow2 whose
// streamed digests equal a re-read of the written file (digestLayer), and whose content
// equals the source (qemu-img compare), with the image clean (qemu-img check); the same with
// the hashing on HashPool workers reading the engine's buffers (its shared slots), and on the
// pool's inline hasher (no worker: this thread, after each slot's write started).
import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import fc from 'fast-check';
import { afterAll, describe, expect, it, vi } from 'vitest';
import { BACKUP_BUFFERS, BACKUP_REQUEST_BYTES, copyDiskToQcow2, copyHashPool } from '../../lib/ops/backup/copy-disk.js';
import { ImageChain, type CopySource } from '../../lib/qcow2/index.js';
import { HashPool } from '../../lib/store/hash-pool.js';
import { digestLayer } from '../../lib/store/layer-digest.js';
import { removeTempDirs, tempDir } from '../helpers/tmp.js';
import { buildChain, chainArb, checkCode, KiB, numRuns } from '../qcow2/gen.js';

afterAll(removeTempDirs);
const dir = tempDir('copydisk');
let k = 0;
const MiB = 1024 * KiB;

describe('copyDiskToQcow2', () => {
  it('streamed digests = digestLayer of the written file; clean; equal to the source', async () => {
    await fc.assert(
      fc.asyncProperty(
        chainArb({ maxLayers: 3 }),
        fc.constantFrom(1 << 20, 4 << 20),
        fc.constantFrom(undefined, 256 * KiB),
        fc.boolean(),
        async (spec, extentBytes, partBytes, compress) => {
          const d = join(dir, String(k++));
          mkdirSync(d);
          const top = buildChain(d, spec).at(-1)!;
          const chain = await ImageChain.open(top);
          let r;
          const digests = { extentBytes, ...(partBytes ? { partBytes } : {}) };
          try {
            r = await copyDiskToQcow2(chain, join(d, 'out.qcow2'), { ...digests, compress, requestBytes: 1 << 20 });
          } finally {
            await chain.close();
          }
          expect(r.digest).toEqual(await digestLayer(join(d, 'out.qcow2'), digests));
          if (partBytes) expect(r.digest!.extents.every((e) => e.parts !== undefined)).toBe(true);
          const chk = checkCode(join(d, 'out.qcow2'));
          expect(chk.code, chk.out).toBe(0);
          const cmp = spawnSync('qemu-img', ['compare', '-U', '-f', 'qcow2', '-F', 'qcow2', join(d, 'out.qcow2'), top], {
            encoding: 'utf8',
          });
          expect(cmp.status, cmp.stdout + cmp.stderr).toBe(0);
        },
      ),
      { numRuns: numRuns(20) },
    );
  });
});

describe("the stopped path's hash pool (issue 18: peak RSS at most idle + 32 MiB)", () => {
  it("by default no worker thread (an isolate costs ~12 MiB) and no slot beyond the engine's own buffers; workers asked for get slack slots", async () => {
    const inline = copyHashPool();
    const workers = copyHashPool(1);
    try {
      expect(inline.threads).toBe(0);
      expect(inline.slotBytes).toBe(BACKUP_REQUEST_BYTES);
      expect(inline.available * inline.slotBytes).toBe(BACKUP_BUFFERS * BACKUP_REQUEST_BYTES);
      expect(workers.threads).toBe(1);
      expect(workers.available).toBeGreaterThan(BACKUP_BUFFERS);
    } finally {
      await Promise.all([inline.close(), workers.close()]);
    }
  });
});

describe.each([
  ['two workers', 2],
  ['the inline hasher', 0],
])('copyDiskToQcow2 hashing on a HashPool with %s (the engine reads into its slots)', (_, workers) => {
  // Few, small slots: slots are read into again while a hasher still hashes; with two
  // workers, extents alternate between them.
  const pool = new HashPool({ workers, slotBytes: 128 * KiB, slots: 3 });
  afterAll(() => pool.close());

  it('digests equal those of the single-threaded LayerDigester and of a re-read; same file content', async () => {
    await fc.assert(
      fc.asyncProperty(chainArb({ maxLayers: 3 }), fc.constantFrom(256 * KiB, MiB), fc.boolean(), async (spec, extentBytes, compress) => {
        const d = join(dir, String(k++));
        mkdirSync(d);
        const top = buildChain(d, spec).at(-1)!;
        const chain = await ImageChain.open(top);
        let here, there;
        // 1 MiB extents in parts of 256 KiB (each part its own job on the pool), 256 KiB extents whole.
        const digests = { extentBytes, ...(extentBytes === MiB ? { partBytes: 256 * KiB } : {}) };
        try {
          here = await copyDiskToQcow2(chain, join(d, 'here.qcow2'), { ...digests, compress, requestBytes: 128 * KiB });
          there = await copyDiskToQcow2(chain, join(d, 'pool.qcow2'), { ...digests, compress, pool });
        } finally {
          await chain.close();
        }
        expect(there.digest).toEqual(here.digest);
        expect(there.digest).toEqual(await digestLayer(join(d, 'pool.qcow2'), digests));
        const cmp = spawnSync('qemu-img', ['compare', '-U', '-f', 'qcow2', '-F', 'qcow2', join(d, 'pool.qcow2'), top], {
          encoding: 'utf8',
        });
        expect(cmp.status, cmp.stdout + cmp.stderr).toBe(0);
        // Every slot is free again once the copy returned.
        expect(pool.available).toBe(3);
      }),
      { numRuns: numRuns(15) },
    );
  });

  it('a 40 MiB disk of random data, zeros and holes: pool digests = single-threaded digests (default geometry)', async () => {
    const d = join(dir, String(k++));
    mkdirSync(d);
    const src = join(d, 'src.qcow2');
    spawnSync('qemu-img', ['create', '-q', '-f', 'qcow2', src, String(40 * MiB)]);
    const raw = join(d, 'rand.bin');
    writeFileSync(raw, randomBytes(9 * MiB));
    // Random data (from a raw file) at unaligned places, a zeroed range inside it, a hole.
    const cmds = [`write -P 7 ${3 * MiB + 512} ${MiB}`, `write -z ${20 * MiB} ${4 * MiB}`];
    const io = spawnSync('qemu-io', ['-f', 'qcow2', ...cmds.flatMap((c) => ['-c', c]), src], { encoding: 'utf8' });
    expect(io.status, io.stderr).toBe(0);
    const put = spawnSync('qemu-io', ['-f', 'qcow2', '-c', `write -s ${raw} ${25 * MiB} ${9 * MiB}`, src], { encoding: 'utf8' });
    expect(put.status, put.stderr).toBe(0);
    // The stopped path's default (inline, no worker thread) and two workers.
    const pools = [copyHashPool(), copyHashPool(2)];
    expect(pools.map((p) => p.threads)).toEqual([0, 2]);
    const chain = await ImageChain.open(src);
    try {
      const here = await copyDiskToQcow2(chain, join(d, 'here.qcow2'), { extentBytes: 4 * MiB });
      expect(here.digest!.extents.length).toBeGreaterThan(3);
      for (const [i, pool] of pools.entries()) {
        const there = await copyDiskToQcow2(chain, join(d, `pool${i}.qcow2`), { extentBytes: 4 * MiB, pool });
        expect(there.digest).toEqual(here.digest);
        expect(there.stats).toMatchObject({ readBytes: here.stats.readBytes, dataBytes: here.stats.dataBytes });
        const cmp = spawnSync('qemu-img', ['compare', '-U', join(d, `pool${i}.qcow2`), src], { encoding: 'utf8' });
        expect(cmp.status, cmp.stdout + cmp.stderr).toBe(0);
      }
    } finally {
      await chain.close();
      await Promise.all(pools.map((p) => p.close()));
    }
  });

  it('a read that fails midway: the copy fails, the file is removed, and the pool is whole for the next copy', async () => {
    const d = join(dir, String(k++));
    mkdirSync(d);
    const src = join(d, 'src.qcow2');
    spawnSync('qemu-img', ['create', '-q', '-f', 'qcow2', src, String(8 * MiB)]);
    spawnSync('qemu-io', ['-f', 'qcow2', '-c', `write -P 3 0 ${8 * MiB}`, src]);
    const chain = await ImageChain.open(src);
    try {
      let reads = 0;
      const failing: CopySource = {
        virtualSize: chain.virtualSize,
        status: (o, n) => chain.status(o, n),
        readInto: async (buf, at, o, n) => {
          if (++reads === 20) throw new Error('injected read failure');
          return chain.readInto(buf, at, o, n);
        },
      };
      await expect(copyDiskToQcow2(failing, join(d, 'bad.qcow2'), { extentBytes: 256 * KiB, pool })).rejects.toThrow(/injected/);
      expect(existsSync(join(d, 'bad.qcow2'))).toBe(false);
      // The hashers answer what was already sent to them, then every slot is free.
      await vi.waitFor(() => expect(pool.available).toBe(3), { timeout: 10_000 });
      const ok = await copyDiskToQcow2(chain, join(d, 'good.qcow2'), { extentBytes: 256 * KiB, pool });
      expect(ok.digest).toEqual(await digestLayer(join(d, 'good.qcow2'), { extentBytes: 256 * KiB }));
    } finally {
      await chain.close();
    }
  });
});
