// The manifest model (encode, decode, what a reader refuses) and the per-extent digests
// of one layer, each compared with an independent recomputation from qemu-img alone on
// real images: data, zero and unallocated clusters, compressed clusters, a thin layer
// over a backing (its own clusters only), a size that is not a cluster multiple.
import { execFileSync } from 'node:child_process';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { digestLayer } from '../../lib/store/layer-digest.js';
import { combineParts } from '../../lib/store/digest/index.js';
import { decodeManifest, encodeManifest, ManifestError, type Manifest } from '../../lib/store/manifest.js';
import { recomputeDigests } from '../helpers/layer-digest.js';
import { makeImage } from '../helpers/qemu.js';
import { removeTempDirs, tempDir } from '../helpers/tmp.js';

afterAll(removeTempDirs);

const MiB = 1024 * 1024;

const sample = (): Manifest => ({
  format: 'nasbackup-manifest',
  version: 1,
  tool: { name: 'nasbackup', version: '0.1.0' },
  vm: 'i-2-10-VM',
  path: 'i-2-10-VM/2025.01.04.00.00.00',
  createdAt: '2025-01-04T00:00:00.000Z',
  mode: 'incremental',
  kind: 'incremental',
  checkpoint: 'backup-1736035200',
  incrementalFrom: 'backup-1735689600',
  parent: 'i-2-10-VM/2025.01.01.00.00.00',
  digest: { algorithm: 'sha256', stream: 'nasbackup-layer-v1', extentBytes: 64 * MiB },
  disks: [
    {
      file: 'root.b3f4.qcow2',
      volumeId: 'b3f4',
      format: 'qcow2',
      virtualSize: 200 * MiB,
      backing: '../2025.01.01.00.00.00/root.b3f4.qcow2',
      backingFormat: 'qcow2',
      fileBytes: 393216,
      dataBytes: 131072,
      zeroBytes: 0,
      unitBytes: 65536,
      extents: [
        { index: 0, digest: 'a'.repeat(64) },
        { index: 3, digest: '0123456789abcdef'.repeat(4) },
      ],
    },
  ],
});

describe('manifest codec', () => {
  it('round-trips', () => {
    const m = sample();
    expect(decodeManifest(encodeManifest(m))).toEqual(m);
  });

  it('reads version 2 with XXH64 digests (16 hex digits), and SHA-256 at version 2 too', () => {
    const m = sample();
    m.version = 2;
    m.digest.algorithm = 'xxh64';
    m.disks[0]!.extents = [
      { index: 0, digest: 'ef46db3751d8e999' },
      { index: 3, digest: '0123456789abcdef' },
    ];
    expect(decodeManifest(encodeManifest(m))).toEqual(m);
    const o = JSON.parse(encodeManifest(m)) as { disks: Array<{ extents: Array<{ digest: string }> }> };
    o.disks[0]!.extents[0]!.digest = 'a'.repeat(64);
    expect(() => decodeManifest(JSON.stringify(o))).toThrow(/extents\[0\]\.digest is not 16 hex digits/);
    const s = sample();
    s.version = 2;
    expect(decodeManifest(encodeManifest(s))).toEqual(s);
  });

  const refuse = (edit: (o: Record<string, unknown>) => void, why: RegExp): void => {
    const o = JSON.parse(encodeManifest(sample())) as Record<string, unknown>;
    edit(o);
    expect(() => decodeManifest(JSON.stringify(o))).toThrow(ManifestError);
    expect(() => decodeManifest(JSON.stringify(o))).toThrow(why);
  };
  const disk0 = (o: Record<string, unknown>) => (o.disks as Array<Record<string, unknown>>)[0]!;
  const ext = (o: Record<string, unknown>) => disk0(o).extents as Array<Record<string, unknown>>;

  it('refuses what it cannot trust, naming the field', () => {
    expect(() => decodeManifest('{"format":')).toThrow(/not JSON/);
    refuse((o) => (o.format = 'other'), /format/);
    refuse((o) => (o.version = 4), /version 4 is not supported \(this reader knows 1 to 3\)/);
    // Parts came with version 3.
    refuse((o) => ((o.digest as Record<string, unknown>).partBytes = MiB), /digest.partBytes is not known to manifest version 1/);
    refuse((o) => (ext(o)[0]!.parts = 'AAAA'), /extents\[0\]\.parts is not known to manifest version 1/);
    refuse((o) => ((o.digest as Record<string, unknown>).algorithm = 'md5'), /digest.algorithm "md5" is not known/);
    refuse((o) => ((o.digest as Record<string, unknown>).stream = 'other'), /digest is not over nasbackup-layer-v1/);
    // XXH64 came with version 2: a version-1 manifest that claims it is not one we wrote.
    refuse((o) => {
      o.version = 1;
      (o.digest as Record<string, unknown>).algorithm = 'xxh64';
    }, /digest.algorithm "xxh64" is not known to manifest version 1/);
    // A digest of the other algorithm's length.
    refuse((o) => (ext(o)[0]!.digest = '0123456789abcdef'), /extents\[0\]\.digest is not 64 hex digits/);
    refuse((o) => ((o.digest as Record<string, unknown>).extentBytes = 1000), /extentBytes/);
    refuse((o) => (ext(o)[0]!.digest = 'xyz'), /extents\[0\]\.digest is not 64 hex digits/);
    refuse((o) => (ext(o)[1]!.index = 0), /extents\[1\]\.index 0 is out of order/);
    refuse((o) => (ext(o)[1]!.index = 4), /past the disk's end/);
    refuse((o) => (disk0(o).file = '../x.qcow2'), /not a plain file name/);
    refuse((o) => (o.disks = [disk0(o), disk0(o)]), /listed twice/);
    refuse((o) => (disk0(o).virtualSize = -1), /virtualSize is not a non-negative integer/);
    refuse((o) => (o.kind = 'differential'), /kind is "differential"/);
    refuse((o) => delete o.vm, /vm is not a string/);
  });
});

describe('manifest codec, version 3 (parts)', () => {
  // Digests of real streams (parts of 256 KiB over 1 MiB extents), so the codec's binding check holds.
  const dir = tempDir('manifest-parts');
  const v3 = async (): Promise<Manifest> => {
    const img = join(dir, 'v3.qcow2');
    makeImage(img, { size: 3 * MiB + 512 * 1024, writes: [{ pattern: 0x21, offset: 300 * 1024, length: MiB }] });
    execFileSync('qemu-io', ['-f', 'qcow2', '-c', `write -P 0x22 ${3 * MiB} 4096`, img], { stdio: 'ignore' });
    const d = await digestLayer(img, { extentBytes: MiB, partBytes: 256 * 1024 });
    const m = sample();
    m.version = 3;
    m.digest = { algorithm: 'xxh64', stream: 'nasbackup-layer-v1', extentBytes: MiB, partBytes: 256 * 1024 };
    m.disks[0] = { ...m.disks[0]!, virtualSize: d.virtualSize, unitBytes: d.unitBytes, extents: d.extents };
    return m;
  };

  it('round-trips; every listed extent records all its parts (the short last extent fewer), bound to its digest', async () => {
    const m = await v3();
    expect(decodeManifest(encodeManifest(m))).toEqual(m);
    const ex = m.disks[0]!.extents;
    expect(ex.map((e) => e.index)).toEqual([0, 1, 3]);
    // 4 parts of 8 bytes per whole extent, 2 in the last (512 KiB).
    expect(ex.map((e) => Buffer.from(e.parts!, 'base64').length)).toEqual([32, 32, 16]);
    expect(ex.map((e) => combineParts('xxh64', Buffer.from(e.parts!, 'base64')))).toEqual(ex.map((e) => e.digest));
  });

  it('refuses parts it cannot trust: edited alone, the wrong length, not base64, missing, or a part size that does not fit', async () => {
    const text = encodeManifest(await v3());
    const refuse3 = (edit: (o: Record<string, unknown>) => void, why: RegExp): void => {
      const o = JSON.parse(text) as Record<string, unknown>;
      edit(o);
      expect(() => decodeManifest(JSON.stringify(o))).toThrow(ManifestError);
      expect(() => decodeManifest(JSON.stringify(o))).toThrow(why);
    };
    const ext3 = (o: Record<string, unknown>) => (o.disks as Array<Record<string, unknown>>)[0]!.extents as Array<Record<string, unknown>>;
    refuse3((o) => {
      const b = Buffer.from(ext3(o)[1]!.parts as string, 'base64');
      b[9]! ^= 1;
      ext3(o)[1]!.parts = b.toString('base64');
    }, /extents\[1\]\.digest is not the digest of its parts/);
    refuse3((o) => (ext3(o)[0]!.parts = Buffer.alloc(24).toString('base64')), /extents\[0\]\.parts is not 32 bytes in base64/);
    refuse3((o) => (ext3(o)[2]!.parts = ext3(o)[0]!.parts), /extents\[2\]\.parts is not 16 bytes in base64/);
    refuse3((o) => (ext3(o)[0]!.parts = '!!!!'), /extents\[0\]\.parts is not 32 bytes in base64/);
    refuse3((o) => delete ext3(o)[0]!.parts, /extents\[0\]\.parts is not a string/);
    refuse3((o) => delete (o.digest as Record<string, unknown>).partBytes, /digest.partBytes is not a non-negative integer/);
    refuse3((o) => ((o.digest as Record<string, unknown>).partBytes = 3 * 256 * 1024), /digest.partBytes is not a power of two/);
    refuse3((o) => ((o.digest as Record<string, unknown>).partBytes = 2 * MiB), /divides digest.extentBytes/);
  });
});

describe('layer digests (native) = independent recomputation (qemu-img map + convert of the layer alone)', () => {
  const dir = tempDir('layer-digest');
  const io = (img: string, cmd: string): void => void execFileSync('qemu-io', ['-f', 'qcow2', '-c', cmd, img], { stdio: 'ignore' });

  it('data, zero and unallocated clusters over several extents; an untouched extent is not listed', async () => {
    const img = join(dir, 'mixed.qcow2');
    makeImage(img, { size: 8 * MiB });
    io(img, `write -P 0x11 0 ${MiB}`);
    io(img, `write -z ${3 * MiB} ${MiB}`);
    io(img, `write -P 0x00 ${5 * MiB + 65536} 65536`); // a data cluster of zeros is data
    io(img, `write -P 0x7e ${7 * MiB - 512} 1024`); // straddles two clusters and two extents
    const ours = await digestLayer(img, { extentBytes: MiB });
    const theirs = recomputeDigests(img, dir, MiB);
    expect(ours.extents).toEqual(theirs.extents);
    expect(ours.extents.map((e) => e.index)).toEqual([0, 3, 5, 6, 7]);
    expect({ unit: ours.unitBytes, data: ours.dataBytes, zero: ours.zeroBytes }).toEqual({
      unit: theirs.unitBytes,
      data: theirs.dataBytes,
      zero: theirs.zeroBytes,
    });
    // One byte more anywhere changes that extent's digest and no other.
    io(img, `write -P 0x12 ${MiB / 2} 1`);
    const after = await digestLayer(img, { extentBytes: MiB });
    expect(after.extents.filter((e, i) => e.digest !== ours.extents[i]!.digest).map((e) => e.index)).toEqual([0]);
  });

  it('compressed clusters are digested as their guest bytes', async () => {
    const src = join(dir, 'plain.qcow2');
    const img = join(dir, 'compressed.qcow2');
    makeImage(src, { size: 4 * MiB, writes: [{ pattern: 0x33, offset: 0, length: 2 * MiB }] });
    execFileSync('qemu-img', ['convert', '-c', '-O', 'qcow2', src, img]);
    const ours = await digestLayer(img, { extentBytes: MiB });
    expect(ours.extents).toEqual(recomputeDigests(img, dir, MiB).extents);
    // The same guest data, compressed or not, is the same stream.
    expect(ours.extents).toEqual((await digestLayer(src, { extentBytes: MiB })).extents);
  });

  it('a thin layer: only its own clusters, never its backing`s', async () => {
    const base = join(dir, 'chain', 'base.qcow2');
    const top = join(dir, 'chain', 'top.qcow2');
    makeImage(base, { size: 4 * MiB, writes: [{ pattern: 0x44, offset: 0, length: 4 * MiB }] });
    makeImage(top, { backing: 'base.qcow2', writes: [{ pattern: 0x55, offset: 2 * MiB, length: 65536 }] });
    const ours = await digestLayer(top, { extentBytes: MiB });
    expect(ours.extents).toEqual(recomputeDigests(top, dir, MiB).extents);
    expect(ours.extents.map((e) => e.index)).toEqual([2]);
    expect(ours.dataBytes).toBe(65536);
  });

  it('parts (version 3): each part hashed alone, the extent over the parts; a part is never smaller than a unit', async () => {
    const img = join(dir, 'parts.qcow2');
    makeImage(img, { size: 8 * MiB });
    io(img, `write -P 0x11 0 ${MiB}`);
    io(img, `write -z ${3 * MiB} ${MiB}`);
    io(img, `write -P 0x7e ${7 * MiB - 512} 1024`);
    for (const part of [64 * 1024, 512 * 1024, MiB]) {
      const ours = await digestLayer(img, { extentBytes: 2 * MiB, partBytes: part });
      expect(ours.extents, `part ${part}`).toEqual(recomputeDigests(img, dir, 2 * MiB, 'xxh64', part).extents);
      expect(ours.extents.every((e) => Buffer.from(e.parts!, 'base64').length === ((2 * MiB) / part) * 8)).toBe(true);
    }
    // A change in one part changes that part's digest only (and the extent's).
    const before = await digestLayer(img, { extentBytes: 2 * MiB, partBytes: 512 * 1024 });
    io(img, `write -P 0x12 ${MiB + 600 * 1024} 1`);
    const after = await digestLayer(img, { extentBytes: 2 * MiB, partBytes: 512 * 1024 });
    const split = (p: string): string[] => Buffer.from(p, 'base64').toString('hex').match(/.{16}/g)!;
    expect(split(after.extents[0]!.parts!).map((d, k) => d !== split(before.extents[0]!.parts!)[k])).toEqual([false, false, false, true]);
    expect(after.extents.slice(1)).toEqual(before.extents.slice(1));
    // SHA-256 parts, 2 MiB clusters (a part is then one unit of 2 MiB), and extended L2 (units of 2 KiB under 1 MiB parts).
    for (const [extra, algorithm] of [
      [['-o', 'cluster_size=2M'], 'xxh64'],
      [['-o', 'cluster_size=64k,extended_l2=on'], 'sha256'],
    ] as const) {
      const x = join(dir, `parts-${extra[1]}.qcow2`);
      makeImage(x, { size: 9 * MiB + 4096, extra: [...extra] });
      io(x, `write -P 0x31 ${MiB - 2048} 6144`);
      io(x, `write -P 0x32 ${9 * MiB} 4096`);
      const ours = await digestLayer(x, { extentBytes: 4 * MiB, partBytes: MiB, algorithm });
      expect(ours.extents, extra[1]).toEqual(recomputeDigests(x, dir, 4 * MiB, algorithm, MiB).extents);
    }
  });

  it('a disk size that is not a cluster multiple, other cluster sizes, the default 64 MiB extent', async () => {
    for (const cs of [4096, 65536, 2 * MiB]) {
      const img = join(dir, `odd-${cs}.qcow2`);
      makeImage(img, { size: 70 * MiB + 3 * 512, extra: ['-o', `cluster_size=${cs}`] });
      io(img, `write -P 0x66 0 ${3 * 65536}`);
      io(img, `write -P 0x67 ${70 * MiB} 1536`);
      const ours = await digestLayer(img);
      expect(ours.extents).toEqual(recomputeDigests(img, dir).extents);
      expect(ours.extents.map((e) => e.index)).toEqual([0, 1]);
    }
  });
});
