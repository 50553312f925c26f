// Metadata walk of one image, for the chain safety check: every L2 table the L1 table points
// at and every entry in it, and every refcount table entry, validated against the file
// (aligned, inside it, clear of the header and the tables). Reads metadata only, one table at
// a time (memory stays at the L2 cache's budget).
import { Qcow2Image, type ScratchEntry } from './image.js';
import { zeroEntries } from './l2.js';
import { emptyRefTableEntries } from './refcount.js';

export interface ScanResult {
  l2Tables: number;
  refcountBlocks: number;
}

/** Throws the Qcow2Error of the first damaged table or entry. */
export async function scanImage(img: Qcow2Image): Promise<ScanResult> {
  const e: ScratchEntry = { type: 'standard', host: 0, alloc: 0, zero: 0, copied: false, sectors: 0, size: 0 };
  const clusters = Math.ceil(img.virtualSize / img.clusterSize);
  let l2Tables = 0;
  for (let i = 0; i < img.header.l1Size; i++) {
    const t = await img.l2Table(i);
    if (t === null) continue;
    l2Tables++;
    const first = i * img.l2Entries;
    const end = Math.min(clusters, first + img.l2Entries);
    for (let c = first; c < end; c++) {
      // Empty entries are valid: a run of them is skipped a page at a time.
      const unset = zeroEntries(t, c - first, end - c, img);
      if (unset > 0) {
        c += unset - 1;
        continue;
      }
      img.entryInto(t, c, e);
    }
  }
  let refcountBlocks = 0;
  // The table once, its empty entries skipped without an await each (a table has thousands).
  const t = await img.refcountTable();
  for (let i = 0; i < img.refcountTableEntries; i++) {
    const unset = emptyRefTableEntries(t, i, img.refcountTableEntries - i);
    if (unset > 0) {
      i += unset - 1;
      continue;
    }
    if ((await img.refBlockOffset(i)) !== 0) refcountBlocks++;
  }
  return { l2Tables, refcountBlocks };
}

/** Open `path` read-only and scan it. */
export async function scanMetadata(path: string): Promise<ScanResult> {
  const img = await Qcow2Image.open(path, { l2CacheBytes: 1 });
  try {
    return await scanImage(img);
  } finally {
    await img.close();
  }
}
