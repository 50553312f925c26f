// The verify reader (lib/store/layer-read.ts: several reads in flight, across extents) gives the
// digests of digestLayer() (the one definition of the canonical stream), on random real images:
// 512 B–2 MiB clusters, extended L2, zero and compressed clusters, discards, odd sizes; with read
// sizes and depths that split data runs at every kind of boundary.
import { join } from 'node:path';
import { mkdirSync } from 'node:fs';
import fc from 'fast-check';
import { afterAll, describe, expect, it } from 'vitest';
import { digestLayer } from '../../lib/store/layer-digest.js';
import { readLayerDigest } from '../../lib/store/layer-read.js';
import { HashPool } from '../../lib/store/hash-pool.js';
import { removeTempDirs, tempDir } from '../helpers/tmp.js';
import { buildChain, chainArb, numRuns } from '../qcow2/gen.js';

afterAll(removeTempDirs);

describe('readLayerDigest = digestLayer', () => {
  const dir = tempDir('layer-read');
  const pool = new HashPool({ workers: 2, slotBytes: 65536, slots: 6 });
  afterAll(() => pool.close());
  let n = 0;
  // Read buffers shared by every layer of the run (as chain verify shares them): stale bytes of
  // another layer or read size never reach a digest.
  const spare: Buffer[] = [];
  it('random layers, random read sizes and depths, extents of 1–4 clusters (×64 below 64 KiB)', async () => {
    await fc.assert(
      fc.asyncProperty(
        chainArb({ maxLayers: 2 }),
        fc.integer({ min: 1, max: 6 }),
        fc.constantFrom(512, 4096, 65536, 1 << 20),
        fc.integer({ min: 1, max: 4 }),
        async (spec, inFlight, chunkBytes, extentClusters) => {
          const d = join(dir, String(n++));
          mkdirSync(d);
          const paths = buildChain(d, spec);
          for (const [i, p] of paths.entries()) {
            const cs = 1 << spec.layers[i]!.clusterBits;
            const extentBytes = cs * extentClusters * (cs < 65536 ? 64 : 1);
            let seen = 0;
            const want = await digestLayer(p, { extentBytes });
            const got = await readLayerDigest(p, { extentBytes, inFlight, chunkBytes, onData: (b) => (seen += b) });
            expect(got).toEqual(want);
            expect(seen).toBe(want.dataBytes);
            expect(await readLayerDigest(p, { extentBytes, inFlight, chunkBytes, spare })).toEqual(want);
            // Reused, not piling up: at most one layer's reads in flight (≤ 6) per read size (4).
            expect(spare.length).toBeLessThanOrEqual(24);
            // Hashed on worker threads, reads in the pool's shared slots: the same digests.
            expect(await readLayerDigest(p, { extentBytes, inFlight, pool })).toEqual(want);
          }
        },
      ),
      { numRuns: numRuns(30) },
    );
  }, 300_000);
});
