// Header updates of the native rebase, through the header codec's field patches: clearing
// unknown autoclear bits before the first write, and the commit point (the new backing name and
// format), written last.
import {
  AUTOCLEAR_KNOWN,
  encodeAutoclear,
  encodeBackingFormatExtension,
  encodeBackingPointer,
  encodeHeader,
  extensionSize,
} from '../header.js';
import type { Qcow2Image } from '../image.js';

/** Unknown autoclear bits are cleared before the first write (the specification). */
export async function clearUnknownAutoclear(T: Qcow2Image): Promise<void> {
  if (T.header.version !== 3 || (T.header.autoclearFeatures & ~AUTOCLEAR_KNOWN) === 0n) return;
  T.header.autoclearFeatures &= AUTOCLEAR_KNOWN;
  const p = encodeAutoclear(T.header.autoclearFeatures);
  await T.file.write(p.bytes, p.offset);
  await T.file.datasync();
}

export interface HeaderPlan {
  /** Where the new name goes; null: rewrite the header prefix in one write (QEMU's way). */
  nameAt: number | null;
  /** The backing-format extension must be added after the pointer switch. */
  addFormat: boolean;
}

/**
 * Where the new name goes: after the (possibly grown) extension area and clear of the current
 * name, so neither can be torn. Throws QCOW2_HEADER_FULL before anything is written.
 */
export function planHeader(T: Qcow2Image, c0: Buffer, name: string): HeaderPlan {
  const h = T.header;
  const n = Buffer.byteLength(name, 'utf8');
  const cs = T.clusterSize;
  const addFormat = h.backingFormat !== 'qcow2';
  const endMarkerPresent = h.extensionsEnd + 8 <= cs && c0.subarray(h.extensionsEnd, h.extensionsEnd + 8).every((x) => x === 0);
  const newExtEnd = h.extensionsEnd + (addFormat ? extensionSize(Buffer.byteLength('qcow2')) : 0) + 8;
  const oldOff = h.backingFile === null ? 0 : h.backingFileOffset;
  const oldEnd = h.backingFile === null ? 0 : h.backingFileOffset + h.backingFileSize;
  if (endMarkerPresent && (oldOff === 0 || oldOff >= h.extensionsEnd + 8)) {
    if (oldOff === 0 || newExtEnd + n <= oldOff) {
      if (newExtEnd + n <= cs) return { nameAt: newExtEnd, addFormat };
    } else {
      const at = Math.max(newExtEnd, oldEnd);
      if (at + n <= cs) return { nameAt: at, addFormat };
    }
  }
  encodeHeader(h, { backingFile: name, backingFormat: 'qcow2' }); // throws QCOW2_HEADER_FULL
  return { nameAt: null, addFormat };
}

/**
 * The new name into free space of cluster 0 that does not overlap the current name (nothing
 * points at it yet: a crash after it leaves the header as it was). Written before the copy, so
 * the first batch's fdatasync makes it durable with the data instead of a sync of its own.
 */
export async function writeBackingName(T: Qcow2Image, plan: HeaderPlan, name: string): Promise<void> {
  if (plan.nameAt !== null) await T.file.write(Buffer.from(name, 'utf8'), plan.nameAt);
}

/**
 * The commit point: with the name written (writeBackingName; `nameDurable` once an fdatasync
 * followed it), one sector-sized write switches backing_file_offset/size; a missing
 * backing-format extension is added afterwards, its type/length word last.
 */
export async function commitHeader(T: Qcow2Image, plan: HeaderPlan, name: string, nameDurable: boolean): Promise<void> {
  const file = T.file;
  const h = T.header;
  if (plan.nameAt === null) {
    const enc = encodeHeader(h, { backingFile: name, backingFormat: 'qcow2' });
    await file.write(enc.bytes, 0);
    await file.datasync();
    return;
  }
  const nameBuf = Buffer.from(name, 'utf8');
  if (!nameDurable) await file.datasync();
  const ptr = encodeBackingPointer(plan.nameAt, nameBuf.length);
  await file.write(ptr.bytes, ptr.offset);
  await file.datasync();
  if (plan.addFormat) {
    const ext = encodeBackingFormatExtension(h.extensionsEnd, 'qcow2');
    await file.write(ext.body.bytes, ext.body.offset);
    await file.datasync();
    await file.write(ext.head.bytes, ext.head.offset);
    await file.datasync();
  }
}
