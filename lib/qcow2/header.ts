// qcow2 header codec (read side): the fixed fields of v2/v3 and the extension
// area, as laid out in the qcow2 specification. All integers are big-endian.
import { open } from 'node:fs/promises';
import { Qcow2Error } from './errors.js';

export const QCOW2_MAGIC = 0x514649fb;
export const EXT_END = 0x00000000;
export const EXT_BACKING_FORMAT = 0xe2792aca;
export const EXT_FEATURE_TABLE = 0x6803f857;
export const EXT_BITMAPS = 0x23852875;
export const EXT_CRYPTO = 0x0537be77;
export const EXT_DATA_FILE = 0x44415441;

export const V2_HEADER_LENGTH = 72;
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
  if (version !== 2 && version !== 3)
    throw new Qcow2Error('QCOW2_UNSUPPORTED_VERSION', `Unsupported qcow2 version ${version}`);
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
    }
  }
  h.extensions = decodeExtensions(buf, h);
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

function decodeExtensions(buf: Buffer, h: Qcow2Header): HeaderExtension[] {
  const out: HeaderExtension[] = [];
  // Extensions end at the end marker, the backing name, or the first cluster.
  const limit = Math.min(h.backingFileOffset || h.clusterSize, h.clusterSize, buf.length);
  let off = h.headerLength;
  while (off + 8 <= limit) {
    const type = buf.readUInt32BE(off);
    const len = buf.readUInt32BE(off + 4);
    if (type === EXT_END) return out;
    const dataEnd = off + 8 + len;
    if (dataEnd > limit) throw new Qcow2Error('QCOW2_BAD_HEADER', `header extension 0x${type.toString(16)} overruns the header area`);
    out.push({ type, data: Buffer.from(buf.subarray(off + 8, dataEnd)) });
    off = off + 8 + Math.ceil(len / 8) * 8;
  }
  return out;
}

function toSafe(v: bigint, what: string): number {
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new Qcow2Error('QCOW2_BAD_HEADER', `${what} out of range`);
  return Number(v);
}

/** Read and decode the header of the image at `path`. */
export async function readHeader(path: string): Promise<Qcow2Header> {
  let fh;
  try {
    fh = await open(path, 'r');
  } catch (e) {
    throw new Qcow2Error('QCOW2_IO', `cannot open ${path}: ${(e as Error).message}`, path);
  }
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
