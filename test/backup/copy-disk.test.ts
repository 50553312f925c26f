// The stopped path's native copy: random qemu-io chains copied into a new qcow2 whose
// streamed digests equal a re-read of the written file (digestLayer), and whose content
// equals the source (qemu-img compare), with the image clean (qemu-img check).
import { spawnSync } from 'node:child_process';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import fc from 'fast-check';
import { afterAll, describe, expect, it } from 'vitest';
import { copyDiskToQcow2 } from '../../lib/ops/backup/copy-disk.js';
import { ImageChain } from '../../lib/qcow2/index.js';
import { digestLayer } from '../../lib/store/layer-digest.js';
import { removeTempDirs, tempDir } from '../helpers/tmp.js';
import { buildChain, chainArb, checkCode, numRuns } from '../qcow2/gen.js';

afterAll(removeTempDirs);
const dir = tempDir('copydisk');
let k = 0;

describe('copyDiskToQcow2', () => {
  it('streamed digests = digestLayer of the written file; clean; equal to the source', async () => {
    await fc.assert(
      fc.asyncProperty(chainArb({ maxLayers: 3 }), fc.constantFrom(1 << 20, 4 << 20), fc.boolean(), async (spec, extentBytes, compress) => {
        const d = join(dir, String(k++));
        mkdirSync(d);
        const top = buildChain(d, spec).at(-1)!;
        const chain = await ImageChain.open(top);
        let r;
        try {
          r = await copyDiskToQcow2(chain, join(d, 'out.qcow2'), { extentBytes, compress, requestBytes: 1 << 20 });
        } finally {
          await chain.close();
        }
        expect(r.digest).toEqual(await digestLayer(join(d, 'out.qcow2'), { extentBytes }));
        const chk = checkCode(join(d, 'out.qcow2'));
        expect(chk.code, chk.out).toBe(0);
        const cmp = spawnSync('qemu-img', ['compare', '-U', '-f', 'qcow2', '-F', 'qcow2', join(d, 'out.qcow2'), top], { encoding: 'utf8' });
        expect(cmp.status, cmp.stdout + cmp.stderr).toBe(0);
      }),
      { numRuns: numRuns(20) },
    );
  });
});
