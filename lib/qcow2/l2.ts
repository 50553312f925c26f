// L1 and L2 table entries (docs/qcow2-notes.md §2.2, §2.4): one codec for the reader and the
// writer. Pure layout, no policy: whether an entry makes sense in its image (alignment, inside
// the file, bitmaps that agree) is checked by the reader (image.ts).

/** Host offsets live in bits 9..55 of L1 and standard L2 entries. */
export const OFFSET_MASK = 0x00fffffffffffe00n;
export const COPIED = 1n << 63n;
export const COMPRESSED = 1n << 62n;
export const ZERO_FLAG = 1n;

/** What the layout of an L2 entry depends on. */
export interface L2Layout {
  clusterBits: number;
  extendedL2: boolean;
}

/** One L2 entry. The decoder fills a caller's object, so a scan over a disk allocates nothing. */
export interface L2Entry {
  type: 'standard' | 'compressed';
  /** Standard: host offset of the cluster (0: none). Compressed: host byte offset of the stream. */
  host: number;
  /**
   * Subclusters with data / reading as zeros: the extended-L2 bitmaps. Without extended L2 one
   * bit: `zero` is the zero flag, `alloc` is 1 for a host offset without it. Compressed: the
   * bitmap word as stored (0 when valid).
   */
  alloc: number;
  zero: number;
  /** Bit 63: refcount exactly 1. */
  copied: boolean;
  /** Compressed: 512-byte sectors stored after the one the offset is in. */
  sectors: number;
}

/** Bytes per L2 entry. */
export function l2EntrySize(layout: L2Layout): number {
  return layout.extendedL2 ? 16 : 8;
}

export function emptyL2Entry(): L2Entry {
  return { type: 'standard', host: 0, alloc: 0, zero: 0, copied: false, sectors: 0 };
}

/**
 * Decode entry `index` of an L2 table into `out`. Plain 32-bit arithmetic on the hot path
 * (standard entries); BigInt only for compressed descriptors, whose offset may exceed 2^53 in
 * a corrupt image (it comes back rounded; the reader refuses anything outside the file).
 */
export function decodeL2Entry(table: Buffer, index: number, layout: L2Layout, out: L2Entry): L2Entry {
  const at = index * l2EntrySize(layout);
  const hi = table.readUInt32BE(at);
  const lo = table.readUInt32BE(at + 4);
  out.copied = (hi & 0x80000000) !== 0;
  out.sectors = 0;
  if (hi & 0x40000000) {
    const e = table.readBigUInt64BE(at);
    const x = BigInt(70 - layout.clusterBits); // 62 - (cluster_bits - 8)
    out.type = 'compressed';
    out.host = Number(e & ((1n << x) - 1n));
    out.sectors = Number((e >> x) & ((1n << BigInt(layout.clusterBits - 8)) - 1n));
    out.alloc = layout.extendedL2 ? table.readUInt32BE(at + 12) : 0;
    out.zero = layout.extendedL2 ? table.readUInt32BE(at + 8) : 0;
    return out;
  }
  out.type = 'standard';
  out.host = (hi & 0x00ffffff) * 0x100000000 + ((lo & 0xfffffe00) >>> 0);
  if (layout.extendedL2) {
    out.alloc = table.readUInt32BE(at + 12);
    out.zero = table.readUInt32BE(at + 8);
  } else if (lo & 1) {
    out.alloc = 0;
    out.zero = 1;
  } else {
    out.alloc = out.host ? 1 : 0;
    out.zero = 0;
  }
  return out;
}

/**
 * How many entries from `index` on (at most `max`) are all zero bytes: unallocated, with
 * nothing to decode or check. Read as 32-bit words through a typed view (no call into C++ per
 * entry or per block, no decode), so a scan of a huge sparse disk costs a few word loads per
 * empty entry.
 */
export function zeroEntries(table: Buffer, index: number, max: number, layout: L2Layout): number {
  const es = l2EntrySize(layout);
  const start = index * es;
  // Most often the very first entry holds something: answered without a view.
  if (max <= 0 || table.readUInt32BE(start) !== 0 || table.readUInt32BE(start + 4) !== 0) return 0;
  if (table.byteOffset % 4 !== 0) {
    // Not word-aligned (a table buffer never is, in practice): entry by entry.
    let at = start;
    const limit = start + max * es;
    while (at < limit && table.readInt32LE(at) === 0 && table.readInt32LE(at + 4) === 0 && (es === 8 || isZero16Tail(table, at))) at += es;
    return (at - start) / es;
  }
  const w = new Int32Array(table.buffer, table.byteOffset, table.length >>> 2);
  const first = start >>> 2;
  const end = first + (max * es) / 4;
  let k = first;
  if (es === 8) while (k < end && (w[k]! | w[k + 1]!) === 0) k += 2;
  else while (k < end && (w[k]! | w[k + 1]! | w[k + 2]! | w[k + 3]!) === 0) k += 4;
  return ((k - first) * 4) / es;
}

/** Bytes 8..15 of an extended L2 entry are zero. */
function isZero16Tail(table: Buffer, at: number): boolean {
  return table.readInt32LE(at + 8) === 0 && table.readInt32LE(at + 12) === 0;
}

/** Encode `e` as entry `index` of an L2 table (both words with extended L2). */
export function encodeL2Entry(table: Buffer, index: number, layout: L2Layout, e: L2Entry): void {
  const at = index * l2EntrySize(layout);
  let word: bigint;
  if (e.type === 'compressed') {
    const x = BigInt(70 - layout.clusterBits);
    word = COMPRESSED | (BigInt(e.sectors) << x) | BigInt(e.host);
  } else {
    word = BigInt(e.host);
    if (!layout.extendedL2 && e.zero & 1) word |= ZERO_FLAG;
  }
  if (e.copied) word |= COPIED;
  table.writeBigUInt64BE(word, at);
  if (layout.extendedL2) {
    table.writeUInt32BE(e.zero >>> 0, at + 8);
    table.writeUInt32BE(e.alloc >>> 0, at + 12);
  }
}

/** Bytes to read for a compressed cluster (clamped to EOF by the reader). */
export function compressedBytes(e: L2Entry): number {
  return (e.sectors + 1) * 512 - (e.host & 511);
}

/** L2 table offset in L1 entry `index` (bits 9..55; 0: unallocated). */
export function l1EntryOffset(l1: Buffer, index: number): number {
  return (l1.readUInt32BE(index * 8) & 0x00ffffff) * 0x100000000 + ((l1.readUInt32BE(index * 8 + 4) & 0xfffffe00) >>> 0);
}

/** Bit 63 of L1 entry `index`: the L2 table's refcount is exactly 1. */
export function l1EntryCopied(l1: Buffer, index: number): boolean {
  return (l1.readUInt32BE(index * 8) & 0x80000000) !== 0;
}

export function encodeL1Entry(l1: Buffer, index: number, l2Offset: number, copied: boolean): void {
  l1.writeBigUInt64BE(BigInt(l2Offset) | (copied ? COPIED : 0n), index * 8);
}
