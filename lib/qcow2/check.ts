// Native structural check of one qcow2 image, the counterpart of `qemu-img check` (read-only):
// every reference is counted — header cluster, active and snapshot L1 tables, L2 tables, data and
// compressed clusters, the snapshot table, the refcount table and its blocks, the bitmap directory,
// bitmap tables and bitmap data — and the sums are compared with the refcount blocks. A reference
// to a cluster whose stored refcount is lower is a corruption (two users of a refcount-1 cluster
// are one); a stored refcount nobody references is a leak (space only). Entries are checked
// (alignment, reserved bits, past the end of the file, compressed descriptors, subcluster
// bitmaps) and bit 63 ("copied") of the active L1/L2 entries must agree with refcount == 1.
// Counted the way QEMU counts, so the verdicts and counts can be compared with qemu-img's.
//
// Memory is bounded by the FILE, never by the virtual size: the computed refcounts are one byte
// per host cluster (rare larger counts in a map) plus two bits per host cluster, tables are read
// one at a time (a few in flight), and refcount blocks are streamed.
import { Qcow2Error } from './errors.js';
import {
  AUTOCLEAR_BITMAPS,
  COMPAT_LAZY_REFCOUNTS,
  EXT_BITMAPS,
  EXT_CRYPTO,
  INCOMPAT_CORRUPT,
  INCOMPAT_DIRTY,
  INCOMPAT_EXTL2,
  AUTOCLEAR_KNOWN,
  QCOW2_MAGIC,
  V3_MIN_HEADER_LENGTH,
  checkReadable,
  decodeHeader,
  hasExternalDataFile,
  type Qcow2Header,
} from './header.js';
import { NodeBlockFile, type BlockFile } from './io.js';
import { zeroEntries, type L2Layout } from './l2.js';
import { emptyRefTableEntries } from './refcount.js';

/** qemu-img check's verdict, by its exit code: 0 clean, 3 leaks only, 2 corrupt, 1 check failed. */
export type CheckVerdict = 'clean' | 'leaks' | 'corrupt' | 'failed';

export interface Qcow2CheckResult {
  path: string;
  verdict: CheckVerdict;
  /** References the refcounts do not cover, invalid entries, copied-flag mismatches. */
  corruptions: number;
  /** Clusters with a refcount nothing references (space only). */
  leaks: number;
  /** Refcounts that could not be read (qemu-img: "check errors"). */
  checkErrors: number;
  /** Damage that stops the check before counting (qemu-img cannot open the image). */
  fatal: string | null;
  /** Incompatible bit 1: QEMU found damage once and marked it (it still counts as clean above). */
  markedCorrupt: boolean;
  /** Incompatible bit 0: not closed cleanly (lazy refcounts; leaks or stale refcounts are expected). */
  dirty: boolean;
  /** Header facts worth a line (unknown compatible/autoclear bits, lazy refcounts, …). */
  notes: string[];
  /** The first problems, one line each (at most `maxMessages`; `omitted` more). */
  messages: string[];
  omitted: number;
  /** Byte after the last cluster in use or referenced (qemu-img's image-end-offset). */
  imageEndOffset: number;
  /** Metadata read: L2 tables (each reference), refcount blocks. */
  l2Tables: number;
  refcountBlocks: number;
}

export interface CheckOptions {
  /** Read through this file instead of opening `path` (tests). */
  file?: BlockFile;
  /** Problem lines kept (default 100); the counts are always complete. */
  maxMessages?: number;
  /** Metadata bytes in flight (default 8 MiB). */
  inFlightBytes?: number;
}

const L1E_OFFSET_HI = 0x00ffffff;
const L1E_RESERVED_HI = 0x7f000000;
const L1E_RESERVED_LO = 0x1ff;
const L2E_STD_RESERVED_HI = 0x3f000000;
const L2E_STD_RESERVED_LO = 0x1fe;
const MAX_SNAPSHOTS = 65536;
const MAX_L1_ENTRIES = (32 << 20) / 8;
const MAX_REFTABLE_BYTES = 8 << 20;
const MAX_BITMAPS = 65535;
const MAX_BITMAP_DIRECTORY = 64 << 20;
const SATURATED = 255;

const hexOf = (n: number | bigint): string => n.toString(16);

/** Computed refcounts: a byte per host cluster, larger counts (snapshots) in a map. */
class Counts {
  private bytes: Uint8Array;
  private big = new Map<number, number>();
  /** Clusters counted so far (grows by one for a reference into the file's last partial cluster). */
  size: number;
  constructor(size: number) {
    this.size = size;
    this.bytes = new Uint8Array(size + 1);
  }
  get(k: number): number {
    if (k >= this.bytes.length) return 0;
    const v = this.bytes[k]!;
    return v < SATURATED ? v : this.big.get(k)!;
  }
  set(k: number, v: number): void {
    if (k >= this.bytes.length) {
      const b = new Uint8Array(Math.max(k + 1, this.bytes.length * 2));
      b.set(this.bytes);
      this.bytes = b;
    }
    if (v < SATURATED) {
      this.bytes[k] = v;
      this.big.delete(k);
    } else {
      this.bytes[k] = SATURATED;
      this.big.set(k, v);
    }
    if (k >= this.size) this.size = k + 1;
  }
}

/** A bit per host cluster. */
class Bits {
  private readonly a: Uint32Array;
  constructor(n: number) {
    this.a = new Uint32Array(Math.ceil((n + 1) / 32));
  }
  set(i: number): void {
    if (i >> 5 < this.a.length) this.a[i >> 5]! |= 1 << (i & 31);
  }
  has(i: number): boolean {
    return i >> 5 < this.a.length && (this.a[i >> 5]! & (1 << (i & 31))) !== 0;
  }
}

/** Check the image at `path`. Throws only when it cannot answer (I/O, an unsupported feature). */
export async function checkImage(path: string, opts: CheckOptions = {}): Promise<Qcow2CheckResult> {
  const file = opts.file ?? (await NodeBlockFile.open(path, false));
  try {
    return await new Checker(path, file, opts).execute();
  } finally {
    if (!opts.file) await file.close();
  }
}

class Checker {
  private readonly res: Qcow2CheckResult;
  private readonly maxMessages: number;
  private readonly inFlightBytes: number;
  private fileSize = 0;
  private h!: Qcow2Header;
  private cs = 0;
  private bits = 0;
  private extL2 = false;
  private l2Entries = 0;
  private counts!: Counts;
  private refcountMax = 0;
  private refTable: Buffer = Buffer.alloc(0);
  private refTableEntries = 0;
  private epb = 0;
  /** Stored refcount == 1, and stored refcount unreadable (misaligned block), per host cluster. */
  private diskOne!: Bits;
  private diskBad!: Bits;
  private blockCache = new Map<number, Buffer>();
  /** Host clusters of the file (the counts may reach one more). */
  private nb = 0;
  private copiedMessages: string[] = [];

  constructor(
    readonly path: string,
    private readonly file: BlockFile,
    opts: CheckOptions,
  ) {
    this.maxMessages = opts.maxMessages ?? 100;
    this.inFlightBytes = opts.inFlightBytes ?? 8 << 20;
    this.res = {
      path,
      verdict: 'clean',
      corruptions: 0,
      leaks: 0,
      checkErrors: 0,
      fatal: null,
      markedCorrupt: false,
      dirty: false,
      notes: [],
      messages: [],
      omitted: 0,
      imageEndOffset: 0,
      l2Tables: 0,
      refcountBlocks: 0,
    };
  }

  private say(line: string): void {
    if (this.res.messages.length < this.maxMessages) this.res.messages.push(line);
    else this.res.omitted++;
  }
  private corruption(line: string): void {
    this.res.corruptions++;
    this.say(line);
  }

  /**
   * Read with zeros past the end of the file, as QEMU's block layer reads; into `into` (reused
   * by the loops over tables and blocks, whose garbage would otherwise pile up in RSS before a
   * collection) or a new buffer.
   */
  private async read(len: number, at: number, into?: Buffer): Promise<Buffer> {
    const b = into ? into.subarray(0, len) : Buffer.alloc(len);
    const got = at < this.fileSize ? await this.file.read(b, 0, Math.min(len, this.fileSize - at), at) : 0;
    if (into) b.fill(0, got);
    return b;
  }

  private finish(): Qcow2CheckResult {
    const r = this.res;
    r.messages.push(...this.copiedMessages.splice(0, Math.max(0, this.maxMessages - r.messages.length)));
    r.omitted += this.copiedMessages.length;
    r.verdict = r.fatal !== null || r.checkErrors > 0 ? 'failed' : r.corruptions > 0 ? 'corrupt' : r.leaks > 0 ? 'leaks' : 'clean';
    return r;
  }

  private fail(message: string): Qcow2CheckResult {
    this.res.fatal = message;
    return this.finish();
  }

  async execute(): Promise<Qcow2CheckResult> {
    this.fileSize = await this.file.size();
    const probe = Buffer.alloc(V3_MIN_HEADER_LENGTH + 8);
    const n = await this.file.read(probe, 0, probe.length, 0);
    if (n < 4 || probe.readUInt32BE(0) !== QCOW2_MAGIC) return this.fail('not a qcow2 image (bad magic)');
    if (n < 24) return this.fail('qcow2 header truncated');
    const bits = probe.readUInt32BE(20);
    if (bits < 9 || bits > 21) return this.fail(`unsupported cluster_bits ${bits}`);
    try {
      this.h = decodeHeader(await this.read(1 << bits, 0));
    } catch (e) {
      if (e instanceof Qcow2Error) return this.fail(e.message);
      throw e;
    }
    const h = this.h;
    // What the check cannot answer for: the caller may hand these to another checker.
    if (h.cryptMethod !== 0 || h.extensions.some((e) => e.type === EXT_CRYPTO))
      throw new Qcow2Error('QCOW2_UNSUPPORTED_FEATURE', 'encrypted images are not checked natively', this.path);
    if (hasExternalDataFile(h))
      throw new Qcow2Error('QCOW2_EXTERNAL_DATA_FILE', 'the image has an external data file: not checked natively', this.path);
    try {
      checkReadable(h);
    } catch (e) {
      if (e instanceof Qcow2Error) return this.fail(e.message);
      throw e;
    }
    this.res.markedCorrupt = (h.incompatibleFeatures & INCOMPAT_CORRUPT) !== 0n;
    this.res.dirty = (h.incompatibleFeatures & INCOMPAT_DIRTY) !== 0n;
    if (this.res.markedCorrupt) this.res.notes.push('marked corrupt (incompatible bit 1): QEMU found damage in it and will not write it');
    if (this.res.dirty) this.res.notes.push('marked dirty (incompatible bit 0): not closed cleanly, refcounts may be stale');
    if ((h.compatibleFeatures & COMPAT_LAZY_REFCOUNTS) !== 0n) this.res.notes.push('lazy refcounts');
    if ((h.compatibleFeatures & ~COMPAT_LAZY_REFCOUNTS) !== 0n)
      this.res.notes.push(`unknown compatible feature bits 0x${hexOf(h.compatibleFeatures & ~COMPAT_LAZY_REFCOUNTS)}`);
    if ((h.autoclearFeatures & ~AUTOCLEAR_KNOWN) !== 0n)
      this.res.notes.push(`unknown autoclear feature bits 0x${hexOf(h.autoclearFeatures & ~AUTOCLEAR_KNOWN)} (a writer clears them)`);

    this.cs = h.clusterSize;
    this.bits = h.clusterBits;
    this.extL2 = (h.incompatibleFeatures & INCOMPAT_EXTL2) !== 0n;
    this.l2Entries = this.cs / (this.extL2 ? 16 : 8);
    // The tables as QEMU validates them on open (a failure there: qemu-img cannot check).
    if (h.refcountTableClusters === 0) return this.fail('the image has no refcount table');
    if (h.refcountTableClusters * this.cs > MAX_REFTABLE_BYTES) return this.fail('refcount table too large');
    if (h.refcountTableOffset % BigInt(this.cs) !== 0n || h.refcountTableOffset > BigInt(Number.MAX_SAFE_INTEGER))
      return this.fail(`refcount table offset 0x${hexOf(h.refcountTableOffset)} invalid (not cluster-aligned)`);
    if (h.nbSnapshots > MAX_SNAPSHOTS) return this.fail('snapshot table too large');
    if (h.nbSnapshots > 0 && (h.snapshotsOffset % BigInt(this.cs) !== 0n || h.snapshotsOffset > BigInt(Number.MAX_SAFE_INTEGER)))
      return this.fail(`snapshot table offset 0x${hexOf(h.snapshotsOffset)} invalid (not cluster-aligned)`);
    if (h.l1Size > MAX_L1_ENTRIES) return this.fail('active L1 table too large');
    const span = this.cs * this.l2Entries;
    if (BigInt(h.l1Size) * BigInt(span) < h.size) return this.fail(`L1 table too small (${h.l1Size} entries) for the virtual size`);
    if (h.l1TableOffset % BigInt(this.cs) !== 0n || h.l1TableOffset > BigInt(Number.MAX_SAFE_INTEGER))
      return this.fail(`active L1 table offset 0x${hexOf(h.l1TableOffset)} invalid (not cluster-aligned)`);
    const bitmaps = this.bitmapsExtension();
    if (typeof bitmaps === 'string') return this.fail(bitmaps);

    const nb = Math.ceil(this.fileSize / this.cs);
    this.counts = new Counts(nb);
    this.refcountMax = h.refcountOrder >= 6 ? Number.MAX_VALUE : 2 ** (1 << h.refcountOrder) - 1;
    this.refTableEntries = (h.refcountTableClusters * this.cs) / 8;
    this.refTable = await this.read(this.refTableEntries * 8, Number(h.refcountTableOffset));
    this.epb = (this.cs * 8) >> h.refcountOrder;
    this.nb = nb;
    await this.loadDiskOnes(nb);

    // Every reference, in QEMU's order.
    this.inc(0, this.cs);
    await this.walkL1(Number(h.l1TableOffset), h.l1Size, true);
    await this.walkSnapshots();
    this.inc(Number(h.refcountTableOffset), this.refTableEntries * 8);
    if (bitmaps) {
      const ok = await this.walkBitmaps(bitmaps.offset, bitmaps.size, bitmaps.count);
      if (!ok) return this.finish();
    }
    this.checkRefblocks();
    await this.compare();
    return this.finish();
  }

  /** The bitmaps extension as QEMU reads it on open: null when absent or ignored, a string when invalid. */
  private bitmapsExtension(): { count: number; size: number; offset: number } | null | string {
    const ext = this.h.extensions.find((e) => e.type === EXT_BITMAPS);
    // Without the autoclear bit QEMU ignores the bitmaps (a program without bitmap support wrote the image).
    if (!ext || (this.h.autoclearFeatures & AUTOCLEAR_BITMAPS) === 0n) return null;
    if (ext.data.length < 24) return 'bitmaps extension too short';
    const count = ext.data.readUInt32BE(0);
    const size = ext.data.readBigUInt64BE(8);
    const offset = ext.data.readBigUInt64BE(16);
    if (count === 0) return 'invalid bitmaps extension: no bitmaps';
    if (count > MAX_BITMAPS) return 'invalid bitmaps extension: too many bitmaps';
    if (size === 0n || size > BigInt(MAX_BITMAP_DIRECTORY)) return 'invalid bitmaps extension: bad directory size';
    if (offset % BigInt(this.cs) !== 0n || offset > BigInt(Number.MAX_SAFE_INTEGER))
      return 'invalid bitmaps extension: bitmap directory offset not cluster-aligned';
    return { count, size: Number(size), offset: Number(offset) };
  }

  // ---- counting --------------------------------------------------------------------------

  /** One reference to every cluster of [offset, offset + size) (QEMU's inc_refcounts). */
  private inc(offset: number, size: number): void {
    if (size <= 0) return;
    // The last cluster may be partly past the end of the file; a whole cluster more may not.
    if (offset + size - this.fileSize >= this.cs) {
      this.corruption(
        `ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x${hexOf(offset)} size 0x${hexOf(size)}`,
      );
      return;
    }
    const first = Math.floor(offset / this.cs);
    const last = Math.floor((offset + size - 1) / this.cs);
    for (let k = first; k <= last; k++) {
      const c = this.counts.get(k);
      if (c >= this.refcountMax) {
        this.corruption(`ERROR: overflow cluster offset=0x${hexOf(k * this.cs)}`);
        continue;
      }
      this.counts.set(k, c + 1);
    }
  }

  /** Reads `tables` (host offsets), a few in flight, handing each to `use` in order. */
  private async forEachTable(offsets: number[], len: number, use: (t: Buffer, i: number) => void): Promise<void> {
    const window = Math.max(1, Math.min(32, Math.floor(this.inFlightBytes / len)));
    // One buffer per read in flight: table i uses ring[i % window], free again once `use`
    // (synchronous, keeps nothing) returned for table i - window.
    const ring = Array.from({ length: Math.min(window, offsets.length) }, () => Buffer.allocUnsafe(len));
    const pending: Promise<Buffer>[] = [];
    let next = 0;
    for (let i = 0; i < offsets.length; i++) {
      while (next < offsets.length && next < i + window) {
        pending.push(this.read(len, offsets[next]!, ring[next % window]));
        next++;
      }
      use(await pending.shift()!, i);
    }
  }

  /** An L1 table and every L2 table it points at (QEMU's check_refcounts_l1/l2). */
  private async walkL1(l1Offset: number, l1Size: number, active: boolean): Promise<void> {
    if (l1Size === 0) return;
    this.inc(l1Offset, l1Size * 8);
    const l1 = await this.read(l1Size * 8, l1Offset);
    const l2s: number[] = [];
    for (let i = 0; i < l1Size; i++) {
      const hi = l1.readUInt32BE(i * 8);
      const lo = l1.readUInt32BE(i * 8 + 4);
      if (hi === 0 && lo === 0) continue;
      if (hi & L1E_RESERVED_HI || lo & L1E_RESERVED_LO)
        this.corruption(`ERROR found L1 entry with reserved bits set: ${hexOf(l1.readBigUInt64BE(i * 8))}`);
      const off = (hi & L1E_OFFSET_HI) * 0x100000000 + ((lo & 0xfffffe00) >>> 0);
      this.inc(off, this.cs);
      if (off % this.cs !== 0) this.corruption(`ERROR l2_offset=${hexOf(off)}: Table is not cluster aligned; L1 entry corrupted`);
      if (active && off !== 0) {
        // Bit 63 of the L1 entry against the stored refcount of the L2 table.
        const k = Math.floor(off / this.cs);
        this.judgeCopied(
          k,
          (hi & 0x80000000) !== 0,
          `ERROR OFLAG_COPIED L2 cluster: l1_index=${i} l1_entry=${hexOf(l1.readBigUInt64BE(i * 8))}`,
        );
      }
      l2s.push(off);
    }
    await this.forEachTable(l2s, this.cs, (t) => {
      this.res.l2Tables++;
      this.walkL2(t, active);
    });
  }

  private walkL2(t: Buffer, active: boolean): void {
    const cs = this.cs;
    const esz = this.extL2 ? 16 : 8;
    const x = 70 - this.bits; // compressed: offset bits below x, sector count above
    const csizeMask = (1 << (this.bits - 8)) - 1;
    const hiOffMask = x >= 32 ? 2 ** (x - 32) - 1 : 0;
    const layout: L2Layout = { clusterBits: this.bits, extendedL2: this.extL2 };
    for (let i = 0; i < this.l2Entries; i++) {
      // All-zero entries (unallocated) count nothing: a run of them is skipped a word at a time.
      const unset = zeroEntries(t, i, this.l2Entries - i, layout);
      if (unset > 0) {
        i += unset - 1;
        continue;
      }
      const at = i * esz;
      const hi = t.readUInt32BE(at);
      const lo = t.readUInt32BE(at + 4);
      const zeroBits = this.extL2 ? t.readUInt32BE(at + 8) : 0;
      const allocBits = this.extL2 ? t.readUInt32BE(at + 12) : 0;
      if (hi & 0x40000000) {
        // Compressed: offset and sector count; never "copied", never a subcluster bitmap.
        if (hi & 0x80000000)
          this.corruption(
            `ERROR: coffset=0x${hexOf((hi & hiOffMask) * 0x100000000 + lo)}: copied flag must never be set for compressed clusters`,
          );
        if (zeroBits !== 0 || allocBits !== 0) {
          this.corruption(
            `ERROR compressed cluster ${i} with non-zero subcluster allocation bitmap, entry=0x${hexOf(t.readBigUInt64BE(at))}`,
          );
          continue;
        }
        const coffset = (hi & hiOffMask) * 0x100000000 + lo;
        const sectors = ((hi >>> (x - 32)) & csizeMask) + 1;
        this.inc(coffset, sectors * 512 - (coffset & 511));
        continue;
      }
      if (hi & L2E_STD_RESERVED_HI || lo & L2E_STD_RESERVED_LO)
        this.corruption(`ERROR found l2 entry with reserved bits set: ${hexOf(t.readBigUInt64BE(at))}`);
      const off = (hi & 0x00ffffff) * 0x100000000 + ((lo & 0xfffffe00) >>> 0);
      if (off === 0) {
        // Unallocated, or a zero cluster without a host cluster.
        if (this.extL2 && allocBits !== 0) this.corruption(`ERROR: cluster ${i}: allocated subclusters without a host offset`);
        continue;
      }
      if (this.extL2 && (zeroBits & allocBits) !== 0)
        this.corruption(`ERROR offset=${hexOf(off)}: Allocated cluster has corrupted subcluster allocation bitmap`);
      if (off % cs !== 0) {
        const data = this.extL2 ? allocBits !== 0 : (lo & 1) === 0;
        this.corruption(
          data
            ? `ERROR offset=${hexOf(off)}: Data cluster is not properly aligned; L2 entry corrupted.`
            : `ERROR offset=${hexOf(off)}: Preallocated cluster is not properly aligned; L2 entry corrupted.`,
        );
      }
      this.inc(off, cs);
      if (active)
        this.judgeCopied(
          Math.floor(off / cs),
          (hi & 0x80000000) !== 0,
          `ERROR OFLAG_COPIED data cluster: l2_entry=${hexOf(t.readBigUInt64BE(at))}`,
        );
    }
  }

  private async walkSnapshots(): Promise<void> {
    const h = this.h;
    if (h.nbSnapshots === 0) return;
    let pos = Number(h.snapshotsOffset);
    const start = pos;
    for (let i = 0; i < h.nbSnapshots; i++) {
      // Entries start 8-aligned; the table ends right after the last one (QEMU's snapshots_size).
      pos = Math.ceil(pos / 8) * 8;
      const e = await this.read(40, pos);
      const l1Offset = e.readBigUInt64BE(0);
      const l1Size = e.readUInt32BE(8);
      const idLen = e.readUInt16BE(12);
      const nameLen = e.readUInt16BE(14);
      const extra = e.readUInt32BE(36);
      pos = pos + 40 + extra + idLen + nameLen;
      if (l1Offset % BigInt(this.cs) !== 0n || l1Offset > BigInt(Number.MAX_SAFE_INTEGER)) {
        this.corruption(
          `ERROR snapshot ${i} l1_offset=0x${hexOf(l1Offset)}: L1 table is not cluster aligned; snapshot table entry corrupted`,
        );
        continue;
      }
      if (l1Size > MAX_L1_ENTRIES) {
        this.corruption(`ERROR snapshot ${i} l1_size=0x${hexOf(l1Size)}: L1 table is too large; snapshot table entry corrupted`);
        continue;
      }
      await this.walkL1(Number(l1Offset), l1Size, false);
    }
    this.inc(start, pos - start);
  }

  /** The bitmap directory, each bitmap's table and its data clusters. False: the check fails (QEMU cannot load the list). */
  private async walkBitmaps(dirOffset: number, dirSize: number, count: number): Promise<boolean> {
    this.inc(dirOffset, dirSize);
    const dir = await this.read(dirSize, dirOffset);
    let off = 0;
    const tables: { offset: bigint; size: number; name: string }[] = [];
    for (let i = 0; i < count; i++) {
      if (off + 24 > dirSize) break;
      const tOff = dir.readBigUInt64BE(off);
      const tSize = dir.readUInt32BE(off + 8);
      const nameSize = dir.readUInt16BE(off + 18);
      const extra = dir.readUInt32BE(off + 20);
      const end = off + 24 + extra + nameSize;
      if (end > dirSize) break;
      tables.push({ offset: tOff, size: tSize, name: dir.subarray(off + 24 + extra, end).toString('utf8') });
      off = Math.ceil(end / 8) * 8;
    }
    if (tables.length !== count) {
      this.corruption('ERROR: the bitmap directory cannot be read (entries overrun it)');
      this.res.checkErrors++;
      return false;
    }
    for (const b of tables) {
      const bad = b.offset % BigInt(this.cs) !== 0n || b.offset === 0n || b.offset > BigInt(Number.MAX_SAFE_INTEGER);
      if (!bad) this.inc(Number(b.offset), b.size * 8);
      if (bad || Number(b.offset) + b.size * 8 > this.fileSize) {
        this.corruption(`ERROR: bitmap ${b.name}: bitmap table is misaligned or outside the file`);
        this.res.checkErrors++;
        return false;
      }
      const t = await this.read(b.size * 8, Number(b.offset));
      for (let i = 0; i < b.size; i++) {
        const hi = t.readUInt32BE(i * 8);
        const lo = t.readUInt32BE(i * 8 + 4);
        const dataOff = (hi & 0x00ffffff) * 0x100000000 + ((lo & 0xfffffe00) >>> 0);
        // Reserved bits 1..8 and 56..63; with an offset, bit 0 ("all ones") is reserved too.
        if (hi & 0xff000000 || lo & 0x1fe || (dataOff !== 0 && (lo & 1 || dataOff % this.cs !== 0))) {
          this.corruption(`ERROR: bitmap ${b.name}: invalid bitmap table entry ${i}: ${hexOf(t.readBigUInt64BE(i * 8))}`);
          continue;
        }
        if (dataOff !== 0) this.inc(dataOff, this.cs);
      }
    }
    return true;
  }

  // ---- the stored refcounts --------------------------------------------------------------

  /** Offset of refcount block `i` (0: none; -1: misaligned, unreadable). */
  private blockOffset(i: number): number {
    if (i >= this.refTableEntries) return 0;
    const e = this.refTable.readBigUInt64BE(i * 8) & ~0x1ffn;
    if (e === 0n) return 0;
    if (e % BigInt(this.cs) !== 0n || e > BigInt(Number.MAX_SAFE_INTEGER)) return -1;
    return Number(e);
  }

  private storedAt(block: Buffer, idx: number): number {
    const order = this.h.refcountOrder;
    switch (order) {
      case 3:
        return block[idx]!;
      case 4:
        return block.readUInt16BE(idx * 2);
      case 5:
        return block.readUInt32BE(idx * 4);
      case 6:
        return Number(block.readBigUInt64BE(idx * 8));
      default: {
        const w = 1 << order;
        const per = 8 / w;
        return (block[Math.floor(idx / per)]! >> ((idx % per) * w)) & ((1 << w) - 1);
      }
    }
  }

  /** First pass over the refcount blocks: which clusters have a stored refcount of exactly 1. */
  private async loadDiskOnes(nb: number): Promise<void> {
    this.diskOne = new Bits(nb + 1);
    this.diskBad = new Bits(nb + 1);
    const blocks = Math.ceil((nb + 1) / this.epb);
    const scratch = Buffer.allocUnsafe(this.cs);
    for (let b = 0; b < blocks; b++) {
      const off = this.blockOffset(b);
      if (off === 0) continue;
      const lo = b * this.epb;
      const hi = Math.min(nb + 1, lo + this.epb);
      if (off < 0) {
        for (let k = lo; k < hi; k++) this.diskBad.set(k);
        continue;
      }
      const blk = await this.read(this.cs, off, scratch);
      for (let k = lo; k < hi; k++) if (this.storedAt(blk, k - lo) === 1) this.diskOne.set(k);
    }
  }

  /** Stored refcount of cluster `k` (null: unreadable). Slow path, for messages and far clusters. */
  private async storedRefcount(k: number): Promise<number | null> {
    const b = Math.floor(k / this.epb);
    const off = this.blockOffset(b);
    if (off === 0) return 0;
    if (off < 0) return null;
    let blk = this.blockCache.get(off);
    if (!blk) {
      blk = await this.read(this.cs, off);
      if (this.blockCache.size >= 8) this.blockCache.delete(this.blockCache.keys().next().value!);
      this.blockCache.set(off, blk);
    }
    return this.storedAt(blk, k % this.epb);
  }

  /**
   * Bit 63 of an active L1/L2 entry must say "stored refcount is exactly 1" (QEMU's OFLAG_COPIED
   * check, against the stored refcounts). Clusters past the file are judged at the end.
   */
  private judgeCopied(k: number, copied: boolean, line: string): void {
    if (this.diskBad.has(k)) return; // unreadable refcount: QEMU skips it silently
    if (k > this.nb) {
      this.farCopied.push({ k, copied, line });
      return;
    }
    if (this.diskOne.has(k) === copied) return;
    this.res.corruptions++;
    this.copiedMessages.push(`${line} refcount${this.diskOne.has(k) ? '=1' : '!=1'}`);
  }
  private farCopied: { k: number; copied: boolean; line: string }[] = [];

  /** Refcount table entries and the blocks they point at (QEMU's check_refblocks). */
  private checkRefblocks(): void {
    for (let i = 0; i < this.refTableEntries; i++) {
      const unset = emptyRefTableEntries(this.refTable, i, this.refTableEntries - i);
      if (unset > 0) {
        i += unset - 1;
        continue;
      }
      const raw = this.refTable.readBigUInt64BE(i * 8);
      if ((raw & 0x1ffn) !== 0n) {
        this.corruption(`ERROR refcount table entry ${i} has reserved bits set`);
        continue;
      }
      if (raw % BigInt(this.cs) !== 0n) {
        this.corruption(`ERROR refcount block ${i} is not cluster aligned; refcount table entry corrupted`);
        continue;
      }
      const cluster = raw / BigInt(this.cs);
      if (cluster >= BigInt(this.counts.size)) {
        this.corruption(`ERROR refcount block ${i} is outside image`);
        continue;
      }
      const k = Number(cluster);
      this.inc(k * this.cs, this.cs);
      this.res.refcountBlocks++;
      const c = this.counts.get(k);
      if (c !== 1) this.corruption(`ERROR refcount block ${i} refcount=${c}`);
    }
  }

  /** Stored against computed, cluster by cluster, streaming the refcount blocks. */
  private async compare(): Promise<void> {
    const nb = this.counts.size;
    let highest = 0;
    const blocks = Math.ceil(nb / this.epb);
    const scratch = Buffer.allocUnsafe(this.cs);
    for (let b = 0; b < blocks; b++) {
      const lo = b * this.epb;
      const hi = Math.min(nb, lo + this.epb);
      const off = this.blockOffset(b);
      if (off < 0) {
        for (let k = lo; k < hi; k++) {
          this.res.checkErrors++;
          this.say(`Can't get refcount for cluster ${k}: refcount block ${b} is not cluster-aligned`);
        }
        continue;
      }
      const blk = off === 0 ? null : await this.read(this.cs, off, scratch);
      for (let k = lo; k < hi; k++) {
        const stored = blk === null ? 0 : this.storedAt(blk, k - lo);
        const computed = this.counts.get(k);
        if (stored > 0 || computed > 0) highest = k;
        if (stored === computed) continue;
        if (stored < computed) this.corruption(`ERROR cluster ${k} refcount=${stored} reference=${computed}`);
        else {
          this.res.leaks++;
          this.say(`Leaked cluster ${k} refcount=${stored} reference=${computed}`);
        }
      }
    }
    this.res.imageEndOffset = (highest + 1) * this.cs;
    // Copied flags of clusters past the end of the file: their stored refcounts one by one.
    for (const { k, copied, line } of this.farCopied) {
      const stored = await this.storedRefcount(k);
      if (stored === null || (stored === 1) === copied) continue;
      this.res.corruptions++;
      this.copiedMessages.push(`${line} refcount=${stored}`);
    }
  }
}

/** A one-line summary in qemu-img's words. */
export function describeCheck(r: Qcow2CheckResult): string {
  if (r.fatal !== null) return `cannot be checked: ${r.fatal}`;
  const parts: string[] = [];
  if (r.corruptions) parts.push(`${r.corruptions} error(s)`);
  if (r.leaks) parts.push(`${r.leaks} leaked cluster(s)`);
  if (r.checkErrors) parts.push(`${r.checkErrors} check error(s)`);
  return parts.length ? parts.join(', ') : 'no errors';
}
