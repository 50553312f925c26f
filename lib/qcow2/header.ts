// qcow2 header codec: the fixed fields of v2/v3 and the extension area, as laid out in the
// qcow2 specification, plus in-place updates of single fields. All integers are big-endian.
import { Qcow2Error } from './errors.js';
import { openImageFile } from './io.js';

export const QCOW2_MAGIC = 0x514649fb;
export const EXT_END = 0x00000000;
export const EXT_BACKING_FORMAT = 0xe2792aca;
export const EXT_FEATURE_TABLE = 0x6803f857;
export const EXT_BITMAPS = 0x23852875;
export const EXT_CRYPTO = 0x0537be77;
export const EXT_DATA_FILE = 0x44415441;

export const V2_HEADER_LENGTH = 72;
/** Incompatible feature bits. */
export const INCOMPAT_DIRTY = 1n << 0n;
export const INCOMPAT_CORRUPT = 1n << 1n;
export const INCOMPAT_DATA_FILE = 1n << 2n;
export const INCOMPAT_COMPRESSION = 1n << 3n;
export const INCOMPAT_EXTL2 = 1n << 4n;
export const INCOMPAT_KNOWN = 0x1fn;
/** Compatible feature bits. */
export const COMPAT_LAZY_REFCOUNTS = 1n << 0n;
/** Autoclear feature bits. */
export const AUTOCLEAR_BITMAPS = 1n << 0n;
export const AUTOCLEAR_DATA_FILE_RAW = 1n << 1n;
export const AUTOCLEAR_KNOWN = 0x3n;
export const V3_MIN_HEADER_LENGTH = 104;
export const MAX_BACKING_NAME = 1023;

export interface HeaderExtension {
  type: number;
  data: Buffer;
}

export interface Qcow2Header {
  version: 2 | 3;
  backingFileOffset: number;
  backingFileSize: number;
  clusterBits: number;
  clusterSize: number;
  size: bigint;
  cryptMethod: number;
  l1Size: number;
  l1TableOffset: bigint;
  refcountTableOffset: bigint;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: bigint;
  incompatibleFeatures: bigint;
  compatibleFeatures: bigint;
  autoclearFeatures: bigint;
  refcountOrder: number;
  headerLength: number;
  compressionType: number;
  extensions: HeaderExtension[];
  /**
   * v3 only: the raw bytes from offset 104 up to header_length (compression type, padding and any
   * additional fields this library does not know), preserved verbatim when the header is rewritten.
   */
  headerTail: Buffer;
  /** Offset of the end-of-extensions marker (or where the extension area stopped). */
  extensionsEnd: number;
  /** Backing file name as stored (null when there is none). */
  backingFile: string | null;
  /** From the backing-format extension, when present. */
  backingFormat: string | null;
}

const need = (buf: Buffer, end: number, what: string): void => {
  if (buf.length < end) throw new Qcow2Error('QCOW2_TRUNCATED', `qcow2 header truncated (${what})`);
};

/**
 * Decode a header from the first cluster (or at least the first 64 KiB) of an image.
 * `buf` must hold everything up to the end of the backing file name.
 */
export function decodeHeader(buf: Buffer): Qcow2Header {
  need(buf, V2_HEADER_LENGTH, 'fixed fields');
  if (buf.readUInt32BE(0) !== QCOW2_MAGIC) throw new Qcow2Error('QCOW2_BAD_MAGIC', 'not a qcow2 image (bad magic)');
  const version = buf.readUInt32BE(4);
  if (version !== 2 && version !== 3) throw new Qcow2Error('QCOW2_UNSUPPORTED_VERSION', `Unsupported qcow2 version ${version}`);
  const backingFileOffset = toSafe(buf.readBigUInt64BE(8), 'backing_file_offset');
  const backingFileSize = buf.readUInt32BE(16);
  const clusterBits = buf.readUInt32BE(20);
  if (clusterBits < 9 || clusterBits > 21)
    throw new Qcow2Error('QCOW2_BAD_HEADER', `unsupported cluster_bits ${clusterBits} (must be 9..21)`);
  const clusterSize = 1 << clusterBits;
  const h: Qcow2Header = {
    version,
    backingFileOffset,
    backingFileSize,
    clusterBits,
    clusterSize,
    size: buf.readBigUInt64BE(24),
    cryptMethod: buf.readUInt32BE(32),
    l1Size: buf.readUInt32BE(36),
    l1TableOffset: buf.readBigUInt64BE(40),
    refcountTableOffset: buf.readBigUInt64BE(48),
    refcountTableClusters: buf.readUInt32BE(56),
    nbSnapshots: buf.readUInt32BE(60),
    snapshotsOffset: buf.readBigUInt64BE(64),
    incompatibleFeatures: 0n,
    compatibleFeatures: 0n,
    autoclearFeatures: 0n,
    refcountOrder: 4,
    headerLength: V2_HEADER_LENGTH,
    compressionType: 0,
    extensions: [],
    headerTail: Buffer.alloc(0),
    extensionsEnd: V2_HEADER_LENGTH,
    backingFile: null,
    backingFormat: null,
  };
  if (version === 3) {
    need(buf, V3_MIN_HEADER_LENGTH, 'v3 fields');
    h.incompatibleFeatures = buf.readBigUInt64BE(72);
    h.compatibleFeatures = buf.readBigUInt64BE(80);
    h.autoclearFeatures = buf.readBigUInt64BE(88);
    h.refcountOrder = buf.readUInt32BE(96);
    h.headerLength = buf.readUInt32BE(100);
    if (h.headerLength < V3_MIN_HEADER_LENGTH || h.headerLength % 8 !== 0 || h.headerLength > clusterSize)
      throw new Qcow2Error('QCOW2_BAD_HEADER', `invalid header_length ${h.headerLength}`);
    if (h.refcountOrder > 6) throw new Qcow2Error('QCOW2_BAD_HEADER', `invalid refcount_order ${h.refcountOrder}`);
    if (h.headerLength > 104) {
      need(buf, 105, 'compression type');
      h.compressionType = buf[104]!;
      need(buf, h.headerLength, 'additional header fields');
      h.headerTail = Buffer.from(buf.subarray(104, h.headerLength));
    }
  }
  const ext = decodeExtensions(buf, h);
  h.extensions = ext.list;
  h.extensionsEnd = ext.end;
  if (backingFileOffset !== 0) {
    if (backingFileSize === 0 || backingFileSize > MAX_BACKING_NAME)
      throw new Qcow2Error('QCOW2_BACKING_NAME', `invalid backing file name length ${backingFileSize}`);
    const end = backingFileOffset + backingFileSize;
    if (end > clusterSize) throw new Qcow2Error('QCOW2_BACKING_NAME', 'backing file name does not fit in the first cluster');
    need(buf, end, 'backing file name');
    h.backingFile = buf.subarray(backingFileOffset, end).toString('utf8');
    const fmt = h.extensions.find((e) => e.type === EXT_BACKING_FORMAT);
    h.backingFormat = fmt ? fmt.data.toString('utf8') : null;
  }
  return h;
}

function decodeExtensions(buf: Buffer, h: Qcow2Header): { list: HeaderExtension[]; end: number } {
  const out: HeaderExtension[] = [];
  // Extensions end at the end marker, the backing name, or the first cluster.
  const limit = Math.min(h.backingFileOffset || h.clusterSize, h.clusterSize, buf.length);
  let off = h.headerLength;
  while (off + 8 <= limit) {
    const type = buf.readUInt32BE(off);
    const len = buf.readUInt32BE(off + 4);
    if (type === EXT_END) return { list: out, end: off };
    const dataEnd = off + 8 + len;
    if (dataEnd > limit) throw new Qcow2Error('QCOW2_BAD_HEADER', `header extension 0x${type.toString(16)} overruns the header area`);
    out.push({ type, data: Buffer.from(buf.subarray(off + 8, dataEnd)) });
    off = off + 8 + Math.ceil(len / 8) * 8;
  }
  return { list: out, end: off };
}

function toSafe(v: bigint, what: string): number {
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new Qcow2Error('QCOW2_BAD_HEADER', `${what} out of range`);
  return Number(v);
}

/** Read and decode the header of the image at `path`. */
export async function readHeader(path: string): Promise<Qcow2Header> {
  const fh = await openImageFile(path, false);
  try {
    // 2 MiB is the largest cluster QEMU opens; the header and name live in cluster 0.
    const probe = Buffer.alloc(V3_MIN_HEADER_LENGTH + 8);
    const { bytesRead } = await fh.read(probe, 0, probe.length, 0);
    const first = probe.subarray(0, bytesRead);
    if (bytesRead < 4 || first.readUInt32BE(0) !== QCOW2_MAGIC)
      throw new Qcow2Error('QCOW2_BAD_MAGIC', `${path} is not a qcow2 image`, path);
    if (bytesRead < 24) throw new Qcow2Error('QCOW2_TRUNCATED', `${path}: qcow2 header truncated`, path);
    const bits = first.readUInt32BE(20);
    const clusterSize = bits >= 9 && bits <= 21 ? 1 << bits : 65536;
    const buf = Buffer.alloc(clusterSize);
    const r = await fh.read(buf, 0, clusterSize, 0);
    try {
      return decodeHeader(buf.subarray(0, r.bytesRead));
    } catch (e) {
      if (e instanceof Qcow2Error) throw new Qcow2Error(e.code, `${path}: ${e.message}`, path);
      throw e;
    }
  } finally {
    await fh.close();
  }
}

export interface FeatureCheckOptions {
  /** A zstd decoder is available (compressed clusters of zstd images can be read). */
  zstd?: boolean;
}

/**
 * Refusals for reading (docs/qcow2-notes.md §6): unknown incompatible bits, encryption and an external
 * data file. Dirty and corrupt images may be read.
 */
/** The image keeps its guest data in another file (incompatible bit 2 or the data-file extension). */
export function hasExternalDataFile(h: Qcow2Header): boolean {
  return (h.incompatibleFeatures & INCOMPAT_DATA_FILE) !== 0n || h.extensions.some((e) => e.type === EXT_DATA_FILE);
}

export function checkReadable(h: Qcow2Header, path?: string): void {
  const unknown = h.incompatibleFeatures & ~INCOMPAT_KNOWN;
  if (unknown !== 0n)
    throw new Qcow2Error('QCOW2_UNKNOWN_INCOMPATIBLE', `unknown incompatible feature bits 0x${unknown.toString(16)}`, path);
  if (h.cryptMethod !== 0 || h.extensions.some((e) => e.type === EXT_CRYPTO))
    throw new Qcow2Error('QCOW2_UNSUPPORTED_FEATURE', 'encrypted images are not supported', path);
  if (hasExternalDataFile(h))
    throw new Qcow2Error('QCOW2_EXTERNAL_DATA_FILE', 'the image has an external data file (its data lives in another file)', path);
  const compressionBit = (h.incompatibleFeatures & INCOMPAT_COMPRESSION) !== 0n;
  if (compressionBit !== (h.compressionType !== 0))
    throw new Qcow2Error('QCOW2_BAD_HEADER', 'compression type field and incompatible bit 3 disagree', path);
  if (h.compressionType > 1) throw new Qcow2Error('QCOW2_UNSUPPORTED_FEATURE', `unknown compression type ${h.compressionType}`, path);
  if ((h.incompatibleFeatures & INCOMPAT_EXTL2) !== 0n && h.clusterBits < 14)
    throw new Qcow2Error('QCOW2_BAD_HEADER', 'extended L2 entries need clusters of at least 16 KiB', path);
  if (h.version === 2 && h.refcountOrder !== 4) throw new Qcow2Error('QCOW2_BAD_HEADER', 'v2 image with refcount order', path);
}

/** Refusals for writing guest data (docs/qcow2-notes.md §6): everything of checkReadable, plus more. */
export function checkWritable(h: Qcow2Header, path?: string): void {
  checkReadable(h, path);
  if ((h.incompatibleFeatures & INCOMPAT_DIRTY) !== 0n)
    throw new Qcow2Error('QCOW2_DIRTY', 'image is marked dirty (run qemu-img check -r all first)', path);
  if ((h.incompatibleFeatures & INCOMPAT_CORRUPT) !== 0n) throw new Qcow2Error('QCOW2_MARKED_CORRUPT', 'image is marked corrupt', path);
  if (h.nbSnapshots > 0) throw new Qcow2Error('QCOW2_SNAPSHOTS', `image has ${h.nbSnapshots} internal snapshot(s)`, path);
  if ((h.autoclearFeatures & AUTOCLEAR_BITMAPS) !== 0n || h.extensions.some((e) => e.type === EXT_BITMAPS))
    throw new Qcow2Error('QCOW2_BITMAPS', 'image carries dirty bitmaps; guest data is never written into it', path);
}

export interface EncodedHeader {
  /** Header, extensions, end marker and backing name: the prefix of cluster 0. */
  bytes: Buffer;
  /** Offset of the end marker. */
  extensionsEnd: number;
  backingFileOffset: number;
  backingFileSize: number;
}

/**
 * Encode a header (the inverse of decodeHeader): fixed fields, the preserved tail of a v3 header,
 * every extension in its original order (unknown ones verbatim), the end marker, then the backing
 * name — the layout QEMU itself writes. The backing-format extension follows `backingFormat`:
 * replaced in place, added before the end marker, or dropped with the backing file.
 */
export function encodeHeader(h: Qcow2Header, opts: { backingFile?: string | null; backingFormat?: string | null } = {}): EncodedHeader {
  const backingFile = opts.backingFile === undefined ? h.backingFile : opts.backingFile;
  const backingFormat = backingFile === null ? null : opts.backingFormat === undefined ? h.backingFormat : opts.backingFormat;
  const exts: HeaderExtension[] = [];
  let fmtDone = false;
  for (const e of h.extensions) {
    if (e.type === EXT_BACKING_FORMAT) {
      if (backingFormat !== null && !fmtDone) exts.push({ type: e.type, data: Buffer.from(backingFormat, 'utf8') });
      fmtDone = true;
    } else exts.push(e);
  }
  if (!fmtDone && backingFormat !== null) exts.push({ type: EXT_BACKING_FORMAT, data: Buffer.from(backingFormat, 'utf8') });
  const headerLength = h.version === 2 ? V2_HEADER_LENGTH : h.headerLength;
  let len = headerLength;
  for (const e of exts) len += extensionSize(e.data.length);
  const extensionsEnd = len;
  len += 8;
  const name = backingFile === null ? Buffer.alloc(0) : Buffer.from(backingFile, 'utf8');
  if (name.length > MAX_BACKING_NAME) throw new Qcow2Error('QCOW2_BACKING_NAME', `backing file name longer than ${MAX_BACKING_NAME} bytes`);
  const backingFileOffset = name.length ? len : 0;
  len += name.length;
  if (len > h.clusterSize)
    throw new Qcow2Error('QCOW2_HEADER_FULL', 'header, extensions and backing name do not fit into the first cluster');
  const b = Buffer.alloc(len);
  putField(b, 'magic', QCOW2_MAGIC);
  putField(b, 'version', h.version);
  putField(b, 'backingFileOffset', backingFileOffset);
  putField(b, 'backingFileSize', name.length);
  putField(b, 'clusterBits', h.clusterBits);
  putField(b, 'size', h.size);
  putField(b, 'cryptMethod', h.cryptMethod);
  putField(b, 'l1Size', h.l1Size);
  putField(b, 'l1TableOffset', h.l1TableOffset);
  putField(b, 'refcountTableOffset', h.refcountTableOffset);
  putField(b, 'refcountTableClusters', h.refcountTableClusters);
  putField(b, 'nbSnapshots', h.nbSnapshots);
  putField(b, 'snapshotsOffset', h.snapshotsOffset);
  if (h.version === 3) {
    putField(b, 'incompatibleFeatures', h.incompatibleFeatures);
    putField(b, 'compatibleFeatures', h.compatibleFeatures);
    putField(b, 'autoclearFeatures', h.autoclearFeatures);
    putField(b, 'refcountOrder', h.refcountOrder);
    putField(b, 'headerLength', headerLength);
    h.headerTail.copy(b, 104);
    if (headerLength > 104) b[104] = h.compressionType;
  }
  let off = headerLength;
  for (const e of exts) {
    encodeExtension(e).copy(b, off);
    off += extensionSize(e.data.length);
  }
  // end marker: 8 zero bytes (already zero)
  name.copy(b, backingFileOffset);
  return { bytes: b, extensionsEnd, backingFileOffset, backingFileSize: name.length };
}

/**
 * The fixed fields, by byte offset and width (docs/qcow2-notes.md §1.1, §1.2): encodeHeader and
 * the single-field updates below both write through this table.
 */
export const HEADER_FIELDS = {
  magic: { offset: 0, width: 4 },
  version: { offset: 4, width: 4 },
  backingFileOffset: { offset: 8, width: 8 },
  backingFileSize: { offset: 16, width: 4 },
  clusterBits: { offset: 20, width: 4 },
  size: { offset: 24, width: 8 },
  cryptMethod: { offset: 32, width: 4 },
  l1Size: { offset: 36, width: 4 },
  l1TableOffset: { offset: 40, width: 8 },
  refcountTableOffset: { offset: 48, width: 8 },
  refcountTableClusters: { offset: 56, width: 4 },
  nbSnapshots: { offset: 60, width: 4 },
  snapshotsOffset: { offset: 64, width: 8 },
  incompatibleFeatures: { offset: 72, width: 8 },
  compatibleFeatures: { offset: 80, width: 8 },
  autoclearFeatures: { offset: 88, width: 8 },
  refcountOrder: { offset: 96, width: 4 },
  headerLength: { offset: 100, width: 4 },
} as const;

export type HeaderField = keyof typeof HEADER_FIELDS;

function putField(b: Buffer, name: HeaderField, v: number | bigint, base = 0): void {
  const f = HEADER_FIELDS[name];
  if (f.width === 8) b.writeBigUInt64BE(BigInt(v), f.offset - base);
  else b.writeUInt32BE(Number(v), f.offset - base);
}

/** Bytes to write at `offset` of the image to change part of its header in place. */
export interface HeaderPatch {
  offset: number;
  bytes: Buffer;
}

/** One write covering adjacent fields, in the order given. */
function fieldPatch(fields: Array<[HeaderField, number | bigint]>): HeaderPatch {
  const start = HEADER_FIELDS[fields[0]![0]].offset;
  let end = start;
  for (const [name] of fields) {
    const f = HEADER_FIELDS[name];
    if (f.offset !== end) throw new Error(`header field ${name} does not follow the previous one`);
    end += f.width;
  }
  const bytes = Buffer.alloc(end - start);
  for (const [name, v] of fields) putField(bytes, name, v, start);
  return { offset: start, bytes };
}

/** backing_file_offset and backing_file_size: 12 adjacent bytes, inside the first sector. */
export function encodeBackingPointer(offset: number, size: number): HeaderPatch {
  return fieldPatch([
    ['backingFileOffset', offset],
    ['backingFileSize', size],
  ]);
}

/** autoclear_features (v3 only). */
export function encodeAutoclear(bits: bigint): HeaderPatch {
  return fieldPatch([['autoclearFeatures', bits]]);
}

/** refcount_table_offset and refcount_table_clusters: 12 adjacent bytes, inside the first sector. */
export function encodeRefcountTablePointer(offset: number, clusters: number): HeaderPatch {
  return fieldPatch([
    ['refcountTableOffset', offset],
    ['refcountTableClusters', clusters],
  ]);
}

/** Bytes one extension takes: type, length, data padded to a multiple of 8. */
export function extensionSize(dataLength: number): number {
  return 8 + Math.ceil(dataLength / 8) * 8;
}

function encodeExtension(e: HeaderExtension): Buffer {
  const b = Buffer.alloc(extensionSize(e.data.length));
  b.writeUInt32BE(e.type, 0);
  b.writeUInt32BE(e.data.length, 4);
  e.data.copy(b, 8);
  return b;
}

/**
 * A backing-format extension appended where the end marker is now (`extensionsEnd`), in two
 * writes: `body` (the padded data and the new end marker after it) first, then `head` (type and
 * length, which replace the old end marker and make the extension visible).
 */
export function encodeBackingFormatExtension(extensionsEnd: number, format: string): { body: HeaderPatch; head: HeaderPatch } {
  const ext = encodeExtension({ type: EXT_BACKING_FORMAT, data: Buffer.from(format, 'utf8') });
  return {
    body: { offset: extensionsEnd + 8, bytes: Buffer.concat([ext.subarray(8), Buffer.alloc(8)]) },
    head: { offset: extensionsEnd, bytes: Buffer.from(ext.subarray(0, 8)) },
  };
}
