// status() and the metadata scan skip a run of empty L2 entries with one compare instead of a
// decode each (chain verify of sparse layers): the runs must give exactly what a decode of
// every entry gives, at the run boundaries too, and never hide a damaged entry among empty ones.
import { execFileSync } from 'node:child_process';
import { closeSync, openSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { Qcow2Image, scanMetadata, Qcow2Error } from '../../lib/qcow2/index.js';
import { makeImage } from '../helpers/qemu.js';
import { removeTempDirs, tempDir } from '../helpers/tmp.js';

afterAll(removeTempDirs);

type Kind = 'data' | 'zero' | 'unallocated' | 'compressed';

/** Kind and host offset of every unit, from status() runs. */
async function byStatus(img: Qcow2Image): Promise<Array<[Kind, number]>> {
  const out: Array<[Kind, number]> = [];
  const unit = img.subclusterSize;
  for (let pos = 0; pos < img.virtualSize;) {
    const e = await img.status(pos, img.virtualSize - pos);
    for (let o = 0; o < e.length; o += unit) out.push([e.kind, e.kind === 'data' ? e.host! + o : -1]);
    pos += e.length;
  }
  return out;
}

/** The same, from a decode of every entry (no runs). */
async function byEntry(img: Qcow2Image): Promise<Array<[Kind, number]>> {
  const out: Array<[Kind, number]> = [];
  for (let c = 0; c * img.clusterSize < img.virtualSize; c++) {
    const e = await img.entry(c);
    for (let s = 0; s < img.subclusters; s++) {
      if (e.type === 'compressed') out.push(['compressed', -1]);
      else if (e.alloc & (1 << s)) out.push(['data', e.host + s * img.subclusterSize]);
      else out.push([e.zero & (1 << s) ? 'zero' : 'unallocated', -1]);
    }
  }
  return out;
}

describe('runs of empty L2 entries', () => {
  const shapes = [
    { name: '64 KiB clusters', cluster: 65536, extra: [] as string[] },
    { name: '64 KiB clusters, extended L2', cluster: 65536, extra: ['-o', 'extended_l2=on'] },
    { name: '4 KiB clusters', cluster: 4096, extra: ['-o', 'cluster_size=4096'] },
    { name: '512 B clusters (a table is one run)', cluster: 512, extra: ['-o', 'cluster_size=512'] },
  ];
  for (const s of shapes)
    it(`status() equals a decode of every entry: ${s.name}`, async () => {
      const d = tempDir('q2zrun');
      const p = join(d, 'a.qcow2');
      const cs = s.cluster;
      // Clusters at and around the run boundaries (63, 64, 127, 128), mid-run, a zero cluster, the last one.
      const size = 1024 * cs;
      makeImage(p, {
        size,
        extra: s.extra,
        writes: [63, 64, 127, 128, 200, 1023].map((c, i) => ({ pattern: i + 1, offset: c * cs, length: cs })),
      });
      execFileSync('qemu-io', ['-f', 'qcow2', '-c', `write -z ${300 * cs} ${cs}`, '-c', `write -P 9 ${(512 * cs) / 2} 512`, p], {
        stdio: 'ignore',
      });
      const img = await Qcow2Image.open(p);
      try {
        expect(await byStatus(img)).toEqual(await byEntry(img));
      } finally {
        await img.close();
      }
      await expect(scanMetadata(p)).resolves.toBeDefined();
    });

  it('a damaged entry among empty ones is still found by the scan and by status()', async () => {
    const d = tempDir('q2zbad');
    const p = join(d, 'a.qcow2');
    makeImage(p, { size: 64 << 20, writes: [{ pattern: 1, offset: 0, length: 65536 }] });
    const img = await Qcow2Image.open(p);
    const l2 = img.l2Offset(0);
    await img.close();
    // Entry 100 (inside what was a run of 64 empty entries): a host offset not cluster-aligned.
    const fd = openSync(p, 'r+');
    const e = Buffer.alloc(8);
    e.writeUInt32BE(0x80000000, 0);
    e.writeUInt32BE(0x00010200, 4);
    writeSync(fd, e, 0, 8, l2 + 100 * 8);
    closeSync(fd);
    const err = await scanMetadata(p).catch((x: unknown) => x);
    expect(err).toBeInstanceOf(Qcow2Error);
    expect((err as Qcow2Error).code).toBe('QCOW2_CORRUPT');
    expect((err as Qcow2Error).message).toMatch(/cluster 100: host offset \d+ is not cluster-aligned/);
    const again = await Qcow2Image.open(p);
    try {
      await expect(again.status(64 * 65536, 64 << 20)).rejects.toThrow(/cluster 100/);
    } finally {
      await again.close();
    }
  });
});
