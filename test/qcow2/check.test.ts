// The native structural check (lib/qcow2/check.ts) against `qemu-img check` (the oracle): a
// corpus of malformed images built with qemu-img/qemu-io and byte patches, each test named by what
// both must say, and random valid images (writes, zero writes, discards, compressed writes, 512 B–
// 2 MiB clusters, extended L2, refcount widths, bitmaps, backing chains, internal snapshots).
// Same verdict (clean / leaks / corrupt / check failed) and the same counts.
import { execFileSync, spawnSync } from 'node:child_process';
import { closeSync, openSync, readSync, truncateSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import fc from 'fast-check';
import { afterAll, describe, expect, it } from 'vitest';
import { checkImage, type CheckVerdict, type Qcow2CheckResult } from '../../lib/qcow2/index.js';
import { removeTempDirs, tempDir } from '../helpers/tmp.js';
import { buildChain, chainArb, numRuns } from './gen.js';

afterAll(removeTempDirs);

interface Oracle {
  verdict: CheckVerdict;
  corruptions: number;
  leaks: number;
  checkErrors: number;
  imageEnd: number | null;
  stderr: string;
}

const VERDICT: Record<number, CheckVerdict> = { 0: 'clean', 1: 'failed', 2: 'corrupt', 3: 'leaks' };

function qemuCheck(path: string): Oracle {
  const r = spawnSync('qemu-img', ['check', '-U', '--output=json', path], { encoding: 'utf8' });
  let j: Record<string, number> = {};
  try {
    j = JSON.parse(r.stdout) as Record<string, number>;
  } catch {
    /* not opened: no JSON */
  }
  return {
    verdict: VERDICT[r.status ?? -1] ?? 'failed',
    corruptions: j.corruptions ?? 0,
    leaks: j.leaks ?? 0,
    checkErrors: j['check-errors'] ?? 0,
    imageEnd: j['image-end-offset'] ?? null,
    stderr: r.stderr,
  };
}

/** Native and oracle agree on the verdict and every count qemu-img printed. */
async function agree(path: string): Promise<{ ours: Qcow2CheckResult; qemu: Oracle }> {
  const ours = await checkImage(path);
  const qemu = qemuCheck(path);
  const why = `${path}\nqemu-img: ${JSON.stringify({ ...qemu, stderr: qemu.stderr.slice(0, 600) })}\nnative: ${JSON.stringify(ours).slice(0, 900)}`;
  expect(ours.verdict, why).toBe(qemu.verdict);
  if (qemu.imageEnd !== null) {
    expect({ c: ours.corruptions, l: ours.leaks, e: ours.checkErrors }, why).toEqual({
      c: qemu.corruptions,
      l: qemu.leaks,
      e: qemu.checkErrors,
    });
    expect(ours.imageEndOffset, why).toBe(qemu.imageEnd);
  }
  return { ours, qemu };
}

// ---- byte patches ---------------------------------------------------------------------------

function readU64(path: string, at: number): bigint {
  const fd = openSync(path, 'r');
  try {
    const b = Buffer.alloc(8);
    readSync(fd, b, 0, 8, at);
    return b.readBigUInt64BE(0);
  } finally {
    closeSync(fd);
  }
}
function writeU64(path: string, at: number, v: bigint): void {
  const fd = openSync(path, 'r+');
  try {
    const b = Buffer.alloc(8);
    b.writeBigUInt64BE(v);
    writeSync(fd, b, 0, 8, at);
  } finally {
    closeSync(fd);
  }
}
function writeU16(path: string, at: number, v: number): void {
  const fd = openSync(path, 'r+');
  try {
    const b = Buffer.alloc(2);
    b.writeUInt16BE(v);
    writeSync(fd, b, 0, 2, at);
  } finally {
    closeSync(fd);
  }
}
const OFF = 0x00fffffffffffe00n;
const CS = 65536;
const l1At = (p: string): number => Number(readU64(p, 40));
const l2At = (p: string, i = 0): number => Number(readU64(p, l1At(p) + 8 * i) & OFF);
const l2Entry = (p: string, i: number): number => l2At(p) + 8 * i;
const refTableAt = (p: string): number => Number(readU64(p, 48));
const refBlockAt = (p: string, i = 0): number => Number(readU64(p, refTableAt(p) + 8 * i) & OFF);
/** Byte of the 16-bit refcount of host cluster `k` (default refcount width, first block). */
const refAt = (p: string, k: number): number => refBlockAt(p) + 2 * k;

function qemuIo(path: string, ...cmds: string[]): void {
  execFileSync('qemu-io', ['-f', 'qcow2', ...cmds.flatMap((c) => ['-c', c]), path], { stdio: 'ignore' });
}

/** A 64 MiB image with 4 data clusters written (clusters 0–3 hold header, L1, refcounts, L2). */
function base(dir: string, name: string, opts: string[] = []): string {
  const p = join(dir, name);
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', ...opts, p, '64M']);
  qemuIo(p, 'write -P 0x11 0 256k');
  return p;
}

describe('malformed-image corpus: native check and qemu-img check say the same', () => {
  const dir = tempDir('q2check');

  it('an intact image: clean, 0 errors', async () => {
    const { ours } = await agree(base(dir, 'intact.qcow2'));
    expect(ours.verdict).toBe('clean');
    expect(ours.messages).toEqual([]);
  });

  it('a leaked cluster (refcount 1, nothing points at it): leaks only, 1 leak', async () => {
    const p = base(dir, 'leak.qcow2');
    const size = spawnSync('stat', ['-c', '%s', p], { encoding: 'utf8' }).stdout.trim();
    const k = Math.ceil(Number(size) / CS);
    truncateSync(p, (k + 1) * CS);
    writeU16(p, refAt(p, k), 1);
    const { ours } = await agree(p);
    expect(ours).toMatchObject({ verdict: 'leaks', leaks: 1, corruptions: 0 });
    expect(ours.messages).toEqual([`Leaked cluster ${k} refcount=1 reference=0`]);
  });

  it('refcount zeroed for a used data cluster: corrupt (refcount=0 reference=1, and its copied flag)', async () => {
    const p = base(dir, 'refzero.qcow2');
    const k = Number(readU64(p, l2Entry(p, 0)) & OFF) / CS;
    writeU16(p, refAt(p, k), 0);
    const { ours } = await agree(p);
    expect(ours).toMatchObject({ verdict: 'corrupt', corruptions: 2 });
    expect(ours.messages).toContain(`ERROR cluster ${k} refcount=0 reference=1`);
  });

  it('two L2 entries pointing at one cluster: corrupt (refcount 1, 2 references), the orphan leaks', async () => {
    const p = base(dir, 'shared.qcow2');
    writeU64(p, l2Entry(p, 1), readU64(p, l2Entry(p, 0)));
    const { ours } = await agree(p);
    expect(ours).toMatchObject({ verdict: 'corrupt', leaks: 1 });
    expect(ours.messages.some((m) => /refcount=1 reference=2/.test(m))).toBe(true);
  });

  it('an L2 entry beyond the end of the file: corrupt', async () => {
    const p = base(dir, 'beyond.qcow2');
    writeU64(p, l2Entry(p, 0), (readU64(p, l2Entry(p, 0)) & ~OFF) | (1n << 40n));
    const { ours } = await agree(p);
    expect(ours).toMatchObject({ verdict: 'corrupt', corruptions: 2, leaks: 1 });
    expect(ours.messages[0]).toMatch(/exceeding the end of the file/);
  });

  it('a misaligned L1 entry: corrupt (the table read at the misaligned offset, as QEMU does)', async () => {
    const p = base(dir, 'l1misaligned.qcow2');
    writeU64(p, l1At(p), readU64(p, l1At(p)) + 512n);
    const { ours } = await agree(p);
    expect(ours.verdict).toBe('corrupt');
    expect(ours.messages[0]).toMatch(/Table is not cluster aligned; L1 entry corrupted/);
  });

  it('a misaligned L2 data entry: corrupt', async () => {
    const p = base(dir, 'l2misaligned.qcow2');
    writeU64(p, l2Entry(p, 2), readU64(p, l2Entry(p, 2)) + 4096n);
    const { ours } = await agree(p);
    expect(ours.verdict).toBe('corrupt');
    expect(ours.messages.join('\n')).toMatch(/Data cluster is not properly aligned/);
  });

  it('reserved bits in an L1 and an L2 entry: corrupt', async () => {
    const p = base(dir, 'reserved.qcow2');
    writeU64(p, l1At(p), readU64(p, l1At(p)) | (1n << 57n));
    writeU64(p, l2Entry(p, 3), readU64(p, l2Entry(p, 3)) | 2n);
    const { ours } = await agree(p);
    expect(ours.verdict).toBe('corrupt');
    expect(ours.messages.join('\n')).toMatch(/L1 entry with reserved bits set[\s\S]*l2 entry with reserved bits set/);
  });

  it('copied flag cleared on a refcount-1 data cluster: corrupt (OFLAG_COPIED)', async () => {
    const p = base(dir, 'copied.qcow2');
    writeU64(p, l2Entry(p, 0), readU64(p, l2Entry(p, 0)) & ~(1n << 63n));
    const { ours } = await agree(p);
    expect(ours).toMatchObject({ verdict: 'corrupt', corruptions: 1 });
    expect(ours.messages[0]).toMatch(/OFLAG_COPIED data cluster/);
  });

  it('copied flag set on a compressed cluster: corrupt', async () => {
    const p = join(dir, 'ccopied.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', p, '64M']);
    qemuIo(p, 'write -c -P 0x22 0 64k');
    writeU64(p, l2Entry(p, 0), readU64(p, l2Entry(p, 0)) | (1n << 63n));
    const { ours } = await agree(p);
    expect(ours.verdict).toBe('corrupt');
    expect(ours.messages[0]).toMatch(/copied flag must never be set for compressed clusters/);
  });

  it('corrupt bit set on a consistent image: qemu-img check says clean (exit 0); the native check agrees and flags it', async () => {
    const p = base(dir, 'corruptbit.qcow2');
    writeU64(p, 72, readU64(p, 72) | 2n);
    const { ours } = await agree(p);
    expect(ours).toMatchObject({ verdict: 'clean', markedCorrupt: true });
  });

  it('dirty after a crash with lazy refcounts: corrupt (refcounts never written), dirty flagged', async () => {
    const p = join(dir, 'dirty.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'lazy_refcounts=on', p, '64M']);
    spawnSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 1 0 1M', '-c', 'abort', p], { stdio: 'ignore' });
    const { ours } = await agree(p);
    expect(ours).toMatchObject({ verdict: 'corrupt', dirty: true });
  });

  it('refcount table entry with reserved bits: corrupt, its block leaks', async () => {
    const p = base(dir, 'rtreserved.qcow2');
    writeU64(p, refTableAt(p), readU64(p, refTableAt(p)) | 3n);
    const { ours } = await agree(p);
    expect(ours).toMatchObject({ verdict: 'corrupt', corruptions: 1, leaks: 1 });
  });

  it('refcount table entry misaligned: the check fails (exit 1, refcounts unreadable)', async () => {
    const p = base(dir, 'rtmisaligned.qcow2');
    writeU64(p, refTableAt(p), readU64(p, refTableAt(p)) + 512n);
    const { ours } = await agree(p);
    expect(ours.verdict).toBe('failed');
    expect(ours.checkErrors).toBeGreaterThan(0);
  });

  it('refcount block outside the file: corrupt (every cluster then has refcount 0)', async () => {
    const p = base(dir, 'rtoutside.qcow2');
    writeU64(p, refTableAt(p), 1n << 30n);
    const { ours } = await agree(p);
    expect(ours.verdict).toBe('corrupt');
    expect(ours.messages[0]).toBe('ERROR refcount block 0 is outside image');
  });

  it('L1 table offset misaligned in the header: qemu-img cannot open it (exit 1); native: cannot be checked', async () => {
    const p = base(dir, 'l1off.qcow2');
    writeU64(p, 40, readU64(p, 40) + 512n);
    const { ours } = await agree(p);
    expect(ours.verdict).toBe('failed');
    expect(ours.fatal).toMatch(/L1 table offset .* invalid/);
  });

  it('refcount table offset misaligned in the header: check failed (exit 1)', async () => {
    const p = base(dir, 'rtoff.qcow2');
    writeU64(p, 48, readU64(p, 48) + 512n);
    const { ours } = await agree(p);
    expect(ours.fatal).toMatch(/refcount table offset/);
  });

  it('an L2 table whose refcount was zeroed: corrupt (and the L1 copied flag disagrees)', async () => {
    const p = base(dir, 'l2ref.qcow2');
    writeU16(p, refAt(p, l2At(p) / CS), 0);
    const { ours } = await agree(p);
    expect(ours).toMatchObject({ verdict: 'corrupt', corruptions: 2 });
  });

  it('a truncated image (data clusters cut off): corrupt', async () => {
    const p = base(dir, 'truncated.qcow2');
    truncateSync(p, 5 * CS);
    const { ours } = await agree(p);
    expect(ours.verdict).toBe('corrupt');
  });

  it('a bitmap directory cluster with refcount 0: corrupt; an intact one: clean', async () => {
    const p = base(dir, 'bitmap.qcow2');
    execFileSync('qemu-img', ['bitmap', '--add', p, 'b0']);
    qemuIo(p, 'write -P 0x33 1M 3M');
    const { ours } = await agree(p);
    expect(ours.verdict).toBe('clean');
    const info = JSON.parse(execFileSync('qemu-img', ['info', '--output=json', p], { encoding: 'utf8' })) as {
      'format-specific': { data: { bitmaps?: unknown[] } };
    };
    expect(info['format-specific'].data.bitmaps).toHaveLength(1);
    // The bitmaps extension follows the header: find its directory offset.
    const hdr = Buffer.alloc(4096);
    const fd = openSync(p, 'r');
    readSync(fd, hdr, 0, 4096, 0);
    closeSync(fd);
    let at = hdr.readUInt32BE(100);
    let dirOff = -1;
    while (at + 8 <= hdr.length) {
      const type = hdr.readUInt32BE(at);
      const len = hdr.readUInt32BE(at + 4);
      if (type === 0) break;
      if (type === 0x23852875) dirOff = Number(hdr.readBigUInt64BE(at + 8 + 16));
      at += 8 + Math.ceil(len / 8) * 8;
    }
    expect(dirOff).toBeGreaterThan(0);
    writeU16(p, refAt(p, dirOff / CS), 0);
    const bad = await agree(p);
    expect(bad.ours.verdict).toBe('corrupt');
  });

  it('internal snapshots (shared clusters, refcounts 2 and 3): clean; its L1 table refcount zeroed: corrupt', async () => {
    const p = base(dir, 'snap.qcow2');
    execFileSync('qemu-img', ['snapshot', '-c', 's1', p]);
    qemuIo(p, 'write -P 0x44 0 128k');
    // A second entry, with a name that is not a multiple of 8 (entries are padded between).
    execFileSync('qemu-img', ['snapshot', '-c', 'second-snapshot-x', p]);
    qemuIo(p, 'write -P 0x45 64k 128k');
    const { ours } = await agree(p);
    expect(ours.verdict).toBe('clean');
    const snapTable = Number(readU64(p, 64));
    const snapL1 = Number(readU64(p, snapTable));
    writeU16(p, refAt(p, snapL1 / CS), 0);
    const bad = await agree(p);
    expect(bad.ours.verdict).toBe('corrupt');
  });

  it('a 100 GiB sparse image with 1 TiB virtual size too: clean, metadata only read (file-sized memory)', async () => {
    const p = join(dir, 'huge.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', p, '1T']);
    qemuIo(p, 'write -P 1 0 1M', 'write -P 2 500G 1M', 'write -P 3 1023G 64k');
    const { ours } = await agree(p);
    expect(ours).toMatchObject({ verdict: 'clean', l2Tables: 3 });
  });
});

describe('the check reuses its read buffers (a ring per table walk, one block buffer)', () => {
  const dir = tempDir('q2check-ring');
  it('many L2 tables through a 3-deep ring: the same answer as qemu-img and as an 8 MiB window, intact and with a late table damaged', async () => {
    // 4 KiB clusters: an L2 table maps 2 MiB, so 40 writes 2 MiB apart make 40 tables.
    const p = join(dir, 'tables.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', p, '80M']);
    qemuIo(p, ...Array.from({ length: 40 }, (_, i) => `write -P ${i + 1} ${i * 2 * 1024 * 1024} 8k`));
    const ring = await checkImage(p, { inFlightBytes: 3 * 4096 });
    expect(ring.l2Tables).toBe(40);
    expect(ring).toEqual(await checkImage(p));
    expect(ring.verdict).toBe((await agree(p)).qemu.verdict);
    // The 38th table's first entry points at a second, already used, data cluster: the
    // reference is counted twice wherever the ring holds that table.
    const l1 = Number(readU64(p, 40));
    const l2 = Number(readU64(p, l1 + 8 * 37) & OFF);
    const other = Number(readU64(p, Number(readU64(p, l1) & OFF)) & OFF);
    writeU64(p, l2, (readU64(p, l2) & ~OFF) | BigInt(other));
    const bad = await checkImage(p, { inFlightBytes: 3 * 4096 });
    expect(bad).toEqual(await checkImage(p));
    const { qemu } = await agree(p);
    expect(bad.verdict).toBe(qemu.verdict);
    expect(bad.corruptions).toBeGreaterThan(0);
  });
});

describe('random valid images: native check and qemu-img check agree', () => {
  const dir = tempDir('q2checkrand');
  let n = 0;
  it('writes, zero writes, discards, compressed writes; 512 B–2 MiB clusters, extended L2, refcount widths, bitmaps, backing chains', async () => {
    await fc.assert(
      fc.asyncProperty(chainArb({ maxLayers: 2 }), fc.boolean(), async (spec, bitmap) => {
        const d = join(dir, String(n++));
        execFileSync('mkdir', ['-p', d]);
        const paths = buildChain(d, spec);
        const top = paths.at(-1)!;
        if (bitmap && !spec.layers.at(-1)!.v2) {
          execFileSync('qemu-img', ['bitmap', '--add', top, 'b']);
          qemuIo(top, `write -P 0x5a 0 ${Math.min(65536, spec.layers.at(-1)!.size)}`);
        }
        for (const p of paths) {
          const { ours } = await agree(p);
          expect(ours.verdict).toBe('clean');
        }
      }),
      { numRuns: numRuns(25) },
    );
  }, 300_000);
});
