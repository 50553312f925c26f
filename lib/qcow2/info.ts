// `qemu-img info --output=json` for one image, from the header and the bitmap directory.
import { stat } from 'node:fs/promises';
import { resolve } from 'node:path';
import { COMPAT_LAZY_REFCOUNTS, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, INCOMPAT_EXTL2 } from './header.js';
import { Qcow2Image } from './image.js';
import { readBitmapDirectory } from './bitmaps.js';
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

/** The bitmaps of an image, as QEMU lists them (none when autoclear bit 0 is clear). */
export async function readBitmaps(img: Qcow2Image): Promise<BitmapInfo[]> {
  const dir = await readBitmapDirectory(img);
  return dir.bitmaps.map((b) => ({
    name: b.name,
    granularity: b.granularity,
    flags: [...(b.inUse ? ['in-use'] : []), ...(b.auto ? ['auto'] : [])],
  }));
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
