// Round-trip properties of the qcow2 codecs: the header (and each in-place field patch), L1 and
// L2 entries, and refcount entries of every width. decode(encode(x)) = x for valid values, and
// encode(decode(bytes)) = bytes for valid encodings.
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import {
  decodeHeader,
  encodeAutoclear,
  encodeBackingFormatExtension,
  encodeBackingPointer,
  encodeHeader,
  encodeRefcountTablePointer,
  EXT_BACKING_FORMAT,
  EXT_END,
  HEADER_FIELDS,
  V2_HEADER_LENGTH,
  type HeaderExtension,
  type HeaderPatch,
  type Qcow2Header,
} from '../../lib/qcow2/header.js';
import {
  decodeL2Entry,
  emptyL2Entry,
  encodeL1Entry,
  encodeL2Entry,
  l1EntryCopied,
  l1EntryOffset,
  l2EntrySize,
  zeroEntries,
  type L2Entry,
  type L2Layout,
} from '../../lib/qcow2/l2.js';
import { encodeRefTableEntry, entryByteSpan, getRefcount, refTableEntry, setRefcount } from '../../lib/qcow2/refcount.js';
import { numRuns } from './gen.js';

const runs = numRuns(300);
const u32 = fc.integer({ min: 0, max: 0xffffffff });
const u64 = fc.bigInt({ min: 0n, max: (1n << 64n) - 1n });
const bytes = (max: number): fc.Arbitrary<Buffer> => fc.uint8Array({ maxLength: max }).map((a) => Buffer.from(a));
const name = (max: number): fc.Arbitrary<string> =>
  fc.string({ unit: 'grapheme', minLength: 1, maxLength: max }).filter((s) => Buffer.byteLength(s) <= 1023);

function apply(buf: Buffer, p: HeaderPatch): Buffer {
  p.bytes.copy(buf, p.offset);
  return buf;
}

/** A header as decodeHeader returns it: derived fields (name offset, end marker) from encodeHeader. */
const headerArb: fc.Arbitrary<Qcow2Header> = fc
  .record({
    v3: fc.boolean(),
    clusterBits: fc.integer({ min: 9, max: 21 }),
    size: u64,
    cryptMethod: u32,
    l1Size: u32,
    l1TableOffset: u64,
    refcountTableOffset: u64,
    refcountTableClusters: u32,
    nbSnapshots: u32,
    snapshotsOffset: u64,
    incompatibleFeatures: u64,
    compatibleFeatures: u64,
    autoclearFeatures: u64,
    refcountOrder: fc.integer({ min: 0, max: 6 }),
    extraFields: fc.integer({ min: 0, max: 12 }),
    tail: bytes(96),
    extensions: fc.array(fc.record({ type: u32.filter((t) => t !== EXT_END && t !== EXT_BACKING_FORMAT), data: bytes(40) }), {
      maxLength: 4,
    }),
    backingFile: fc.option(name(64)),
    backingFormat: fc.option(name(16)),
    formatAt: fc.nat(),
  })
  .map((r) => {
    const headerLength = r.v3 ? 104 + 8 * r.extraFields : V2_HEADER_LENGTH;
    const headerTail = r.v3 ? Buffer.concat([r.tail, Buffer.alloc(96)]).subarray(0, headerLength - 104) : Buffer.alloc(0);
    const backingFormat = r.backingFile === null ? null : r.backingFormat;
    const extensions: HeaderExtension[] = [...r.extensions];
    if (backingFormat !== null)
      extensions.splice(r.formatAt % (extensions.length + 1), 0, { type: EXT_BACKING_FORMAT, data: Buffer.from(backingFormat) });
    const h: Qcow2Header = {
      version: r.v3 ? 3 : 2,
      backingFileOffset: 0,
      backingFileSize: 0,
      clusterBits: r.clusterBits,
      clusterSize: 1 << r.clusterBits,
      size: r.size,
      cryptMethod: r.cryptMethod,
      l1Size: r.l1Size,
      l1TableOffset: r.l1TableOffset,
      refcountTableOffset: r.refcountTableOffset,
      refcountTableClusters: r.refcountTableClusters,
      nbSnapshots: r.nbSnapshots,
      snapshotsOffset: r.snapshotsOffset,
      incompatibleFeatures: r.v3 ? r.incompatibleFeatures : 0n,
      compatibleFeatures: r.v3 ? r.compatibleFeatures : 0n,
      autoclearFeatures: r.v3 ? r.autoclearFeatures : 0n,
      refcountOrder: r.v3 ? r.refcountOrder : 4,
      headerLength,
      compressionType: headerTail.length ? headerTail[0]! : 0,
      extensions,
      headerTail,
      extensionsEnd: 0,
      backingFile: r.backingFile,
      backingFormat,
    };
    return h;
  })
  .filter((h) => {
    try {
      const enc = encodeHeader(h);
      h.backingFileOffset = enc.backingFileOffset;
      h.backingFileSize = enc.backingFileSize;
      h.extensionsEnd = enc.extensionsEnd;
      return true;
    } catch (e) {
      if ((e as { code?: string }).code === 'QCOW2_HEADER_FULL') return false; // does not fit a 512-byte cluster
      throw e;
    }
  });

/** Encoded into a whole first cluster, as read from an image. */
const cluster0 = (h: Qcow2Header, bytes = encodeHeader(h).bytes): Buffer =>
  Buffer.concat([bytes, Buffer.alloc(h.clusterSize - bytes.length)]);

describe('header codec', () => {
  it('decode(encode(h)) = h', () => {
    fc.assert(
      fc.property(headerArb, (h) => {
        expect(decodeHeader(encodeHeader(h).bytes)).toEqual(h);
        expect(decodeHeader(cluster0(h))).toEqual(h);
      }),
      { numRuns: runs },
    );
  });

  it('encode(decode(bytes)) = bytes', () => {
    fc.assert(
      fc.property(headerArb, (h) => {
        const b = encodeHeader(h).bytes;
        expect(encodeHeader(decodeHeader(cluster0(h, b))).bytes.equals(b)).toBe(true);
      }),
      { numRuns: runs },
    );
  });

  it('every fixed field sits where the field table says', () => {
    fc.assert(
      fc.property(headerArb, (h) => {
        const b = encodeHeader(h).bytes;
        for (const [field, { offset, width }] of Object.entries(HEADER_FIELDS)) {
          if (offset >= V2_HEADER_LENGTH && h.version === 2) continue;
          const raw = width === 8 ? b.readBigUInt64BE(offset) : BigInt(b.readUInt32BE(offset));
          const want = field === 'magic' ? 0x514649fbn : BigInt(h[field as Exclude<keyof typeof HEADER_FIELDS, 'magic'>]);
          expect(raw, field).toBe(want);
        }
      }),
      { numRuns: runs },
    );
  });

  it('a field patch applied to an encoded header = encoding the updated header', () => {
    fc.assert(
      fc.property(headerArb, u64, u64, u32, (h, autoclear, rtOff, rtClusters) => {
        const enc = encodeHeader(h).bytes;
        // With the header's own values a patch changes nothing.
        if (h.refcountTableOffset <= BigInt(Number.MAX_SAFE_INTEGER))
          expect(
            apply(Buffer.from(enc), encodeRefcountTablePointer(Number(h.refcountTableOffset), h.refcountTableClusters)).equals(enc),
          ).toBe(true);
        expect(apply(Buffer.from(enc), encodeBackingPointer(h.backingFileOffset, h.backingFileSize)).equals(enc)).toBe(true);
        const off = Number(rtOff & BigInt(Number.MAX_SAFE_INTEGER));
        expect(
          apply(Buffer.from(enc), encodeRefcountTablePointer(off, rtClusters)).equals(
            encodeHeader({ ...h, refcountTableOffset: BigInt(off), refcountTableClusters: rtClusters }).bytes,
          ),
        ).toBe(true);
        if (h.version === 3) {
          expect(apply(Buffer.from(enc), encodeAutoclear(h.autoclearFeatures)).equals(enc)).toBe(true);
          expect(
            apply(Buffer.from(enc), encodeAutoclear(autoclear)).equals(encodeHeader({ ...h, autoclearFeatures: autoclear }).bytes),
          ).toBe(true);
        }
      }),
      { numRuns: runs },
    );
  });

  it("the rebase commit's patches (name, backing pointer, format extension) = encoding the new header", () => {
    fc.assert(
      fc.property(headerArb, name(64), name(16), (h, newName, format) => {
        // The old header: any backing name (or none), no backing-format extension.
        const h0 = { ...h, extensions: h.extensions.filter((e) => e.type !== EXT_BACKING_FORMAT), backingFormat: null };
        const old = encodeHeader(h0);
        const want = encodeHeader(h0, { backingFile: newName, backingFormat: format });
        fc.pre(want.bytes.length <= h0.clusterSize);
        const img = cluster0(h0, old.bytes);
        const n = Buffer.from(newName);
        // In commit order: the name into free space, the pointer switch, then the extension.
        n.copy(img, want.backingFileOffset);
        apply(img, encodeBackingPointer(want.backingFileOffset, n.length));
        const ext = encodeBackingFormatExtension(old.extensionsEnd, format);
        apply(img, ext.body);
        apply(img, ext.head);
        expect(img.subarray(0, want.bytes.length).equals(want.bytes)).toBe(true);
        expect(decodeHeader(img)).toMatchObject({ backingFile: newName, backingFormat: format });
      }),
      { numRuns: runs },
    );
  });
});

// ---- L1 and L2 entries -----------------------------------------------------------------------

const layoutArb: fc.Arbitrary<L2Layout> = fc
  .record({ clusterBits: fc.integer({ min: 9, max: 21 }), extendedL2: fc.boolean() })
  .map((l) => ({ ...l, extendedL2: l.extendedL2 && l.clusterBits >= 14 }));

/** Host offsets of L1/standard L2 entries: bits 9..55. */
const hostArb = fc.bigInt({ min: 0n, max: (1n << 47n) - 1n }).map((k) => Number(k << 9n));

function entryArb(layout: L2Layout): fc.Arbitrary<L2Entry> {
  const standard = layout.extendedL2
    ? fc
        .record({ host: hostArb, alloc: u32, zero: u32, copied: fc.boolean() })
        .map((r) => ({ type: 'standard' as const, ...r, sectors: 0 }))
    : fc.record({ host: hostArb, zeroFlag: fc.boolean(), copied: fc.boolean() }).map((r) => ({
        type: 'standard' as const,
        host: r.host,
        alloc: r.zeroFlag || r.host === 0 ? 0 : 1,
        zero: r.zeroFlag ? 1 : 0,
        copied: r.copied,
        sectors: 0,
      }));
  // Compressed: a byte offset in bits 0..x-1 (below 2^53, the engine's limit), sectors above it.
  const x = 70 - layout.clusterBits;
  const compressed = fc
    .record({
      host: fc.bigInt({ min: 0n, max: (1n << BigInt(Math.min(x, 53))) - 1n }).map(Number),
      sectors: fc.integer({ min: 0, max: 2 ** (layout.clusterBits - 8) - 1 }),
      bitmaps: layout.extendedL2 ? fc.tuple(u32, u32) : fc.constant<[number, number]>([0, 0]),
      copied: fc.boolean(),
    })
    .map((r) => ({
      type: 'compressed' as const,
      host: r.host,
      alloc: r.bitmaps[0],
      zero: r.bitmaps[1],
      copied: r.copied,
      sectors: r.sectors,
    }));
  return fc.oneof(standard, compressed);
}

/** A valid stored entry: reserved bits clear, offsets below 2^53 where they are bytes. */
function storedArb(layout: L2Layout): fc.Arbitrary<Buffer> {
  const x = BigInt(70 - layout.clusterBits);
  return fc.tuple(u64, fc.boolean(), u64).map(([w, compressed, bm]) => {
    let word: bigint;
    if (compressed) {
      const hostBits = x < 53n ? x : 53n;
      const host = w & ((1n << hostBits) - 1n);
      const sectors = (w >> x) & ((1n << BigInt(layout.clusterBits - 8)) - 1n);
      word = (1n << 62n) | (sectors << x) | host;
    } else {
      word = w & ((1n << 63n) | 0x00fffffffffffe00n | (layout.extendedL2 ? 0n : 1n));
    }
    const b = Buffer.alloc(l2EntrySize(layout));
    b.writeBigUInt64BE(word);
    if (layout.extendedL2) b.writeBigUInt64BE(bm, 8);
    return b;
  });
}

describe('L2 entry codec', () => {
  it('decode(encode(e)) = e, and neighbouring entries are untouched', () => {
    fc.assert(
      fc.property(
        layoutArb.chain((layout) =>
          fc.tuple(
            fc.constant(layout),
            entryArb(layout),
            fc.integer({ min: 0, max: 7 }),
            fc.uint8Array({ minLength: 128, maxLength: 128 }),
          ),
        ),
        ([layout, e, index, noise]) => {
          const table = Buffer.from(noise);
          const before = Buffer.from(table);
          encodeL2Entry(table, index, layout, e);
          expect(decodeL2Entry(table, index, layout, emptyL2Entry())).toEqual(e);
          const size = l2EntrySize(layout);
          expect(table.subarray(0, index * size).equals(before.subarray(0, index * size))).toBe(true);
          expect(table.subarray((index + 1) * size).equals(before.subarray((index + 1) * size))).toBe(true);
        },
      ),
      { numRuns: runs },
    );
  });

  it('encode(decode(bytes)) = bytes', () => {
    fc.assert(
      fc.property(
        layoutArb.chain((layout) => fc.tuple(fc.constant(layout), storedArb(layout))),
        ([layout, stored]) => {
          const out = Buffer.alloc(stored.length);
          encodeL2Entry(out, 0, layout, decodeL2Entry(stored, 0, layout, emptyL2Entry()));
          expect(out.equals(stored)).toBe(true);
        },
      ),
      { numRuns: runs },
    );
  });

  it('decodes the layouts of the specification', () => {
    const std: L2Layout = { clusterBits: 16, extendedL2: false };
    const t = Buffer.alloc(16);
    t.writeBigUInt64BE((1n << 63n) | 0x30000n);
    expect(decodeL2Entry(t, 0, std, emptyL2Entry())).toEqual({
      type: 'standard',
      host: 0x30000,
      alloc: 1,
      zero: 0,
      copied: true,
      sectors: 0,
    });
    t.writeBigUInt64BE(0x30001n); // preallocated zero cluster
    expect(decodeL2Entry(t, 0, std, emptyL2Entry())).toMatchObject({ host: 0x30000, alloc: 0, zero: 1 });
    // 64 KiB clusters: x = 54; 3 more sectors, stream at byte 0x12345.
    t.writeBigUInt64BE((1n << 62n) | (3n << 54n) | 0x12345n);
    expect(decodeL2Entry(t, 0, std, emptyL2Entry())).toMatchObject({ type: 'compressed', host: 0x12345, sectors: 3 });
    const ext: L2Layout = { clusterBits: 16, extendedL2: true };
    t.writeBigUInt64BE(0x50000n, 0);
    t.writeBigUInt64BE((0xf0n << 32n) | 0x0fn, 8); // zero bitmap high word, allocation bitmap low word
    expect(decodeL2Entry(t, 0, ext, emptyL2Entry())).toEqual({
      type: 'standard',
      host: 0x50000,
      alloc: 0x0f,
      zero: 0xf0,
      copied: false,
      sectors: 0,
    });
  });
});

describe('zeroEntries (the scan over unallocated entries)', () => {
  it('= a naive count of all-zero entries from an index, both layouts, any table size and limit', () => {
    fc.assert(
      fc.property(
        fc.boolean(),
        fc.integer({ min: 9, max: 16 }),
        // Runs of zero entries and single set bytes at random places (any byte of an entry).
        fc.array(fc.tuple(fc.nat(), fc.integer({ min: 1, max: 255 })), { maxLength: 6 }),
        fc.nat(),
        fc.nat(),
        // Where the table starts in its memory: word-aligned or not (the typed view or the fallback).
        fc.integer({ min: 0, max: 7 }),
        (extendedL2, bits, marks, i, m, shift) => {
          const layout: L2Layout = { clusterBits: bits, extendedL2 };
          const es = l2EntrySize(layout);
          const table = Buffer.alloc((1 << bits) + 8).subarray(shift, shift + (1 << bits));
          const entries = table.length / es;
          for (const [at, v] of marks) table[at % table.length] = v;
          const index = i % entries;
          const max = m % (entries - index + 1);
          let naive = 0;
          while (naive < max && table.subarray((index + naive) * es, (index + naive + 1) * es).every((b) => b === 0)) naive++;
          expect(zeroEntries(table, index, max, layout)).toBe(naive);
        },
      ),
      { numRuns: 500 },
    );
  });
});

describe('L1 entry codec', () => {
  it('decode(encode(offset, copied)) = (offset, copied)', () => {
    fc.assert(
      fc.property(hostArb, fc.boolean(), fc.integer({ min: 0, max: 7 }), (off, copied, i) => {
        const l1 = Buffer.alloc(64, 0xa5);
        encodeL1Entry(l1, i, off, copied);
        expect(l1EntryOffset(l1, i)).toBe(off);
        expect(l1EntryCopied(l1, i)).toBe(copied);
      }),
      { numRuns: runs },
    );
  });

  it('encode(decode(bytes)) = bytes', () => {
    fc.assert(
      fc.property(u64, (w) => {
        const stored = Buffer.alloc(8);
        stored.writeBigUInt64BE(w & ((1n << 63n) | 0x00fffffffffffe00n));
        const out = Buffer.alloc(8);
        encodeL1Entry(out, 0, l1EntryOffset(stored, 0), l1EntryCopied(stored, 0));
        expect(out.equals(stored)).toBe(true);
      }),
      { numRuns: runs },
    );
  });
});

// ---- refcount entries ------------------------------------------------------------------------

describe('refcount entries of every width', () => {
  it('get(set(v)) = v, and no other entry changes', () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 0, max: 6 }),
        fc.integer({ min: 0, max: 15 }),
        u64,
        fc.uint8Array({ minLength: 128, maxLength: 128 }),
        (order, idx, v, noise) => {
          const block = Buffer.from(noise);
          const val = v & ((1n << BigInt(1 << order)) - 1n);
          const n = (128 * 8) >> order;
          const all = (): bigint[] => Array.from({ length: n }, (_, k) => getRefcount(block, k, order));
          const want = all();
          want[idx] = val;
          setRefcount(block, idx, order, val);
          expect(all()).toEqual(want);
          const [s, e] = entryByteSpan(idx, idx + 1, order);
          expect(Buffer.compare(block.subarray(0, s), Buffer.from(noise).subarray(0, s))).toBe(0);
          expect(Buffer.compare(block.subarray(e), Buffer.from(noise).subarray(e))).toBe(0);
        },
      ),
      { numRuns: runs },
    );
  });

  it('set(get(bytes)) = bytes for whole blocks', () => {
    fc.assert(
      fc.property(fc.integer({ min: 0, max: 6 }), fc.uint8Array({ minLength: 64, maxLength: 64 }), (order, stored) => {
        const out = Buffer.alloc(64);
        const src = Buffer.from(stored);
        for (let k = 0; k < (64 * 8) >> order; k++) setRefcount(out, k, order, getRefcount(src, k, order));
        expect(out.equals(src)).toBe(true);
      }),
      { numRuns: runs },
    );
  });
});

describe('refcount table entries', () => {
  it('decode(encode(offset)) = offset, and encode(decode(bytes)) = bytes', () => {
    fc.assert(
      fc.property(hostArb, fc.integer({ min: 0, max: 7 }), u64, (off, i, w) => {
        const t = Buffer.alloc(64, 0x5a);
        encodeRefTableEntry(t, i, off);
        expect(refTableEntry(t, i)).toBe(BigInt(off));
        const stored = Buffer.alloc(8);
        stored.writeBigUInt64BE(w & ~0x1ffn & ((1n << 53n) - 1n)); // block offsets: bits 9..52 in an engine-readable image
        const out = Buffer.alloc(8);
        encodeRefTableEntry(out, 0, Number(refTableEntry(stored, 0)));
        expect(out.equals(stored)).toBe(true);
      }),
      { numRuns: runs },
    );
  });
});
