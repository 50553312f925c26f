// One qcow2 image: validated header, L1 table, an LRU cache of L2 tables, cluster
// lookup (standard and extended L2, zero and compressed clusters), block status per
// layer, data reads, and the refcount reader. Every size taken from the file is
// bounded before anything is allocated for it.
import * as zlib from 'node:zlib';
import { Qcow2Error } from './errors.js';
import { checkReadable, decodeHeader, INCOMPAT_EXTL2, QCOW2_MAGIC, V3_MIN_HEADER_LENGTH, type Qcow2Header } from './header.js';
import { zstdFrameLength } from './zstd.js';
import { NodeBlockFile, type BlockFile } from './io.js';
import { compressedBytes, decodeL2Entry, l1EntryCopied, l1EntryOffset, zeroEntries, type L2Entry } from './l2.js';
import { entriesPerBlock, getRefcount, refTableEntry } from './refcount.js';

/** QEMU's limits. */
export const MAX_L1_BYTES = 32 << 20;
export const MAX_REFTABLE_BYTES = 8 << 20;
/** Dropped L2 table buffers kept for reuse (bytes; at least 4 tables): a writer's dirty tables come from here. */
const SPARE_TABLE_BYTES = 4 << 20;

export type ExtentKind = 'data' | 'zero' | 'unallocated' | 'compressed';

export interface CompressedCluster {
  /** Host byte offset of the compressed stream. */
  host: number;
  /** Bytes to read (clamped to EOF when read). */
  size: number;
  /** Guest offset of the cluster. */
  clusterStart: number;
}

/** A guest range with one status in one layer (like bdrv_block_status). */
export interface Extent {
  offset: number;
  length: number;
  kind: ExtentKind;
  /**
   * Host offset of `offset`: always for data; for zero and unallocated ranges only when the
   * cluster has a host cluster (preallocated zero cluster, extended-L2 cluster).
   */
  host?: number;
  compressed?: CompressedCluster;
}

/** Decoded L2 entry of one cluster. */
export type ClusterEntry =
  | { type: 'compressed'; host: number; size: number }
  /** `alloc`/`zero`: one bit per subcluster (bit 0 only without extended L2). */
  | { type: 'standard'; host: number; alloc: number; zero: number; copied: boolean };

/** Reusable decode target (no allocation per cluster). */
export interface ScratchEntry extends L2Entry {
  /** compressed: bytes to read */
  size: number;
}

export interface OpenOptions {
  writable?: boolean;
  /** Use this file instead of opening `path` (tests wrap files). */
  file?: BlockFile;
  /** Byte budget of the L2 cache (default 2 MiB, at least two tables). */
  l2CacheBytes?: number;
  /** Read data past the page cache where the file system suits it (NodeBlockFile.open). */
  directReads?: boolean;
}

const hasZstd = (): boolean => typeof (zlib as unknown as { zstdDecompressSync?: unknown }).zstdDecompressSync === 'function';

export function safeNumber(v: bigint, what: string, path?: string): number {
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new Qcow2Error('QCOW2_TOO_LARGE', `${what} ${v} is beyond 2^53`, path);
  return Number(v);
}

export class Qcow2Image {
  readonly clusterBits: number;
  readonly clusterSize: number;
  readonly extendedL2: boolean;
  /** L2 entries per table. */
  readonly l2Entries: number;
  /** Subclusters per cluster (32 with extended L2, else 1). */
  readonly subclusters: number;
  readonly subclusterSize: number;
  readonly virtualSize: number;
  readonly l1TableOffset: number;
  /** Where the refcount table is; changes only through moveRefcountTable(). */
  refcountTableOffset: number;
  refcountTableEntries: number;
  private l2Cache = new Map<number, Buffer>();
  private readonly l2CacheMax: number;
  /**
   * Table buffers dropped from the cache, reused for later misses: a scan over a huge disk then
   * allocates nothing per table, where fresh buffers would pile up as external memory until V8
   * collects them (tens of MiB of RSS). A dropped buffer is reused only from the next
   * macrotask on: a caller that awaited a table has used it by then (no caller keeps a table
   * across an await).
   */
  private spareTables: Buffer[] = [];
  private droppedTables: Buffer[] = [];
  private releaseScheduled = false;
  private refTable: Buffer | null = null;
  private refBlockCache = new Map<number, Buffer>();
  private lastCompressed: { host: number; data: Buffer } | null = null;
  private readonly scratch: ScratchEntry = { type: 'standard', host: 0, alloc: 0, zero: 0, copied: false, sectors: 0, size: 0 };

  private constructor(
    readonly path: string,
    readonly file: BlockFile,
    public header: Qcow2Header,
    public fileSize: number,
    /** The active L1 table (l1_size entries, big-endian u64). */
    readonly l1: Buffer,
    readonly writable: boolean,
    l2CacheBytes: number,
  ) {
    this.clusterBits = header.clusterBits;
    this.clusterSize = header.clusterSize;
    this.extendedL2 = (header.incompatibleFeatures & INCOMPAT_EXTL2) !== 0n;
    this.l2Entries = this.clusterSize / (this.extendedL2 ? 16 : 8);
    this.subclusters = this.extendedL2 ? 32 : 1;
    this.subclusterSize = this.clusterSize / this.subclusters;
    this.virtualSize = Number(header.size);
    this.l1TableOffset = Number(header.l1TableOffset);
    this.refcountTableOffset = Number(header.refcountTableOffset);
    this.refcountTableEntries = (header.refcountTableClusters * this.clusterSize) / 8;
    this.l2CacheMax = Math.max(2, Math.floor(l2CacheBytes / this.clusterSize));
  }

  static async open(path: string, opts: OpenOptions = {}): Promise<Qcow2Image> {
    const file = opts.file ?? (await NodeBlockFile.open(path, opts.writable ?? false, { directReads: opts.directReads ?? false }));
    try {
      return await Qcow2Image.init(path, file, opts);
    } catch (e) {
      if (!opts.file) await file.close();
      if (e instanceof Qcow2Error && e.path === undefined) throw new Qcow2Error(e.code, `${path}: ${e.message}`, path);
      throw e;
    }
  }

  private static async init(path: string, file: BlockFile, opts: OpenOptions): Promise<Qcow2Image> {
    const fileSize = await file.size();
    const probe = Buffer.alloc(V3_MIN_HEADER_LENGTH + 8);
    const n = await file.read(probe, 0, probe.length, 0);
    if (n < 4 || probe.readUInt32BE(0) !== QCOW2_MAGIC) throw new Qcow2Error('QCOW2_BAD_MAGIC', 'not a qcow2 image (bad magic)');
    if (n < 24) throw new Qcow2Error('QCOW2_TRUNCATED', 'qcow2 header truncated');
    const bits = probe.readUInt32BE(20);
    if (bits < 9 || bits > 21) throw new Qcow2Error('QCOW2_BAD_HEADER', `unsupported cluster_bits ${bits} (must be 9..21)`);
    const c0 = Buffer.alloc(1 << bits);
    const got = await file.read(c0, 0, c0.length, 0);
    const header = decodeHeader(c0.subarray(0, got));
    checkReadable(header);
    const cs = header.clusterSize;
    const ext = (header.incompatibleFeatures & INCOMPAT_EXTL2) !== 0n;
    const size = safeNumber(header.size, 'virtual size');
    const l2Entries = cs / (ext ? 16 : 8);
    const needL1 = Math.ceil(size / (cs * l2Entries));
    if (header.l1Size * 8 > MAX_L1_BYTES)
      throw new Qcow2Error('QCOW2_TOO_LARGE', `L1 table of ${header.l1Size} entries is larger than 32 MiB`);
    if (header.l1Size < needL1)
      throw new Qcow2Error('QCOW2_CORRUPT', `L1 table too small (${header.l1Size} < ${needL1} entries) for the virtual size`);
    const l1Off = safeNumber(header.l1TableOffset, 'L1 table offset');
    if (header.l1Size > 0) {
      if (l1Off % cs !== 0 || l1Off === 0)
        throw new Qcow2Error('QCOW2_CORRUPT', `L1 table offset ${l1Off} is not cluster-aligned or overlaps the header`);
      if (l1Off + header.l1Size * 8 > fileSize)
        throw new Qcow2Error('QCOW2_CORRUPT', `L1 table at ${l1Off} extends past the end of the file`);
    }
    const rtOff = safeNumber(header.refcountTableOffset, 'refcount table offset');
    if (header.refcountTableClusters * cs > MAX_REFTABLE_BYTES)
      throw new Qcow2Error('QCOW2_TOO_LARGE', `refcount table of ${header.refcountTableClusters} clusters is larger than 8 MiB`);
    if (rtOff % cs !== 0 || rtOff === 0)
      throw new Qcow2Error('QCOW2_CORRUPT', `refcount table offset ${rtOff} is not cluster-aligned or overlaps the header`);
    if (header.refcountTableClusters === 0) throw new Qcow2Error('QCOW2_CORRUPT', 'empty refcount table');
    if (rtOff + header.refcountTableClusters * cs > fileSize)
      throw new Qcow2Error('QCOW2_CORRUPT', `refcount table at ${rtOff} extends past the end of the file`);
    if (header.l1Size > 0 && rangesOverlap(l1Off, header.l1Size * 8, rtOff, header.refcountTableClusters * cs))
      throw new Qcow2Error('QCOW2_CORRUPT', 'L1 table and refcount table overlap');
    const l1 = Buffer.alloc(header.l1Size * 8);
    if (l1.length) {
      const r = await file.read(l1, 0, l1.length, l1Off);
      if (r !== l1.length) throw new Qcow2Error('QCOW2_TRUNCATED', 'L1 table truncated');
    }
    return new Qcow2Image(path, file, header, fileSize, l1, opts.writable ?? false, opts.l2CacheBytes ?? 2 << 20);
  }

  async close(): Promise<void> {
    await this.file.close();
  }

  /** Host offset of the L2 table of L1 index `i` (0 = none). Validated. */
  l2Offset(i: number): number {
    if (i >= this.header.l1Size) return 0;
    const off = l1EntryOffset(this.l1, i);
    if (off === 0) return 0;
    if (off % this.clusterSize !== 0)
      throw new Qcow2Error('QCOW2_CORRUPT', `L2 table offset ${off} (L1 index ${i}) is not cluster-aligned`, this.path);
    if (off + this.clusterSize > this.fileSize)
      throw new Qcow2Error('QCOW2_CORRUPT', `L2 table offset ${off} (L1 index ${i}) is past the end of the file`, this.path);
    if (off < this.clusterSize) throw new Qcow2Error('QCOW2_CORRUPT', `L2 table (L1 index ${i}) overlaps the header`, this.path);
    if (rangesOverlap(off, this.clusterSize, this.l1TableOffset, this.l1.length))
      throw new Qcow2Error('QCOW2_CORRUPT', `L2 table (L1 index ${i}) overlaps the L1 table`, this.path);
    if (rangesOverlap(off, this.clusterSize, this.refcountTableOffset, this.refcountTableEntries * 8))
      throw new Qcow2Error('QCOW2_CORRUPT', `L2 table (L1 index ${i}) overlaps the refcount table`, this.path);
    return off;
  }

  l1Copied(i: number): boolean {
    return l1EntryCopied(this.l1, i);
  }

  /** The L2 table of L1 index `i` if no read is needed (null: unallocated), else undefined. */
  l2TableCached(i: number): Buffer | null | undefined {
    const off = this.l2Offset(i);
    if (off === 0) return null;
    return this.l2Cache.get(off);
  }

  /** The L2 table of L1 index `i`, or null when unallocated. Cached (LRU). */
  async l2Table(i: number): Promise<Buffer | null> {
    const off = this.l2Offset(i);
    if (off === 0) return null;
    const hit = this.l2Cache.get(off);
    if (hit) {
      this.l2Cache.delete(off);
      this.l2Cache.set(off, hit);
      return hit;
    }
    const t = this.spareTables.pop() ?? Buffer.alloc(this.clusterSize);
    const n = await this.file.read(t, 0, t.length, off);
    if (n !== t.length) throw new Qcow2Error('QCOW2_TRUNCATED', `L2 table at ${off} truncated`, this.path);
    this.dropTable(this.l2Cache.get(off)); // a concurrent miss of the same table got there first
    this.l2Cache.set(off, t);
    this.trimL2Cache();
    return t;
  }

  /** How many L2 tables the cache holds. */
  get l2CacheTables(): number {
    return this.l2CacheMax;
  }

  hasCachedL2(off: number): boolean {
    return this.l2Cache.has(off);
  }

  /** A table buffer (from tableBuffer()) its user is done with. */
  releaseTable(t: Buffer): void {
    this.dropTable(t);
  }

  /** A cluster-sized buffer for an L2 table (a reused one when there is one; contents undefined). */
  tableBuffer(): Buffer {
    return this.spareTables.pop() ?? Buffer.allocUnsafe(this.clusterSize);
  }

  private trimL2Cache(): void {
    while (this.l2Cache.size > this.l2CacheMax) {
      const [off, t] = this.l2Cache.entries().next().value!;
      this.l2Cache.delete(off);
      this.dropTable(t);
    }
  }

  private dropTable(t: Buffer | undefined): void {
    if (!t || t.length !== this.clusterSize) return;
    this.droppedTables.push(t);
    if (this.releaseScheduled) return;
    this.releaseScheduled = true;
    setImmediate(() => {
      this.releaseScheduled = false;
      const max = Math.max(4, Math.floor(SPARE_TABLE_BYTES / this.clusterSize));
      for (const b of this.droppedTables.splice(0)) if (this.spareTables.length < max) this.spareTables.push(b);
    }).unref();
  }

  /** Replace a cached L2 table (the writer keeps the cache coherent with what it wrote). */
  cacheL2(off: number, table: Buffer): void {
    const old = this.l2Cache.get(off);
    this.l2Cache.delete(off);
    if (old !== table) this.dropTable(old);
    this.l2Cache.set(off, table);
    this.trimL2Cache();
  }

  /** Decode the L2 entry of guest cluster `c` from its table. */
  decodeEntry(table: Buffer | null, c: number): ClusterEntry {
    const out: ScratchEntry = { type: 'standard', host: 0, alloc: 0, zero: 0, copied: false, sectors: 0, size: 0 };
    this.entryInto(table, c, out);
    return out.type === 'compressed'
      ? { type: 'compressed', host: out.host, size: out.size }
      : { type: 'standard', host: out.host, alloc: out.alloc, zero: out.zero, copied: out.copied };
  }

  /** Decode into `out` without allocating (status scans run over every cluster of the disk). */
  entryInto(table: Buffer | null, c: number, out: ScratchEntry): void {
    out.size = 0;
    if (table === null) {
      out.type = 'standard';
      out.host = 0;
      out.alloc = 0;
      out.zero = 0;
      out.copied = false;
      out.sectors = 0;
      return;
    }
    decodeL2Entry(table, c % this.l2Entries, this, out);
    const host = out.host;
    if (out.type === 'compressed') {
      if (host >= 2 ** 56) throw new Qcow2Error('QCOW2_CORRUPT', `compressed cluster ${c}: host offset out of range`, this.path);
      if (this.extendedL2 && (out.alloc | out.zero) !== 0)
        throw new Qcow2Error('QCOW2_CORRUPT', `compressed cluster ${c} has a subcluster bitmap`, this.path);
      if (host >= this.fileSize)
        throw new Qcow2Error('QCOW2_CORRUPT', `compressed cluster ${c} at ${host} is past the end of the file`, this.path);
      out.size = compressedBytes(out);
      out.alloc = 0;
      out.zero = 0;
      out.copied = false;
      return;
    }
    if (host % this.clusterSize !== 0)
      throw new Qcow2Error('QCOW2_CORRUPT', `cluster ${c}: host offset ${host} is not cluster-aligned`, this.path);
    if (host !== 0 && host >= this.fileSize)
      throw new Qcow2Error('QCOW2_CORRUPT', `cluster ${c}: host offset ${host} is past the end of the file`, this.path);
    if (host !== 0 && host < this.clusterSize) throw new Qcow2Error('QCOW2_CORRUPT', `cluster ${c}: data overlaps the header`, this.path);
    if (this.extendedL2) {
      if ((out.alloc & out.zero) !== 0)
        throw new Qcow2Error('QCOW2_CORRUPT', `cluster ${c}: subclusters both allocated and zero`, this.path);
      if (out.alloc !== 0 && host === 0)
        throw new Qcow2Error('QCOW2_CORRUPT', `cluster ${c}: allocated subclusters without a host cluster`, this.path);
      return;
    }
    if (out.zero) return;
    if (host === 0 && out.copied) throw new Qcow2Error('QCOW2_CORRUPT', `cluster ${c}: copied flag without a host offset`, this.path);
  }

  async entry(c: number): Promise<ClusterEntry> {
    return this.decodeEntry(await this.l2Table(Math.floor(c / this.l2Entries)), c);
  }

  /**
   * Status of the guest range starting at `offset` (< virtual size): the longest run, up to
   * `maxLen`, with one status (and contiguous host offsets where there are any).
   */
  async status(offset: number, maxLen: number): Promise<Extent> {
    if (!(offset >= 0 && offset < this.virtualSize) || !(maxLen > 0))
      throw new Qcow2Error('QCOW2_RANGE', `status at ${offset} outside the virtual disk`, this.path);
    const end = Math.min(offset + maxLen, this.virtualSize);
    const cs = this.clusterSize;
    const span = cs * this.l2Entries;
    let out: Extent | null = null;
    let pos = offset;
    const e = this.scratch;
    const sub = this.subclusterSize;
    // One table lookup per L2 table, then a plain loop over its entries: a scan of a huge
    // sparse disk costs an entry decode per cluster, nothing more.
    scan: while (pos < end) {
      const l1i = Math.floor(pos / span);
      let table = this.l2TableCached(l1i);
      if (table === undefined) table = await this.l2Table(l1i);
      const tEnd = Math.min((l1i + 1) * span, end);
      while (pos < tEnd) {
        let kind: ExtentKind;
        let pEnd: number;
        let host = -1;
        const c = Math.floor(pos / cs);
        const unset = table === null ? 0 : zeroEntries(table, c % this.l2Entries, Math.ceil((tEnd - c * cs) / cs), this);
        if (table === null || unset > 0) {
          kind = 'unallocated';
          pEnd = table === null ? tEnd : Math.min((c + unset) * cs, tEnd);
        } else {
          this.entryInto(table, c, e);
          const cEnd = Math.min((c + 1) * cs, end);
          if (e.type === 'compressed') {
            if (out !== null) break scan;
            return {
              offset: pos,
              length: cEnd - pos,
              kind: 'compressed',
              compressed: { host: e.host, size: e.size, clusterStart: c * cs },
            };
          }
          const within = pos - c * cs;
          const si = Math.floor(within / sub);
          const bit = 1 << si;
          kind = e.alloc & bit ? 'data' : e.zero & bit ? 'zero' : 'unallocated';
          pEnd = Math.min(c * cs + (si + 1) * sub, end);
          if (e.host !== 0) host = e.host + within;
        }
        if (out === null) {
          out = { offset: pos, length: pEnd - pos, kind };
          if (host >= 0) out.host = host;
        } else if (
          out.kind === kind &&
          (out.host === undefined) === host < 0 &&
          (out.host === undefined || out.host + out.length === host)
        ) {
          out.length += pEnd - pos;
        } else break scan;
        pos = pEnd;
      }
    }
    return out!;
  }

  /** Decompressed content of a compressed cluster (exactly one cluster). */
  async readCompressed(cc: CompressedCluster): Promise<Buffer> {
    if (this.lastCompressed && this.lastCompressed.host === cc.host) return this.lastCompressed.data;
    const len = Math.max(0, Math.min(cc.size, this.fileSize - cc.host));
    const src = Buffer.alloc(len);
    const n = await this.file.read(src, 0, len, cc.host);
    let out: Buffer;
    try {
      if (this.header.compressionType === 1) {
        const z = zlib as unknown as { zstdDecompressSync?: (b: Buffer, o: object) => Buffer };
        if (!hasZstd() || !z.zstdDecompressSync)
          throw new Qcow2Error('QCOW2_UNSUPPORTED_FEATURE', 'zstd-compressed clusters need Node with zstd support', this.path);
        const frame = zstdFrameLength(src.subarray(0, n));
        if (frame === null) throw new Error('not a complete zstd frame');
        out = z.zstdDecompressSync(src.subarray(0, frame), { maxOutputLength: this.clusterSize });
      } else {
        out = zlib.inflateRawSync(src.subarray(0, n), { maxOutputLength: this.clusterSize, finishFlush: zlib.constants.Z_SYNC_FLUSH });
      }
    } catch (e) {
      if (e instanceof Qcow2Error) throw e;
      throw new Qcow2Error(
        'QCOW2_COMPRESSED_DATA',
        `compressed cluster at ${cc.host} does not decompress: ${(e as Error).message}`,
        this.path,
      );
    }
    if (out.length !== this.clusterSize)
      throw new Qcow2Error(
        'QCOW2_COMPRESSED_DATA',
        `compressed cluster at ${cc.host} decompresses to ${out.length} bytes, not ${this.clusterSize}`,
        this.path,
      );
    this.lastCompressed = { host: cc.host, data: out };
    return out;
  }

  /** Read host bytes; zero-fills a tail past the end of the file. */
  async readHost(buf: Buffer, bufOffset: number, length: number, host: number): Promise<void> {
    const n = await this.file.read(buf, bufOffset, length, host);
    if (n < length) buf.fill(0, bufOffset + n, bufOffset + length);
  }

  static zstdAvailable(): boolean {
    return hasZstd();
  }

  // ---- refcounts -------------------------------------------------------------------------

  get refcountEntriesPerBlock(): number {
    return entriesPerBlock(this.clusterSize, this.header.refcountOrder);
  }

  async refcountTable(): Promise<Buffer> {
    if (this.refTable) return this.refTable;
    const t = Buffer.alloc(this.refcountTableEntries * 8);
    const n = await this.file.read(t, 0, t.length, this.refcountTableOffset);
    if (n !== t.length) throw new Qcow2Error('QCOW2_TRUNCATED', 'refcount table truncated', this.path);
    this.refTable = t;
    return t;
  }

  /** Host offset of refcount block `i` (0 = none). Validated. */
  async refBlockOffset(i: number): Promise<number> {
    if (i >= this.refcountTableEntries) return 0;
    const t = await this.refcountTable();
    const e = refTableEntry(t, i);
    if ((e & 0x1ffn) !== 0n) throw new Qcow2Error('QCOW2_CORRUPT', `refcount table entry ${i} has reserved bits set`, this.path);
    const off = safeNumber(e, 'refcount block offset', this.path);
    if (off === 0) return 0;
    if (off % this.clusterSize !== 0 || off + this.clusterSize > this.fileSize || off < this.clusterSize)
      throw new Qcow2Error('QCOW2_CORRUPT', `refcount block ${i} at ${off} is misaligned or outside the file`, this.path);
    return off;
  }

  async refBlock(i: number): Promise<Buffer | null> {
    const off = await this.refBlockOffset(i);
    if (off === 0) return null;
    const hit = this.refBlockCache.get(off);
    if (hit) return hit;
    const b = Buffer.alloc(this.clusterSize);
    const n = await this.file.read(b, 0, b.length, off);
    if (n !== b.length) throw new Qcow2Error('QCOW2_TRUNCATED', `refcount block at ${off} truncated`, this.path);
    if (this.refBlockCache.size >= 16) this.refBlockCache.delete(this.refBlockCache.keys().next().value!);
    this.refBlockCache.set(off, b);
    return b;
  }

  /** Refcount of the host cluster with index `hostCluster`. */
  async refcount(hostCluster: number): Promise<bigint> {
    const epb = this.refcountEntriesPerBlock;
    const b = await this.refBlock(Math.floor(hostCluster / epb));
    return b === null ? 0n : getRefcount(b, hostCluster % epb, this.header.refcountOrder);
  }

  /** The header now points at a new refcount table (a writer grew it): follow it. */
  moveRefcountTable(offset: number, clusters: number): void {
    this.header.refcountTableOffset = BigInt(offset);
    this.header.refcountTableClusters = clusters;
    this.refcountTableOffset = offset;
    this.refcountTableEntries = (clusters * this.clusterSize) / 8;
    this.dropRefcountCache();
  }

  /** Forget cached refcount metadata (after the writer changed it). */
  dropRefcountCache(): void {
    this.refTable = null;
    this.refBlockCache.clear();
  }
}

export function rangesOverlap(a: number, alen: number, b: number, blen: number): boolean {
  return a < b + blen && b < a + alen;
}
