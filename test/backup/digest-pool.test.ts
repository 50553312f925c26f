// The running path starts the digests' hash workers while QEMU copies (startHashPool) and
// hands them to digestNewLayers: the digests must be the same as those computed without
// them (checked against qemu-img's own view of the layer), and the workers must stop on
// every way out (finished, cancelled, manifest skipped), or the CLI would never exit.
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { digestNewLayers, startHashPool } from '../../lib/ops/backup/manifest.js';
import type { WorkDir } from '../../lib/ops/backup/workdir.js';
import type { OpContext } from '../../lib/ops/context.js';
import type { HashPool } from '../../lib/store/hash-pool.js';
import { recomputeDigests } from '../helpers/layer-digest.js';
import { makeImage } from '../helpers/qemu.js';
import { removeTempDirs, tempDir } from '../helpers/tmp.js';

afterAll(removeTempDirs);

const MiB = 1024 * 1024;

/** What the digests use of the context and the work folder. */
function fakes(dir: string, skip = false): { ctx: OpContext; work: WorkDir } {
  const ctx = { config: { benchSkipManifest: skip }, checkpoint: () => {} } as unknown as OpContext;
  const work = { file: (f: string) => join(dir, f) } as unknown as WorkDir;
  return { ctx, work };
}

/** A stopped pool refuses work: the failure it was closed with. */
const isClosed = (pool: HashPool): boolean => {
  try {
    pool.tryAcquire();
    return false;
  } catch {
    return true;
  }
};

describe('hash workers started ahead of the digests', () => {
  it('are started only when a manifest is written and the layers are big enough (or of unknown size)', async () => {
    const dir = tempDir('dpool-when');
    const { ctx } = fakes(dir);
    expect(startHashPool(ctx, 8 * MiB)).toBeNull();
    expect(startHashPool(fakes(dir, true).ctx, null)).toBeNull();
    for (const bytes of [null, 512 * MiB]) {
      const pool = startHashPool(ctx, bytes);
      expect(pool).not.toBeNull();
      await pool!.close();
    }
    // NASBACKUP_HASH_WORKERS=0, as on the stopped path: no workers, the digests hash on this thread.
    const mainThread = { config: { benchSkipManifest: false, hashWorkers: 0 }, checkpoint: () => {} } as unknown as OpContext;
    expect(startHashPool(mainThread, 512 * MiB)).toBeNull();
  });

  it('give the digests of qemu-img’s view of each layer, and are stopped once done', async () => {
    const dir = tempDir('dpool-same');
    // Data spread over several 64 MiB extents, a zero cluster run, holes.
    makeImage(join(dir, 'a.qcow2'), {
      size: 200 * MiB,
      writes: [
        { pattern: 0x21, offset: 0, length: 3 * MiB },
        { pattern: 0x22, offset: 70 * MiB, length: 5 * MiB + 64 * 1024 },
        { pattern: 0x23, offset: 199 * MiB, length: MiB },
      ],
    });
    makeImage(join(dir, 'b.qcow2'), { size: 32 * MiB, writes: [{ pattern: 0x31, offset: MiB, length: 2 * MiB }] });
    const { ctx, work } = fakes(dir);
    const pool = startHashPool(ctx, null)!;
    const got = await digestNewLayers(ctx, work, ['a.qcow2', 'b.qcow2'], pool).result;
    expect(isClosed(pool)).toBe(true);
    for (const f of ['a.qcow2', 'b.qcow2']) {
      const theirs = recomputeDigests(join(dir, f), dir);
      const ours = got.get(f)!;
      expect({ extents: ours.extents, data: ours.dataBytes, zero: ours.zeroBytes }).toEqual({
        extents: theirs.extents,
        data: theirs.dataBytes,
        zero: theirs.zeroBytes,
      });
    }
    // Without workers started ahead (small layers: hashed here): the same digests.
    const plain = await digestNewLayers(ctx, work, ['a.qcow2', 'b.qcow2']).result;
    expect([...plain.entries()]).toEqual([...got.entries()]);
  });

  it('are stopped when the digests are cancelled (a failed backup) and when no manifest is written', async () => {
    const dir = tempDir('dpool-stop');
    makeImage(join(dir, 'a.qcow2'), { size: 128 * MiB, writes: [{ pattern: 0x41, offset: 0, length: 96 * MiB }] });
    const { ctx, work } = fakes(dir);
    const pool = startHashPool(ctx, null)!;
    const run = digestNewLayers(ctx, work, ['a.qcow2'], pool);
    await run.cancel();
    expect(isClosed(pool)).toBe(true);
    await expect(run.result).rejects.toThrow();

    const skipping = fakes(dir, true);
    const other = startHashPool(ctx, null)!;
    expect((await digestNewLayers(skipping.ctx, skipping.work, ['a.qcow2'], other).result).size).toBe(0);
    expect(isClosed(other)).toBe(true);
  });
});
