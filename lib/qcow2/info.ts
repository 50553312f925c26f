// `qemu-img info --output=json` for one image, from the header and the bitmap directory.
import { stat } from 'node:fs/promises';
import { resolve } from 'node:path';
import { Qcow2Error } from './errors.js';
import { AUTOCLEAR_BITMAPS, COMPAT_LAZY_REFCOUNTS, EXT_BITMAPS, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, INCOMPAT_EXTL2 } from './header.js';
import { Qcow2Image, safeNumber } from './image.js';
import { resolveBackingName } from './chain.js';

export interface BitmapInfo {
  name: string;
  granularity: number;
  flags: string[];
}

export interface ImageInfo {
  'virtual-size': number;
  filename: string;
  'cluster-size': number;
  format: 'qcow2';
  'actual-size': number;
  'format-specific': {
    type: 'qcow2';
    data: {
      compat: '0.10' | '1.1';
      'compression-type': 'zlib' | 'zstd';
      'lazy-refcounts'?: boolean;
      bitmaps?: BitmapInfo[];
      'refcount-bits': number;
      corrupt?: boolean;
      'extended-l2'?: boolean;
    };
  };
  'backing-filename'?: string;
  'full-backing-filename'?: string;
  'backing-filename-format'?: string;
  'dirty-flag': boolean;
}

const MAX_BITMAP_DIRECTORY = 64 << 20;
const BME_IN_USE = 1;
const BME_AUTO = 2;

/** The bitmaps of an image, as QEMU lists them (none when autoclear bit 0 is clear). */
export async function readBitmaps(img: Qcow2Image): Promise<BitmapInfo[]> {
  const ext = img.header.extensions.find((e) => e.type === EXT_BITMAPS);
  if (!ext || (img.header.autoclearFeatures & AUTOCLEAR_BITMAPS) === 0n) return [];
  if (ext.data.length < 24) throw new Qcow2Error('QCOW2_CORRUPT', 'bitmaps extension too short', img.path);
  const nb = ext.data.readUInt32BE(0);
  const dirSize = safeNumber(ext.data.readBigUInt64BE(8), 'bitmap directory size', img.path);
  const dirOff = safeNumber(ext.data.readBigUInt64BE(16), 'bitmap directory offset', img.path);
  if (nb === 0 || nb > 65535) throw new Qcow2Error('QCOW2_CORRUPT', `invalid number of bitmaps ${nb}`, img.path);
  if (dirSize > MAX_BITMAP_DIRECTORY) throw new Qcow2Error('QCOW2_TOO_LARGE', 'bitmap directory too large', img.path);
  if (dirOff % img.clusterSize !== 0 || dirOff + dirSize > img.fileSize)
    throw new Qcow2Error('QCOW2_CORRUPT', 'bitmap directory outside the file', img.path);
  const dir = Buffer.alloc(dirSize);
  await img.file.read(dir, 0, dirSize, dirOff);
  const out: BitmapInfo[] = [];
  let off = 0;
  for (let i = 0; i < nb; i++) {
    if (off + 24 > dirSize) throw new Qcow2Error('QCOW2_CORRUPT', 'bitmap directory truncated', img.path);
    const flags = dir.readUInt32BE(off + 12);
    const gbits = dir[off + 17]!;
    const nameSize = dir.readUInt16BE(off + 18);
    const extra = dir.readUInt32BE(off + 20);
    const nameAt = off + 24 + extra;
    if (nameAt + nameSize > dirSize) throw new Qcow2Error('QCOW2_CORRUPT', 'bitmap directory entry overruns', img.path);
    const f: string[] = [];
    if (flags & BME_IN_USE) f.push('in-use');
    if (flags & BME_AUTO) f.push('auto');
    out.push({ name: dir.subarray(nameAt, nameAt + nameSize).toString('utf8'), granularity: 2 ** gbits, flags: f });
    off = nameAt + nameSize;
    off = Math.ceil(off / 8) * 8;
  }
  return out;
}

/** `qemu-img info --output=json` of `path` (filename as given). */
export async function imageInfo(path: string): Promise<ImageInfo> {
  const img = await Qcow2Image.open(path);
  try {
    const h = img.header;
    const st = await stat(path);
    const data: ImageInfo['format-specific']['data'] = {
      compat: h.version === 2 ? '0.10' : '1.1',
      'compression-type': h.compressionType === 1 ? 'zstd' : 'zlib',
      'refcount-bits': 1 << h.refcountOrder,
    };
    if (h.version === 3) {
      data['lazy-refcounts'] = (h.compatibleFeatures & COMPAT_LAZY_REFCOUNTS) !== 0n;
      const bitmaps = await readBitmaps(img);
      if (bitmaps.length) data.bitmaps = bitmaps;
      data.corrupt = (h.incompatibleFeatures & INCOMPAT_CORRUPT) !== 0n;
      data['extended-l2'] = (h.incompatibleFeatures & INCOMPAT_EXTL2) !== 0n;
    }
    const info: ImageInfo = {
      'virtual-size': img.virtualSize,
      filename: path,
      'cluster-size': img.clusterSize,
      format: 'qcow2',
      'actual-size': st.blocks * 512,
      'format-specific': { type: 'qcow2', data },
      'dirty-flag': (h.incompatibleFeatures & INCOMPAT_DIRTY) !== 0n,
    };
    if (h.backingFile !== null) {
      info['backing-filename'] = h.backingFile;
      info['full-backing-filename'] = resolveBackingName(resolve(path), h.backingFile);
      if (h.backingFormat !== null) info['backing-filename-format'] = h.backingFormat;
    }
    return info;
  } finally {
    await img.close();
  }
}
