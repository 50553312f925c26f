// Refcount block entries of every width (refcount_order 0..6). Sub-byte widths are
// packed from the least significant bits of each byte; 8 bits and more are big-endian.
import { zeroEntries, type L2Layout } from './l2.js';

export function refcountBits(order: number): number {
  return 1 << order;
}

/** Entries per refcount block for a cluster size and refcount order. */
export function entriesPerBlock(clusterSize: number, order: number): number {
  return (clusterSize * 8) >> order;
}

export function getRefcount(block: Buffer, index: number, order: number): bigint {
  switch (order) {
    case 3:
      return BigInt(block[index]!);
    case 4:
      return BigInt(block.readUInt16BE(index * 2));
    case 5:
      return BigInt(block.readUInt32BE(index * 4));
    case 6:
      return block.readBigUInt64BE(index * 8);
    default: {
      const bits = 1 << order;
      const perByte = 8 / bits;
      const byte = block[Math.floor(index / perByte)]!;
      const shift = (index % perByte) * bits;
      return BigInt((byte >> shift) & ((1 << bits) - 1));
    }
  }
}

export function setRefcount(block: Buffer, index: number, order: number, value: bigint): void {
  switch (order) {
    case 3:
      block[index] = Number(value);
      return;
    case 4:
      block.writeUInt16BE(Number(value), index * 2);
      return;
    case 5:
      block.writeUInt32BE(Number(value), index * 4);
      return;
    case 6:
      block.writeBigUInt64BE(value, index * 8);
      return;
    default: {
      const bits = 1 << order;
      const perByte = 8 / bits;
      const at = Math.floor(index / perByte);
      const shift = (index % perByte) * bits;
      const mask = ((1 << bits) - 1) << shift;
      block[at] = (block[at]! & ~mask) | ((Number(value) << shift) & mask);
    }
  }
}

/** Byte range of `block` that holds entries [from, to). */
export function entryByteSpan(from: number, to: number, order: number): [number, number] {
  if (order >= 3) {
    const w = 1 << (order - 3);
    return [from * w, to * w];
  }
  const perByte = 8 >> order;
  return [Math.floor(from / perByte), Math.ceil(to / perByte)];
}

/** Refcount table entry `i` as stored: a refcount block's offset (bits 9..63), 0 for none. */
export function refTableEntry(table: Buffer, i: number): bigint {
  return table.readBigUInt64BE(i * 8);
}

/**
 * How many refcount table entries from `i` on (at most `max`) are empty (no block): a run of
 * them skipped a word at a time (8-byte entries, read as a standard L2 table's), so a walk of
 * the whole table costs no BigInt, call or await per empty entry.
 */
export function emptyRefTableEntries(table: Buffer, i: number, max: number): number {
  return zeroEntries(table, i, max, EIGHT_BYTE_ENTRIES);
}
const EIGHT_BYTE_ENTRIES: L2Layout = { clusterBits: 16, extendedL2: false };

export function encodeRefTableEntry(table: Buffer, i: number, blockOffset: number): void {
  table.writeBigUInt64BE(BigInt(blockOffset), i * 8);
}

/** Index of the last entry of `block` with a nonzero refcount, -1 if none (a byte scan, no BigInt). */
export function lastNonzeroEntry(block: Buffer, order: number): number {
  let b = block.length - 1;
  while (b >= 0 && block[b] === 0) b--;
  if (b < 0) return -1;
  if (order >= 3) return Math.floor(b / (1 << (order - 3)));
  const bits = 1 << order;
  const high = 31 - Math.clz32(block[b]!); // highest set bit of the byte; entries fill from bit 0
  return b * (8 / bits) + Math.floor(high / bits);
}
