// Persistent dirty bitmaps of a qcow2 image, read natively: the bitmaps header extension,
// the bitmap directory, the bitmap tables and their data clusters, turned into the guest
// ranges a bitmap marks dirty. Every size taken from the file is bounded (by QEMU's own
// limits) before anything is allocated, and what QEMU would refuse to load is refused here
// with a coded Qcow2Error.
import { Qcow2Error } from './errors.js';
import { AUTOCLEAR_BITMAPS, EXT_BITMAPS } from './header.js';
import { rangesOverlap, safeNumber, type Qcow2Image } from './image.js';

/** Bitmap directory entry flags. */
export const BME_FLAG_IN_USE = 1;
export const BME_FLAG_AUTO = 2;
export const BME_FLAG_EXTRA_DATA_COMPATIBLE = 4;
const BME_RESERVED_FLAGS = ~(BME_FLAG_IN_USE | BME_FLAG_AUTO | BME_FLAG_EXTRA_DATA_COMPATIBLE) >>> 0;
/** The one bitmap type the specification defines. */
export const BITMAP_TYPE_DIRTY_TRACKING = 1;

/** QEMU's limits (block/qcow2-bitmap.c, block/qcow2.h). */
export const MIN_GRANULARITY_BITS = 9;
export const MAX_GRANULARITY_BITS = 31;
export const MAX_BITMAPS = 65535;
export const MAX_BITMAP_NAME = 1023;
export const MAX_BITMAP_DIRECTORY = 1024 * MAX_BITMAPS;
/** Bytes of bitmap data (table entries × cluster size) one bitmap may have. */
export const MAX_BITMAP_PHYS_BYTES = 512 << 20;
const DIR_ENTRY_FIXED = 24;
const TABLE_RESERVED = 0xff000000000001fen;
const TABLE_OFFSET_MASK = 0x00fffffffffffe00n;
const TABLE_ALL_ONES = 1n;

export interface BitmapsExtension {
  count: number;
  directorySize: number;
  directoryOffset: number;
}

/** One entry of the bitmap directory. */
export interface DirtyBitmap {
  name: string;
  /** Raw flags word. */
  flags: number;
  /** Not saved correctly (QEMU had the image open, or crashed): its content may be stale. */
  inUse: boolean;
  /** Enabled: every write to the image is recorded in it. */
  auto: boolean;
  type: number;
  granularityBits: number;
  /** Guest bytes one bit covers. */
  granularity: number;
  tableOffset: number;
  /** Entries of the bitmap table (one per data cluster). */
  tableSize: number;
  extraDataSize: number;
}

/** What the header says about bitmaps. */
export type BitmapDirectory =
  /** No bitmaps extension (or a v2 image). */
  | { state: 'none'; bitmaps: [] }
  /** The extension is there but autoclear bit 0 is clear: some writer ignored the bitmaps, every one is stale. */
  | { state: 'stale'; bitmaps: [] }
  | { state: 'present'; bitmaps: DirtyBitmap[] };

/** A guest byte range. */
export interface GuestRange {
  offset: number;
  length: number;
}

function corrupt(img: Qcow2Image, msg: string): Qcow2Error {
  return new Qcow2Error('QCOW2_CORRUPT', msg, img.path);
}

/** Decode the bitmaps extension (24 bytes), validated against the image. */
export function decodeBitmapsExtension(img: Qcow2Image, data: Buffer): BitmapsExtension {
  if (data.length !== 24) throw corrupt(img, `bitmaps extension has length ${data.length}, not 24`);
  const count = data.readUInt32BE(0);
  if (data.readUInt32BE(4) !== 0) throw corrupt(img, 'bitmaps extension: reserved field is not zero');
  const directorySize = safeNumber(data.readBigUInt64BE(8), 'bitmap directory size', img.path);
  const directoryOffset = safeNumber(data.readBigUInt64BE(16), 'bitmap directory offset', img.path);
  if (count === 0) throw corrupt(img, 'bitmaps extension with no bitmaps');
  if (count > MAX_BITMAPS) throw new Qcow2Error('QCOW2_TOO_LARGE', `${count} bitmaps (at most ${MAX_BITMAPS})`, img.path);
  if (directorySize > MAX_BITMAP_DIRECTORY)
    throw new Qcow2Error('QCOW2_TOO_LARGE', `bitmap directory of ${directorySize} bytes is too large`, img.path);
  if (directorySize < count * DIR_ENTRY_FIXED)
    throw corrupt(img, `bitmap directory of ${directorySize} bytes cannot hold ${count} entries`);
  if (directoryOffset === 0 || directoryOffset % img.clusterSize !== 0)
    throw corrupt(img, `bitmap directory offset ${directoryOffset} is not cluster-aligned or overlaps the header`);
  if (directoryOffset + directorySize > img.fileSize) throw corrupt(img, 'bitmap directory extends past the end of the file');
  return { count, directorySize, directoryOffset };
}

/** Entries of the bitmap table a bitmap of `granularity` needs for the image's virtual size. */
export function expectedTableSize(virtualSize: number, granularityBits: number, clusterSize: number): number {
  const bits = Math.ceil(virtualSize / 2 ** granularityBits);
  return Math.ceil(bits / (clusterSize * 8));
}

/** Decode and check the directory (as QEMU's bitmap_list_load and check_constraints do). */
export function decodeBitmapDirectory(img: Qcow2Image, ext: BitmapsExtension, dir: Buffer): DirtyBitmap[] {
  const out: DirtyBitmap[] = [];
  const names = new Set<string>();
  let off = 0;
  for (let i = 0; i < ext.count; i++) {
    if (off + DIR_ENTRY_FIXED > dir.length) throw corrupt(img, `bitmap directory truncated at entry ${i}`);
    const tableOffset = safeNumber(dir.readBigUInt64BE(off), 'bitmap table offset', img.path);
    const tableSize = dir.readUInt32BE(off + 8);
    const flags = dir.readUInt32BE(off + 12);
    const type = dir[off + 16]!;
    const granularityBits = dir[off + 17]!;
    const nameSize = dir.readUInt16BE(off + 18);
    const extraDataSize = dir.readUInt32BE(off + 20);
    const nameAt = off + DIR_ENTRY_FIXED + extraDataSize;
    const end = nameAt + nameSize;
    if (end > dir.length) throw corrupt(img, `bitmap directory entry ${i} overruns the directory`);
    if (nameSize === 0 || nameSize > MAX_BITMAP_NAME) throw corrupt(img, `bitmap directory entry ${i}: invalid name length ${nameSize}`);
    const name = dir.subarray(nameAt, end).toString('utf8');
    const what = `bitmap '${name}'`;
    if (names.has(name)) throw corrupt(img, `${what} appears twice in the bitmap directory`);
    names.add(name);
    if ((flags & BME_RESERVED_FLAGS) !== 0) throw corrupt(img, `${what}: reserved flags 0x${flags.toString(16)} set`);
    if (type !== BITMAP_TYPE_DIRTY_TRACKING) throw corrupt(img, `${what}: unknown bitmap type ${type}`);
    if (granularityBits < MIN_GRANULARITY_BITS || granularityBits > MAX_GRANULARITY_BITS)
      throw corrupt(img, `${what}: granularity bits ${granularityBits} outside ${MIN_GRANULARITY_BITS}..${MAX_GRANULARITY_BITS}`);
    if (tableSize * img.clusterSize > MAX_BITMAP_PHYS_BYTES)
      throw new Qcow2Error('QCOW2_TOO_LARGE', `${what}: ${tableSize} data clusters is more than QEMU allows`, img.path);
    const expected = expectedTableSize(img.virtualSize, granularityBits, img.clusterSize);
    if (tableSize !== expected) throw corrupt(img, `${what}: bitmap table of ${tableSize} entries, the virtual size needs ${expected}`);
    if (tableSize > 0) {
      if (tableOffset === 0 || tableOffset % img.clusterSize !== 0)
        throw corrupt(img, `${what}: bitmap table offset ${tableOffset} is not cluster-aligned or overlaps the header`);
      if (tableOffset + tableSize * 8 > img.fileSize) throw corrupt(img, `${what}: bitmap table extends past the end of the file`);
      if (rangesOverlap(tableOffset, tableSize * 8, ext.directoryOffset, ext.directorySize))
        throw corrupt(img, `${what}: bitmap table overlaps the bitmap directory`);
    }
    out.push({
      name,
      flags,
      inUse: (flags & BME_FLAG_IN_USE) !== 0,
      auto: (flags & BME_FLAG_AUTO) !== 0,
      type,
      granularityBits,
      granularity: 2 ** granularityBits,
      tableOffset,
      tableSize,
      extraDataSize,
    });
    off = Math.ceil(end / 8) * 8;
  }
  if (off !== ext.directorySize) throw corrupt(img, `bitmap directory size ${ext.directorySize} does not match its ${ext.count} entries`);
  return out;
}

/** The image's bitmap directory (only v3 images can carry one). */
export async function readBitmapDirectory(img: Qcow2Image): Promise<BitmapDirectory> {
  const h = img.header;
  const ext = h.version === 3 ? h.extensions.find((e) => e.type === EXT_BITMAPS) : undefined;
  if (!ext) return { state: 'none', bitmaps: [] };
  if ((h.autoclearFeatures & AUTOCLEAR_BITMAPS) === 0n) return { state: 'stale', bitmaps: [] };
  const x = decodeBitmapsExtension(img, ext.data);
  const dir = Buffer.alloc(x.directorySize);
  const n = await img.file.read(dir, 0, dir.length, x.directoryOffset);
  if (n !== dir.length) throw new Qcow2Error('QCOW2_TRUNCATED', 'bitmap directory truncated', img.path);
  return { state: 'present', bitmaps: decodeBitmapDirectory(img, x, dir) };
}

/** Data clusters read per batch while walking a table (bounded memory: at most this many clusters). */
const TABLE_CHUNK_ENTRIES = 4096;

/**
 * The guest ranges `bm` marks dirty, in order, adjacent ones merged, clipped to the virtual
 * size. Reads the table in chunks and one data cluster at a time (memory: one cluster plus
 * 32 KiB). Refuses an in-use bitmap (its content may be stale) unless `allowInUse`.
 */
export async function* dirtyRanges(img: Qcow2Image, bm: DirtyBitmap, opts: { allowInUse?: boolean } = {}): AsyncGenerator<GuestRange> {
  if (bm.inUse && !opts.allowInUse)
    throw new Qcow2Error('QCOW2_UNSUPPORTED_FEATURE', `bitmap '${bm.name}' is in use: its content may be inconsistent`, img.path);
  if (bm.extraDataSize !== 0 && (bm.flags & BME_FLAG_EXTRA_DATA_COMPATIBLE) === 0)
    throw new Qcow2Error('QCOW2_UNSUPPORTED_FEATURE', `bitmap '${bm.name}' has extra data this reader does not understand`, img.path);
  const cs = img.clusterSize;
  const g = bm.granularity;
  const bitsPerCluster = cs * 8;
  const bytesPerEntry = bitsPerCluster * g;
  const size = img.virtualSize;
  const table = Buffer.alloc(Math.min(bm.tableSize, TABLE_CHUNK_ENTRIES) * 8);
  const data = Buffer.alloc(cs);
  const acc: { cur: GuestRange | null } = { cur: null };
  // Merge ranges as they come; yield one once the next starts after a gap.
  const add = function* (start: number, end: number): Generator<GuestRange> {
    const e = Math.min(end, size);
    if (e <= start) return;
    const p = acc.cur;
    if (p && p.offset + p.length === start) p.length = e - p.offset;
    else {
      if (p) yield p;
      acc.cur = { offset: start, length: e - start };
    }
  };
  for (let first = 0; first < bm.tableSize; first += TABLE_CHUNK_ENTRIES) {
    const count = Math.min(TABLE_CHUNK_ENTRIES, bm.tableSize - first);
    const n = await img.file.read(table, 0, count * 8, bm.tableOffset + first * 8);
    if (n !== count * 8) throw new Qcow2Error('QCOW2_TRUNCATED', `bitmap table of '${bm.name}' truncated`, img.path);
    for (let j = 0; j < count; j++) {
      const i = first + j;
      const entry = table.readBigUInt64BE(j * 8);
      if ((entry & TABLE_RESERVED) !== 0n) throw corrupt(img, `bitmap '${bm.name}': table entry ${i} has reserved bits set`);
      const host = Number(entry & TABLE_OFFSET_MASK);
      const base = i * bytesPerEntry;
      if (host === 0) {
        if ((entry & TABLE_ALL_ONES) !== 0n) yield* add(base, base + bytesPerEntry);
        continue;
      }
      if ((entry & TABLE_ALL_ONES) !== 0n)
        throw corrupt(img, `bitmap '${bm.name}': table entry ${i} has a data cluster and the all-ones flag`);
      if (host % cs !== 0 || host < cs || host + cs > img.fileSize)
        throw corrupt(img, `bitmap '${bm.name}': data cluster ${host} (entry ${i}) is misaligned or outside the file`);
      const got = await img.file.read(data, 0, cs, host);
      if (got !== cs) throw new Qcow2Error('QCOW2_TRUNCATED', `bitmap '${bm.name}': data cluster at ${host} truncated`, img.path);
      // Skip zero words fast; within a non-zero byte, bit k (LSB first) is bit 8·byte + k.
      for (let b = 0; b < cs;) {
        if (b + 8 <= cs && data.readBigUInt64LE(b) === 0n) {
          b += 8;
          continue;
        }
        const v = data[b]!;
        if (v === 0xff) {
          const bit = b * 8;
          yield* add(base + bit * g, base + (bit + 8) * g);
        } else if (v !== 0) {
          for (let k = 0; k < 8; k++) {
            if ((v >> k) & 1) {
              const bit = b * 8 + k;
              yield* add(base + bit * g, base + (bit + 1) * g);
            }
          }
        }
        b++;
      }
    }
  }
  if (acc.cur) yield acc.cur;
}

/** Look up one bitmap by name (null when the image has no such bitmap, or its bitmaps are stale). */
export async function findBitmap(img: Qcow2Image, name: string): Promise<DirtyBitmap | null> {
  const d = await readBitmapDirectory(img);
  return d.bitmaps.find((b) => b.name === name) ?? null;
}
