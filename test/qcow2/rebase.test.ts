// Native in-chain rebase against the oracle: after repointing the top of a random chain at
// a deeper layer, `qemu-img check` is clean and `qemu-img compare` finds the guest content
// of the original chain.
import { execFileSync } from 'node:child_process';
import { copyFileSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import fc from 'fast-check';
import { afterAll, describe, expect, it } from 'vitest';
import { decodeHeader, encodeHeader } from '../../lib/qcow2/header.js';
import { nativeRebase } from '../../lib/qcow2/rebase.js';
import { removeTempDirs, tempDir } from '../helpers/tmp.js';
import { buildChain, chainArb, checkCode, compareWithRaw, numRuns, qemuInfo, type ChainSpec } from './gen.js';

afterAll(removeTempDirs);

function saveRaw(path: string, out: string): void {
  execFileSync('qemu-img', ['convert', '-U', '-O', 'raw', path, out]);
}

describe('native rebase vs qemu-img (random chains)', () => {
  const dir = tempDir('q2reb');
  let n = 0;
  it('content kept, check clean, relative name and format written', async () => {
    const stats = { runs: 0, grown: 0 };
    await fc.assert(
      fc.asyncProperty(chainArb({ minLayers: 3, maxLayers: 4 }), fc.nat(), async (spec: ChainSpec, pick) => {
        const d = join(dir, String(n++));
        mkdirSync(d, { recursive: true });
        const paths = buildChain(d, spec);
        const top = paths.at(-1)!;
        // New backing: any layer at least two below the top.
        const j = pick % (paths.length - 2); // index from the bottom: 0 .. len-3
        const orig = join(d, 'orig.raw');
        saveRaw(top, orig);
        stats.runs++;
        const r = await nativeRebase({ target: top, newBacking: paths[j]!, newBackingName: `l${j}.qcow2`, batchBytes: 64 * 1024 });
        if (r.refcountTableGrown) stats.grown++;
        const ck = checkCode(top);
        expect(ck.code, ck.out).toBe(0);
        const cmp = compareWithRaw(top, orig);
        expect(cmp.code, cmp.out).toBe(0);
        const info = qemuInfo(top);
        expect(info['backing-filename']).toBe(`l${j}.qcow2`);
        expect(info['backing-filename-format']).toBe('qcow2');
        // The removed layers can go; a second run is a no-op on content.
        await nativeRebase({ target: top, newBacking: paths[j]!, newBackingName: `l${j}.qcow2` });
        expect(checkCode(top).code).toBe(0);
        expect(compareWithRaw(top, orig).code).toBe(0);
      }),
      { numRuns: numRuns(10) },
    );
    // Tiny clusters make the refcount table grow now and then; that path is covered below too.
    expect(stats.runs).toBeGreaterThan(0);
    if (process.env.NASBACKUP_QCOW2_RUNS) console.log(`random rebases: ${stats.runs}, refcount table grown in ${stats.grown}`);
  });
});

describe('native rebase: refcount table growth (random)', () => {
  const dir = tempDir('q2grow');
  let n = 0;
  it('a target whose table cannot count the copy gets a larger one; content and check as qemu-img', async () => {
    const MiB = 1 << 20;
    await fc.assert(
      fc.asyncProperty(
        fc.record({
          writes: fc.array(fc.record({ at: fc.integer({ min: 0, max: 23 }), len: fc.integer({ min: 1, max: 16 }), zero: fc.boolean() }), {
            minLength: 1,
            maxLength: 8,
          }),
          top: fc.integer({ min: 0, max: 6 * 1024 - 4 }),
        }),
        async ({ writes, top }) => {
          const d = join(dir, String(n++));
          mkdirSync(d, { recursive: true });
          // 512 B clusters with 64-bit refcounts: one table cluster counts 2 MiB of file. The
          // removed layer holds 3 MiB at its top half, random data and zeros below.
          const ops = [
            'write -P 2 3M 3M',
            ...writes.map(
              (w) => `write ${w.zero ? '-z' : '-P 7'} ${w.at * 128 * 1024} ${Math.min(w.len * 128 * 1024, 3 * MiB - w.at * 128 * 1024)}`,
            ),
          ];
          const paths = buildChain(d, {
            layers: [
              { clusterBits: 16, v2: false, extL2: false, size: 6 * MiB, ops: ['write -P 1 0 3M'] },
              { clusterBits: 16, v2: false, extL2: false, size: 6 * MiB, ops },
              { clusterBits: 9, v2: false, extL2: false, refcountBits: 64, size: 6 * MiB, ops: [`write -P 3 ${top * 1024} 2k`] },
            ],
          });
          const orig = join(d, 'orig.raw');
          saveRaw(paths[2]!, orig);
          const r = await nativeRebase({ target: paths[2]!, newBacking: paths[0]!, newBackingName: 'l0.qcow2', batchBytes: 512 * 1024 });
          expect(r.refcountTableGrown).toBe(true);
          const ck = checkCode(paths[2]!);
          expect(ck.code, ck.out).toBe(0);
          const cmp = compareWithRaw(paths[2]!, orig);
          expect(cmp.code, cmp.out).toBe(0);
        },
      ),
      { numRuns: numRuns(8) },
    );
  });
});

describe('native rebase: shapes and refusals', () => {
  const dir = tempDir('q2rebx');
  const chain3 = (tag: string, extra: string[] = []): string[] => {
    const d = join(dir, tag);
    mkdirSync(d, { recursive: true });
    return buildChain(d, {
      layers: [
        { clusterBits: 16, v2: false, extL2: false, size: 8 << 20, ops: ['write -P 1 0 4M'] },
        { clusterBits: 16, v2: false, extL2: false, size: 8 << 20, ops: ['write -P 2 1M 2M', 'write -z 5M 1M', ...extra] },
        { clusterBits: 16, v2: false, extL2: false, size: 8 << 20, ops: ['write -P 3 1536k 64k'] },
      ],
    });
  };

  it('writes zero clusters as zero clusters and copies only what the removed layer holds', async () => {
    const [a, , c] = chain3('zero');
    const before = readFileSync(c!).length;
    const r = await nativeRebase({ target: c!, newBacking: a!, newBackingName: 'l0.qcow2' });
    expect(r.zeroUnits).toBe(16);
    expect(r.dataUnits).toBe(31); // 2 MiB of 64 KiB clusters minus the one the top has
    expect(r.copiedBytes).toBe(31 * 65536);
    const map = JSON.parse(execFileSync('qemu-img', ['map', '--output=json', c!], { encoding: 'utf8' })) as Array<{
      start: number;
      depth: number;
      zero: boolean;
      data: boolean;
    }>;
    expect(map.find((e) => e.start === 5 << 20)).toMatchObject({ depth: 0, zero: true, data: false });
    expect(readFileSync(c!).length - before).toBeLessThan(33 * 65536);
  });

  it('refuses targets outside the supported set, before writing anything', async () => {
    const cases: Array<[string, (p: string) => void, string]> = [
      ['bitmaps', (p) => execFileSync('qemu-img', ['bitmap', '--add', p, 'b0']), 'QCOW2_BITMAPS'],
      ['snapshot', (p) => execFileSync('qemu-img', ['snapshot', '-c', 's1', p]), 'QCOW2_SNAPSHOTS'],
      [
        'dirty',
        (p) => {
          const b = readFileSync(p);
          b.writeBigUInt64BE(b.readBigUInt64BE(72) | 1n, 72);
          writeFileSync(p, b);
        },
        'QCOW2_DIRTY',
      ],
      [
        'corrupt',
        (p) => {
          const b = readFileSync(p);
          b.writeBigUInt64BE(b.readBigUInt64BE(72) | 2n, 72);
          writeFileSync(p, b);
        },
        'QCOW2_MARKED_CORRUPT',
      ],
    ];
    for (const [tag, damage, code] of cases) {
      const [a, , c] = chain3(tag);
      damage(c!);
      const before = readFileSync(c!);
      await expect(nativeRebase({ target: c!, newBacking: a!, newBackingName: 'l0.qcow2' })).rejects.toMatchObject({ code });
      expect(readFileSync(c!).equals(before)).toBe(true);
    }
    // A new backing outside the chain is another shape (qemu-img's job).
    const [, , c] = chain3('shape');
    const other = join(dir, 'other.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', other, '8M']);
    await expect(nativeRebase({ target: c!, newBacking: other, newBackingName: '../other.qcow2' })).rejects.toMatchObject({
      code: 'QCOW2_REBASE_SHAPE',
    });
  });

  it('clears unknown autoclear bits, keeps unknown extensions, adds a missing backing format last', async () => {
    const [a, , c] = chain3('hdr');
    const b = readFileSync(c!);
    const h = decodeHeader(b);
    h.autoclearFeatures |= 1n << 7n;
    h.extensions = h.extensions.filter((e) => e.type !== 0xe2792aca);
    h.extensions.push({ type: 0x7777aaaa, data: Buffer.from('keep me') });
    const enc = encodeHeader(h, { backingFormat: null });
    b.fill(0, 0, 4096);
    enc.bytes.copy(b, 0);
    writeFileSync(c!, b);
    const orig = join(dir, 'hdr.raw');
    saveRaw(c!, orig);
    await nativeRebase({ target: c!, newBacking: a!, newBackingName: 'l0.qcow2' });
    const after = decodeHeader(readFileSync(c!).subarray(0, 65536));
    expect(after.autoclearFeatures).toBe(0n);
    expect(after.extensions.find((e) => e.type === 0x7777aaaa)?.data.toString()).toBe('keep me');
    expect(after.backingFile).toBe('l0.qcow2');
    expect(after.backingFormat).toBe('qcow2');
    expect(checkCode(c!).code).toBe(0);
    expect(compareWithRaw(c!, orig).code).toBe(0);
  });

  it('onto the direct backing under another spelling: header only', async () => {
    const [, bb, c] = chain3('direct');
    const orig = join(dir, 'direct.raw');
    saveRaw(c!, orig);
    const r = await nativeRebase({ target: c!, newBacking: bb!, newBackingName: './l1.qcow2' });
    expect(r).toMatchObject({ removedLayers: 0, dataUnits: 0, newClusters: 0 });
    expect(qemuInfo(c!)['backing-filename']).toBe('./l1.qcow2');
    expect(compareWithRaw(c!, orig).code).toBe(0);
  });

  it('grows the file across several refcount blocks (512 B clusters)', async () => {
    const d = join(dir, 'rb');
    mkdirSync(d);
    const paths = buildChain(d, {
      layers: [
        { clusterBits: 9, v2: false, extL2: false, size: 2 << 20, ops: ['write -P 1 0 512k'] },
        { clusterBits: 12, v2: false, extL2: false, size: 2 << 20, ops: ['write -P 2 256k 1M', 'write -z 1536k 64k'] },
        { clusterBits: 9, v2: false, extL2: false, size: 2 << 20, ops: ['write -P 3 300k 1k'] },
      ],
    });
    const orig = join(d, 'orig.raw');
    saveRaw(paths[2]!, orig);
    const r = await nativeRebase({ target: paths[2]!, newBacking: paths[0]!, newBackingName: 'l0.qcow2', batchBytes: 100_000 });
    expect(r.batches).toBeGreaterThan(3);
    expect(checkCode(paths[2]!).code).toBe(0);
    expect(compareWithRaw(paths[2]!, orig).code).toBe(0);
  });

  it('grows the refcount table when it cannot count the new clusters (512 B clusters, 64-bit refcounts)', async () => {
    const d = join(dir, 'rtgrow');
    mkdirSync(d);
    // epb = 64: one table cluster (64 entries) counts 2 MiB of file; 3 MiB must be copied.
    const paths = buildChain(d, {
      layers: [
        { clusterBits: 16, v2: false, extL2: false, size: 4 << 20, ops: ['write -P 1 0 4M'] },
        { clusterBits: 16, v2: false, extL2: false, size: 4 << 20, ops: ['write -P 2 512k 3M', 'write -z 3712k 64k'] },
        { clusterBits: 9, v2: false, extL2: false, refcountBits: 64, size: 4 << 20, ops: ['write -P 3 600k 2k'] },
      ],
    });
    const top = paths[2]!;
    const before = decodeHeader(readFileSync(top).subarray(0, 512));
    expect(before.refcountTableClusters).toBe(1);
    const orig = join(d, 'orig.raw');
    saveRaw(top, orig);
    const dry = await nativeRebase({ target: top, newBacking: paths[0]!, newBackingName: 'l0.qcow2', dryRun: true });
    expect(dry.refcountTableGrown).toBe(false); // planned, nothing written
    expect(decodeHeader(readFileSync(top).subarray(0, 512)).refcountTableOffset).toBe(before.refcountTableOffset);
    const r = await nativeRebase({ target: top, newBacking: paths[0]!, newBackingName: 'l0.qcow2', batchBytes: 256 * 1024 });
    expect(r.refcountTableGrown).toBe(true);
    const after = decodeHeader(readFileSync(top).subarray(0, 512));
    expect(after.refcountTableClusters).toBeGreaterThan(1);
    expect(after.refcountTableOffset).not.toBe(before.refcountTableOffset);
    const ck = checkCode(top); // the old table was freed: no leak
    expect(ck.code, ck.out).toBe(0);
    expect(compareWithRaw(top, orig).code).toBe(0);
    expect(qemuInfo(top)['backing-filename']).toBe('l0.qcow2');
  });

  it('keeps a v2 target valid (no zero flags) and copies the removed layer of a shorter backing as zeros', async () => {
    const d = join(dir, 'v2');
    mkdirSync(d);
    const paths = buildChain(d, {
      layers: [
        { clusterBits: 16, v2: true, extL2: false, size: 6 << 20, ops: ['write -P 1 0 6M'] },
        { clusterBits: 16, v2: true, extL2: false, size: 3 << 20, ops: ['write -P 2 1M 1M'] },
        { clusterBits: 16, v2: true, extL2: false, size: 6 << 20, ops: ['write -P 3 0 64k'] },
      ],
    });
    const orig = join(d, 'orig.raw');
    saveRaw(paths[2]!, orig);
    await nativeRebase({ target: paths[2]!, newBacking: paths[0]!, newBackingName: 'l0.qcow2' });
    expect(checkCode(paths[2]!).code).toBe(0);
    expect(compareWithRaw(paths[2]!, orig).code).toBe(0);
  });

  it('a stop before any copy request or between batches leaves the old content; a rerun finishes', async () => {
    const [a, , c] = chain3('stops');
    const orig = join(dir, 'stops', 'orig.raw');
    saveRaw(c!, orig);
    const pristine = join(dir, 'stops', 'pristine.qcow2');
    copyFileSync(c!, pristine);
    const clean = join(dir, 'stops', 'count.qcow2');
    copyFileSync(c!, clean);
    // How many checkpoints a whole run passes (small requests and batches: many stop points).
    let total = 0;
    const small = { batchBytes: 512 * 1024, copy: { requestBytes: 128 * 1024, buffers: 2 } };
    await nativeRebase({ target: clean, newBacking: a!, newBackingName: 'l0.qcow2', ...small, checkpoint: () => void total++ });
    expect(total).toBeGreaterThan(8);
    for (let k = 1; k < total; k++) {
      copyFileSync(pristine, c!);
      let seen = 0;
      await expect(
        nativeRebase({
          target: c!,
          newBacking: a!,
          newBackingName: 'l0.qcow2',
          ...small,
          checkpoint: () => {
            if (++seen === k) throw new Error('stop');
          },
        }),
      ).rejects.toThrow('stop');
      expect(checkCode(c!).code, `stop at ${k}`).toBe(0);
      expect(compareWithRaw(c!, orig).code, `stop at ${k}`).toBe(0);
      expect(qemuInfo(c!)['backing-filename']).toBe('l1.qcow2');
      const r = await nativeRebase({ target: c!, newBacking: a!, newBackingName: 'l0.qcow2', ...small });
      expect(r.removedLayers).toBe(1);
      expect(checkCode(c!).code).toBe(0);
      expect(compareWithRaw(c!, orig).code).toBe(0);
      expect(qemuInfo(c!)['backing-filename']).toBe('l0.qcow2');
    }
  });

  it('a huge sparse target: empty L2 runs skipped, edited entries only, content as before', async () => {
    const d = join(dir, 'sparse');
    mkdirSync(d, { recursive: true });
    const G = 1 << 30;
    // 40 GiB virtual, the middle 1 MiB every 3 GiB (some inside the top's data, some not), the top 64 KiB every 2 GiB.
    const mid: string[] = [];
    const top: string[] = [];
    for (let o = 0; o < 40 * G; o += 3 * G) mid.push(`write -P 2 ${o + (o % 7) * 65536} 1M`);
    for (let o = 0; o < 40 * G; o += 2 * G) top.push(`write -P 3 ${o} 64k`);
    const paths = buildChain(d, {
      layers: [
        { clusterBits: 16, v2: false, extL2: false, size: 40 * G, ops: ['write -P 1 0 4M'] },
        { clusterBits: 16, v2: false, extL2: false, size: 40 * G, ops: mid },
        { clusterBits: 16, v2: false, extL2: false, size: 40 * G, ops: top },
      ],
    });
    const reference = join(d, 'ref.qcow2');
    copyFileSync(paths[2]!, reference);
    execFileSync('qemu-img', ['rebase', '-f', 'qcow2', '-b', 'l0.qcow2', '-F', 'qcow2', reference]);
    const r = await nativeRebase({ target: paths[2]!, newBacking: paths[0]!, newBackingName: 'l0.qcow2', batchBytes: 4 << 20 });
    expect(r.copiedBytes).toBe(14 * (1 << 20) - 64 * 1024); // 14 pieces, one 64 KiB under the top's data at 0
    expect(r.batches).toBeGreaterThan(1);
    expect(checkCode(paths[2]!).code).toBe(0);
    const cmp = execFileSync('qemu-img', ['compare', '-f', 'qcow2', '-F', 'qcow2', paths[2]!, reference], { encoding: 'utf8' });
    expect(cmp).toContain('identical');
  });

  it('units whose bytes come from several layers, zeros and the new backing read right (the source map and its gaps)', async () => {
    // Removed layers with 4 KiB clusters under a 64 KiB target: each copied unit mixes data of
    // both removed layers, a zero cluster, bytes of the new backing and a compressed cluster,
    // so the copy reads part of a unit from the plan's map and part through the chain.
    const d = join(dir, 'mixed');
    mkdirSync(d, { recursive: true });
    const [a, , , t] = buildChain(d, {
      layers: [
        { clusterBits: 16, v2: false, extL2: false, size: 8 << 20, ops: ['write -P 1 0 8M'] },
        {
          clusterBits: 12,
          v2: false,
          extL2: false,
          size: 8 << 20,
          ops: ['write -P 2 4k 8k', 'write -P 2 70k 4k', 'write -c -P 6 128k 4k', 'write -P 2 3M 100k', 'write -z 3080k 4k'],
        },
        { clusterBits: 12, v2: false, extL2: false, size: 8 << 20, ops: ['write -P 4 8k 4k', 'write -z 72k 4k', 'write -P 4 3100k 8k'] },
        { clusterBits: 16, v2: false, extL2: false, size: 8 << 20, ops: ['write -P 3 1M 64k'] },
      ],
    });
    const orig = join(d, 'orig.raw');
    saveRaw(t!, orig);
    const r = await nativeRebase({ target: t!, newBacking: a!, newBackingName: 'l0.qcow2' });
    expect(r.removedLayers).toBe(2);
    expect(r.copiedBytes).toBeGreaterThan(0);
    expect(checkCode(t!).code).toBe(0);
    expect(compareWithRaw(t!, orig).code).toBe(0);
  });

  it('leaves the removed layers untouched', async () => {
    const [a, bb, c] = chain3('untouched');
    const ha = readFileSync(a!);
    const hb = readFileSync(bb!);
    copyFileSync(c!, `${c}.copy`);
    await nativeRebase({ target: c!, newBacking: a!, newBackingName: 'l0.qcow2' });
    expect(readFileSync(a!).equals(ha)).toBe(true);
    expect(readFileSync(bb!).equals(hb)).toBe(true);
  });
});
