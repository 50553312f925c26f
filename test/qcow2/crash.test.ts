// Crash injection: the native rebase is stopped after every single write and fdatasync of
// the target — in a child process killed with SIGKILL, in-process, and under a power-loss
// model that also drops an arbitrary subset of the writes not yet synced. Every state must
// pass `qemu-img check` (0, or 3 = leaks only), show the original chain's guest content,
// and a rerun must finish the rebase.
import { execFileSync, spawnSync } from 'node:child_process';
import { copyFileSync, mkdirSync, readdirSync, truncateSync } from 'node:fs';
import { join } from 'node:path';
import { buildSync } from 'esbuild';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Qcow2Error } from '../../lib/qcow2/errors.js';
import { decodeHeader, encodeHeader } from '../../lib/qcow2/header.js';
import type { BlockFile } from '../../lib/qcow2/io.js';
import { nativeRebase } from '../../lib/qcow2/rebase.js';
import { removeTempDirs, tempDir } from '../helpers/tmp.js';
import { buildChain, checkCode, compareWithRaw, type ChainSpec } from './gen.js';
import { readFileSync, writeFileSync } from 'node:fs';

afterAll(removeTempDirs);

interface Scenario {
  name: string;
  spec: ChainSpec;
  batch: number;
  /** Drop the target's backing-format extension first (exercises the header path that adds it). */
  dropFormat?: boolean;
  /** Always crash at ops 1..N too (a phase at the start worth every point, e.g. table growth). */
  firstOps?: number;
}

const M = 1 << 20;
const scenarios: Scenario[] = [
  {
    name: '64k-v3-new-l2-tables',
    batch: 256 * 1024,
    spec: {
      layers: [
        { clusterBits: 16, v2: false, extL2: false, size: 1088 * M, ops: ['write -P 1 0 2M', 'write -P 1 700M 1M'] },
        {
          clusterBits: 16,
          v2: false,
          extL2: false,
          size: 1088 * M,
          ops: ['write -c -P 9 0 64k', 'write -P 2 64k 1M', 'write -z 3M 256k', 'write -P 4 600M 512k', 'write -P 5 1050M 256k'],
        },
        { clusterBits: 16, v2: false, extL2: false, size: 1088 * M, ops: ['write -P 3 128k 64k'] },
      ],
    },
  },
  {
    name: '512b-new-refcount-blocks',
    batch: 64 * 1024,
    spec: {
      layers: [
        { clusterBits: 9, v2: false, extL2: false, size: 2 * M, ops: ['write -P 1 0 256k'] },
        { clusterBits: 9, v2: false, extL2: false, size: 2 * M, ops: ['write -P 2 128k 400k', 'write -z 1M 8k'] },
        { clusterBits: 9, v2: false, extL2: false, size: 2 * M, ops: ['write -P 3 200k 1k'] },
      ],
    },
  },
  {
    // 512 B clusters, 64-bit refcounts: the one-cluster table counts 2 MiB of file and 3 MiB
    // must be copied, so the refcount table moves before the first batch.
    name: '512b-refcount-table-grows',
    batch: 256 * 1024,
    firstOps: 14,
    spec: {
      layers: [
        { clusterBits: 16, v2: false, extL2: false, size: 4 * M, ops: ['write -P 1 0 4M'] },
        { clusterBits: 16, v2: false, extL2: false, size: 4 * M, ops: ['write -P 2 512k 3M', 'write -z 3712k 64k'] },
        { clusterBits: 9, v2: false, extL2: false, refcountBits: 64, size: 4 * M, ops: ['write -P 3 600k 2k'] },
      ],
    },
  },
  {
    name: 'extl2-v3-missing-format',
    batch: 128 * 1024,
    dropFormat: true,
    spec: {
      layers: [
        { clusterBits: 16, v2: false, extL2: true, size: 4 * M, ops: ['write -P 1 0 1M'] },
        { clusterBits: 14, v2: false, extL2: true, size: 3 * M, ops: ['write -P 2 10k 300k', 'write -z 512k 20k'] },
        { clusterBits: 15, v2: false, extL2: true, size: 4 * M, ops: ['write -P 3 33k 2k', 'write -P 3 3500k 4k'] },
      ],
    },
  },
];

/** Crash points: every op with NASBACKUP_QCOW2_CRASH_ALL=1, else the first, the last (header) and an even spread. */
function points(total: number, budget: number, firstOps = 0): number[] {
  if (process.env.NASBACKUP_QCOW2_CRASH_ALL === '1' || total <= budget) return Array.from({ length: total }, (_, i) => i + 1);
  const set = new Set<number>([1, total - 2, total]);
  for (let k = 2; k <= Math.min(firstOps, total); k++) set.add(k);
  budget += Math.min(firstOps, total);
  for (let k = 1; set.size < budget && k < budget; k++) set.add(Math.max(1, Math.round((k * total) / (budget - 2))));
  return [...set].filter((n) => n >= 1 && n <= total).sort((a, b) => a - b);
}

let childJs = '';
beforeAll(() => {
  const out = join(tempDir('q2child'), 'crash-child.mjs');
  buildSync({
    entryPoints: [join(import.meta.dirname, 'crash-child.ts')],
    bundle: true,
    platform: 'node',
    format: 'esm',
    target: 'node20',
    outfile: out,
    logLevel: 'silent',
  });
  childJs = out;
});

function prepare(s: Scenario): { pristine: string; orig: string } {
  const pristine = tempDir(`q2crash-${s.name}`);
  buildChain(pristine, s.spec);
  const top = join(pristine, 'l2.qcow2');
  if (s.dropFormat) {
    const b = readFileSync(top);
    const h = decodeHeader(b);
    const enc = encodeHeader(h, { backingFormat: null });
    b.fill(0, 0, enc.bytes.length + 64);
    enc.bytes.copy(b, 0);
    writeFileSync(top, b);
  }
  const orig = join(pristine, 'orig.raw');
  execFileSync('qemu-img', ['convert', '-O', 'raw', top, orig]);
  return { pristine, orig };
}

function workCopy(pristine: string, tag: string): string {
  const d = join(pristine, tag);
  mkdirSync(d, { recursive: true });
  for (const f of readdirSync(pristine)) if (f.endsWith('.qcow2')) copyFileSync(join(pristine, f), join(d, f));
  return d;
}

function assertState(top: string, orig: string, where: string): void {
  const ck = checkCode(top);
  expect([0, 3], `${where}: qemu-img check\n${ck.out}`).toContain(ck.code);
  const cmp = compareWithRaw(top, orig);
  expect(cmp.code, `${where}: qemu-img compare\n${cmp.out}`).toBe(0);
}

async function finish(d: string, orig: string, where: string): Promise<void> {
  const top = join(d, 'l2.qcow2');
  await nativeRebase({ target: top, newBacking: join(d, 'l0.qcow2'), newBackingName: 'l0.qcow2' });
  assertState(top, orig, `${where} (after rerun)`);
  expect(decodeHeader(readFileSync(top).subarray(0, 65536))).toMatchObject({ backingFile: 'l0.qcow2', backingFormat: 'qcow2' });
}

/** Journals unsynced writes; `crash` keeps only a chosen subset of them (power-loss model). */
class JournalFile implements BlockFile {
  private log: Array<{ pos: number; data: Buffer; pre: Buffer; sizeBefore: number }> = [];
  constructor(private readonly inner: BlockFile) {}
  get path(): string {
    return this.inner.path;
  }
  read(buf: Buffer, o: number, l: number, p: number): Promise<number> {
    return this.inner.read(buf, o, l, p);
  }
  async write(buf: Buffer, pos: number): Promise<void> {
    const sizeBefore = await this.inner.size();
    const pre = Buffer.alloc(buf.length);
    const n = await this.inner.read(pre, 0, buf.length, pos);
    this.log.push({ pos, data: Buffer.from(buf), pre: pre.subarray(0, n), sizeBefore });
    await this.inner.write(buf, pos);
  }
  async datasync(): Promise<void> {
    await this.inner.datasync();
    this.log = [];
  }
  size(): Promise<number> {
    return this.inner.size();
  }
  close(): Promise<void> {
    return this.inner.close();
  }
  /** Undo every unsynced write, then redo those `keep` selects, in order. Returns how many were dropped. */
  async crash(keep: (i: number) => boolean): Promise<number> {
    for (const w of [...this.log].reverse()) {
      await this.inner.write(w.pre, w.pos);
      truncateSync(this.path, Math.max(w.sizeBefore, 0));
      if ((await this.inner.size()) < w.sizeBefore) truncateSync(this.path, w.sizeBefore);
    }
    let dropped = 0;
    for (let i = 0; i < this.log.length; i++) {
      if (keep(i)) await this.inner.write(this.log[i]!.data, this.log[i]!.pos);
      else dropped++;
    }
    this.log = [];
    return dropped;
  }
}

describe.each(scenarios)('crash injection: $name', (s) => {
  let pristine = '';
  let orig = '';
  let total = 0;
  beforeAll(async () => {
    ({ pristine, orig } = prepare(s));
    const d = workCopy(pristine, 'count');
    const r = await nativeRebase({
      target: join(d, 'l2.qcow2'),
      newBacking: join(d, 'l0.qcow2'),
      newBackingName: 'l0.qcow2',
      batchBytes: s.batch,
    });
    total = r.ops;
    console.log(`${s.name}: ${total} crash points (writes + syncs), ${r.batches} batches`);
    assertState(join(d, 'l2.qcow2'), orig, 'uninterrupted');
    expect(r.batches).toBeGreaterThan(1);
  });

  it('SIGKILL after every write and sync (child process)', async () => {
    expect(total).toBeGreaterThan(8);
    for (const n of points(total, 6, s.firstOps)) {
      const d = workCopy(pristine, `kill-${n}`);
      const r = spawnSync(process.execPath, [childJs, join(d, 'l2.qcow2'), join(d, 'l0.qcow2'), 'l0.qcow2', String(n), String(s.batch)], {
        encoding: 'utf8',
      });
      expect(r.signal, `op ${n}: ${r.stderr}`).toBe('SIGKILL');
      assertState(join(d, 'l2.qcow2'), orig, `killed after op ${n}/${total}`);
      await finish(d, orig, `killed after op ${n}/${total}`);
    }
  });

  it('power loss after every op, dropping random unsynced writes', async () => {
    for (const n of points(total, 6, s.firstOps)) {
      const d = workCopy(pristine, `power-${n}`);
      let journal: JournalFile | null = null;
      const seed = n * 2654435761;
      await expect(
        nativeRebase({
          target: join(d, 'l2.qcow2'),
          newBacking: join(d, 'l0.qcow2'),
          newBackingName: 'l0.qcow2',
          batchBytes: s.batch,
          wrapFile: (f) => (journal = new JournalFile(f)),
          hooks: {
            afterOp: async (k) => {
              if (k !== n) return;
              await journal!.crash((i) => ((seed >>> (i % 31)) & 1) === 1);
              throw new Qcow2Error('QCOW2_CRASH_INJECTED', `crash after op ${k}`);
            },
          },
        }),
      ).rejects.toMatchObject({ code: 'QCOW2_CRASH_INJECTED' });
      assertState(join(d, 'l2.qcow2'), orig, `power loss after op ${n}/${total}`);
      await finish(d, orig, `power loss after op ${n}/${total}`);
    }
  });
});
