// The rebase writer: allocates at EOF, copies the old view's data through the shared copy
// pipeline (a few reads in flight, one write at a time), edits L2 tables, and makes each batch durable in the crash-safe
// order (docs/qcow2-notes.md §7): data and refcounts (new refcount blocks counted, and
// written, before they are linked) → fdatasync → refcount table entries, in rounds so no
// block is linked before the block counting it (fdatasync after each) → L2 (new tables
// complete before linking) → fdatasync → L1 → fdatasync.
import { Qcow2Error } from '../errors.js';
import { writeRefcounts } from '../grow.js';
import type { Qcow2Image, ScratchEntry } from '../image.js';
import { encodeL1Entry, encodeL2Entry, l2EntrySize } from '../l2.js';
import { encodeRefTableEntry, entriesPerBlock, refTableEntry } from '../refcount.js';
import type { ImageChain } from '../view.js';
import { BufferPool, copyImage, type CopyBufferPool, type CopyRange, type CopySink, type CopySource } from '../copy/engine.js';
import type { SourceMap, WorkItem } from './plan.js';

// Requests in flight × their size is the data in memory: large enough for the disk to stream,
// small enough that peak RSS stays within 32 MiB of the idle program's.
export const COPY_REQUEST = 1 << 20;
export const COPY_BUFFERS = 4;
/** Dirty L2 tables held per batch (each batch rewrites them): bounds memory on huge sparse disks. */
const MAX_DIRTY_L2_BYTES = 4 << 20;
/** Patches of an existing L2 table at most this far apart go in one write. */
const L2_PATCH_GAP = 64 << 10;
/** L2 tables written at once in flush(), and the most their scratch buffers may hold. */
const L2_WRITES_IN_FLIGHT = 4;
const L2_WRITE_BYTES = 1 << 20;
/** Bytes written between two early writebacks (one at a time). */
const WRITEBACK_BYTES = 64 << 20;

interface DirtyL2 {
  off: number;
  /** A new table: all of it (written whole before it is linked). Null for an existing table. */
  table: Buffer | null;
  /**
   * An existing table: the edited entries only, a piece per work item, in table order. Whole
   * copies of every touched table would make memory grow with a sparse delta's disk size.
   */
  patches: Array<{ at: number; bytes: Buffer }>;
}

/**
 * The new refcount blocks in rounds: each one's own cluster is counted by an existing block,
 * by itself, or by a block of an earlier round. A sync separates rounds, since writes between
 * syncs may reach the disk in any order.
 */
function linkRounds<B extends { off: number }>(blocks: Map<number, B>, cs: number, epb: number): Array<Array<[number, B]>> {
  const rounds: Array<Array<[number, B]>> = [];
  const linked = new Set<number>();
  const pending = new Map(blocks);
  while (pending.size) {
    const round: Array<[number, B]> = [];
    for (const [ti, b] of pending) {
      const by = Math.floor(b.off / cs / epb);
      if (by === ti || !blocks.has(by) || linked.has(by)) round.push([ti, b]);
    }
    if (!round.length) throw new Error('new refcount blocks count each other in a cycle'); // cannot happen: allocated in table order
    for (const [ti] of round) {
      linked.add(ti);
      pending.delete(ti);
    }
    rounds.push(round);
  }
  return rounds;
}

/** Host reads of one request at once, at most (as ImageChain.readInto). */
const SOURCE_READS_IN_FLIGHT = 4;

/**
 * Guest bytes of the old view (layer 1 down) into buf: where the plan's map knows the data,
 * straight from the layer's file; anything else (a unit's edge it did not see as data, e.g.
 * from a layer with smaller clusters) through the chain as before.
 */
async function readMapped(chain: ImageChain, m: SourceMap, buf: Buffer, bufOffset: number, offset: number, length: number): Promise<void> {
  const end = offset + length;
  let group: Array<Promise<void>> = [];
  try {
    let i = m.find(offset);
    for (let pos = offset; pos < end;) {
      const at = bufOffset + (pos - offset);
      if (i < m.length && m.guest[i]! <= pos) {
        const n = Math.min(end, m.guest[i]! + m.len[i]!) - pos;
        group.push(chain.images[m.depth[i]!]!.readHost(buf, at, n, m.host[i]! + (pos - m.guest[i]!)));
        pos += n;
        i++;
      } else {
        const n = (i < m.length ? Math.min(end, m.guest[i]!) : end) - pos;
        group.push(chain.readInto(buf, at, pos, n, 1));
        pos += n;
      }
      if (group.length >= SOURCE_READS_IN_FLIGHT || pos >= end) {
        const g = group;
        group = [];
        await settleAll(g);
      }
    }
  } finally {
    // Nothing stays in flight into the buffer once this settles.
    await Promise.allSettled(group);
  }
}

/** Wait for every promise, then throw the first failure. */
async function settleAll(ps: Array<Promise<void>>): Promise<void> {
  const failed = (await Promise.allSettled(ps)).find((r) => r.status === 'rejected');
  if (failed) throw failed.reason;
}

/** Guest bytes of the old view going to host bytes of the target (merged when both continue). */
interface CopyMap {
  guest: number;
  dest: number;
  len: number;
}

/**
 * Takes the work items in guest order, batch by batch: each batch's copies run through the
 * shared copy pipeline (copyImage, streamed ranges, this writer as its sink), then flush()
 * makes the batch durable in the order above.
 */
export class Writer implements CopySink {
  private readonly T: Qcow2Image;
  private readonly cs: number;
  /** The copy unit: a subcluster (a cluster without extended L2). */
  readonly unit: number;
  private batchStart: number;
  private dirty = new Map<number, DirtyL2>();
  private dirtyBytes = 0;
  /** Guest → host of the batch's copies, in guest order; consumed from `head` by writeData. */
  private maps: CopyMap[] = [];
  private head = 0;
  private headDone = 0;
  /** Guest ranges queued by add() and not yet handed to the copy. */
  private fresh: CopyRange[] = [];
  private writeTail: Promise<void> = Promise.resolve();
  private readonly pool: CopyBufferPool;
  private readonly source: CopySource;
  private readonly scratch: ScratchEntry = { type: 'standard', host: 0, alloc: 0, zero: 0, copied: false, sectors: 0, size: 0 };
  /** Early writeback: bytes written since the last one started, the one running, its failure. */
  private unflushed = 0;
  private writeback: Promise<void> | null = null;
  private writebackError: Error | null = null;
  private batchCopied = 0;
  copiedBytes = 0;
  newClusters = 0;
  batches = 0;

  constructor(
    chain: ImageChain,
    private nextFree: number,
    private readonly batchBytes: number,
    private readonly checkpoint?: () => void,
    copy: { requestBytes?: number; buffers?: number } = {},
    sources: SourceMap | null = null,
  ) {
    // A buffer holds at least one copy unit (a 2 MiB cluster without subclusters).
    this.pool = new BufferPool(copy.buffers ?? COPY_BUFFERS, Math.max(copy.requestBytes ?? COPY_REQUEST, chain.top.subclusterSize));
    this.T = chain.top;
    this.cs = this.T.clusterSize;
    this.unit = this.T.subclusterSize;
    this.batchStart = nextFree;
    // The old view (layer 1 down), read only where the plan found data: no status walk needed.
    // Whole clusters, even the last one past the virtual size (it reads as zeros there).
    this.source = {
      virtualSize: Math.ceil(this.T.virtualSize / this.cs) * this.cs,
      status: (_offset, maxLen) => Promise.resolve({ length: maxLen, kind: 'data' }),
      readInto: sources
        ? (buf, bufOffset, offset, length) => readMapped(chain, sources, buf, bufOffset, offset, length)
        : (buf, bufOffset, offset, length) => chain.readInto(buf, bufOffset, offset, length, 1),
    };
  }

  /**
   * All the work: batches of at most `batchBytes` copied (or MAX_DIRTY_L2_BYTES of L2 tables
   * edited), each made durable before the next starts; `checkpoint` before each copy request
   * and between batches.
   */
  async apply(items: AsyncIterable<WorkItem> | WorkItem[]): Promise<void> {
    const it: AsyncIterator<WorkItem> | Iterator<WorkItem> = Array.isArray(items)
      ? items[Symbol.iterator]()
      : items[Symbol.asyncIterator]();
    const state = { more: true };
    // The walk runs inside the copy: metadata is read while data moves.
    const batchRanges = async function* (this: Writer): AsyncGenerator<CopyRange> {
      for (;;) {
        const r = await it.next();
        if (r.done) {
          state.more = false;
          return;
        }
        await this.add(r.value);
        if (this.fresh.length) {
          const out = this.fresh;
          this.fresh = [];
          yield* out;
        }
        if (this.batchCopied >= this.batchBytes || this.dirtyBytes >= MAX_DIRTY_L2_BYTES) return;
      }
    };
    while (state.more) {
      // A stop inside a batch (checkpoint before each copy request) leaves its data in clusters
      // nothing references yet: the image is as before the batch, as after a crash there.
      await copyImage(this.source, this, {
        ranges: batchRanges.call(this),
        bufferPool: this.pool,
        unit: this.unit,
        detectZeros: false,
        ...(this.checkpoint ? { checkpoint: this.checkpoint } : {}),
      });
      await this.flush();
      if (state.more) this.checkpoint?.();
    }
  }

  private alloc(): number {
    const off = this.nextFree;
    this.nextFree += this.cs;
    this.newClusters++;
    return off;
  }

  private l2ForWrite(l1i: number): DirtyL2 {
    const d = this.dirty.get(l1i);
    if (d) return d;
    const off = this.T.l2Offset(l1i);
    let entry: DirtyL2;
    if (off === 0) {
      entry = { off: this.alloc(), table: this.T.tableBuffer().fill(0), patches: [] };
      this.dirtyBytes += this.cs;
    } else entry = { off, table: null, patches: [] };
    this.dirty.set(l1i, entry);
    return entry;
  }

  /** A run of clusters (one L2 table): allocate, queue the copies, edit the L2 entries in memory. */
  async add(item: WorkItem): Promise<void> {
    const T = this.T;
    const l1i = Math.floor(item.c / T.l2Entries);
    const d = this.l2ForWrite(l1i);
    const e = this.scratch;
    const us = T.subclusterSize;
    const esz = l2EntrySize(T);
    // Current entries: the new table, or the image's own (unchanged until flush(); no item
    // touches a cluster twice). Without extended L2 the work lands on unallocated clusters
    // only, whose entries the new ones replace whole: no read, which here would wait in the
    // thread pool behind the data and stall the copy (a thin delta touches many tables).
    const src = d.table ?? (T.extendedL2 ? (await T.l2Table(l1i))! : null);
    const first = item.c % T.l2Entries;
    const patch = d.table ? null : Buffer.allocUnsafe(item.n * esz);
    const dst = d.table ?? patch!;
    const base = d.table ? 0 : first;
    for (let c = item.c; c < item.c + item.n; c++) {
      T.entryInto(src, c, e);
      if (e.type !== 'standard') throw new Qcow2Error('QCOW2_CORRUPT', `cluster ${c} changed under the rebase`, T.path);
      let host = e.host;
      if (item.data && host === 0) host = this.alloc();
      for (let s = 0; s < T.subclusters;) {
        if (!(item.data & (1 << s))) {
          s++;
          continue;
        }
        let n = 1;
        while (s + n < T.subclusters && item.data & (1 << (s + n))) n++;
        this.copy(c * this.cs + s * us, host + s * us, n * us);
        s += n;
      }
      const idx = (c % T.l2Entries) - base;
      // New clusters are exclusively owned (COPIED); with extended L2 the bitmaps only gain bits.
      if (T.extendedL2)
        encodeL2Entry(dst, idx, T, {
          type: 'standard',
          host,
          alloc: e.alloc | item.data,
          zero: e.zero | item.zero,
          copied: host !== 0 || e.copied,
          sectors: 0,
        });
      else if (item.data) encodeL2Entry(dst, idx, T, { type: 'standard', host, alloc: 1, zero: 0, copied: true, sectors: 0 });
      else encodeL2Entry(dst, idx, T, { type: 'standard', host: 0, alloc: 0, zero: 1, copied: false, sectors: 0 });
    }
    if (patch) {
      d.patches.push({ at: first * esz, bytes: patch });
      this.dirtyBytes += patch.length;
    }
  }

  /** Queue a copy: its guest range for the pipeline, its host place for writeData. */
  private copy(guest: number, dest: number, len: number): void {
    this.batchCopied += len;
    this.copiedBytes += len;
    const f = this.fresh.at(-1);
    if (f && f.offset + f.length === guest) f.length += len;
    else this.fresh.push({ offset: guest, length: len });
    const m = this.maps.at(-1);
    if (m && this.maps.length > this.head && m.guest + m.len === guest && m.dest + m.len === dest) m.len += len;
    else this.maps.push({ guest, dest, len });
  }

  /** CopySink: guest bytes of the old view, in guest order, to the host places add() chose. */
  writeData(offset: number, buf: Buffer): Promise<void> {
    const parts: Array<Promise<void>> = [];
    for (let at = 0; at < buf.length;) {
      const m = this.maps[this.head];
      if (!m || m.guest + this.headDone !== offset + at)
        return Promise.reject(new Qcow2Error('QCOW2_RANGE', `copy of guest ${offset + at} was not planned by the rebase`, this.T.path));
      const n = Math.min(m.len - this.headDone, buf.length - at);
      parts.push(this.write(buf.subarray(at, at + n), m.dest + this.headDone));
      at += n;
      this.headDone += n;
      if (this.headDone === m.len) {
        this.head++;
        this.headDone = 0;
      }
    }
    return Promise.all(parts).then(() => {});
  }

  writeZero(offset: number): Promise<void> {
    // Zero detection is off and every range is data: the rebase never gets here.
    return Promise.reject(new Qcow2Error('QCOW2_RANGE', `unexpected zero run at guest ${offset}`, this.T.path));
  }

  /**
   * Writes go one at a time, in order (reads overlap them). Concurrent writes gain nothing on
   * a local disk and cost a lot where the NAS client splits them into small requests.
   */
  private write(view: Buffer, dest: number): Promise<void> {
    const file = this.T.file;
    const w = this.writeTail.then(() => file.write(view, dest));
    this.writeTail = w.catch(() => {});
    return w.then(() => {
      this.unflushed += view.length;
      // Start writing back early, so the batch's fdatasync finds little left to do and the
      // disk works while we copy. Only durability changes: the order of the batch holds.
      if (this.unflushed >= WRITEBACK_BYTES && this.writeback === null && file.writeback) {
        this.unflushed = 0;
        this.writeback = file.writeback().then(
          () => {
            this.writeback = null;
          },
          (e: unknown) => {
            this.writebackError ??= e instanceof Error ? e : new Error(String(e));
            this.writeback = null;
          },
        );
      }
    });
  }

  private async drain(): Promise<void> {
    while (this.writeback) await this.writeback;
    // A failed fdatasync may be reported once only: the next one could pass with data lost.
    if (this.writebackError) throw this.writebackError;
    if (this.head !== this.maps.length)
      throw new Qcow2Error('QCOW2_RANGE', `the copy ended with ${this.maps.length - this.head} planned run(s) unwritten`, this.T.path);
    this.maps = [];
    this.head = 0;
    this.headDone = 0;
  }

  /** One dirty L2 table to disk: a new one whole, an existing one its patches (see flush()). */
  private async writeL2(l1i: number, d: DirtyL2, scratch: Buffer): Promise<void> {
    const T = this.T;
    if (d.table) {
      await T.file.write(d.table, d.off);
      return;
    }
    for (let i = 0; i < d.patches.length;) {
      const at = d.patches[i]!.at;
      let k = i + 1;
      let end = at + d.patches[i]!.bytes.length;
      while (k < d.patches.length && d.patches[k]!.at - end <= L2_PATCH_GAP) end = d.patches[k]!.at + d.patches[k++]!.bytes.length;
      let bytes: Buffer;
      if (k === i + 1) bytes = d.patches[i]!.bytes;
      else {
        // The gaps come from the table as it is on disk (the cache is only updated after the
        // sync); copied before any await, so the cache cannot recycle the buffer meanwhile.
        const cur = await T.l2Table(l1i);
        if (!cur) throw new Qcow2Error('QCOW2_CORRUPT', `L2 table of L1 index ${l1i} vanished under the rebase`, T.path);
        bytes = scratch.subarray(0, end - at);
        cur.copy(bytes, 0, at, end);
        for (let x = i; x < k; x++) d.patches[x]!.bytes.copy(bytes, d.patches[x]!.at - at);
      }
      await T.file.write(bytes, d.off + at);
      i = k;
    }
  }

  async flush(): Promise<void> {
    await this.drain();
    if (this.nextFree === this.batchStart && this.dirty.size === 0) return;
    const T = this.T;
    const file = T.file;
    const cs = this.cs;
    this.batches++;
    // 1. refcounts of every cluster allocated in this batch, new refcount blocks included,
    // written with the data and made durable by the same fdatasync: a refcount that reaches
    // the disk before what it counts is a leak at most, and nothing links them yet.
    const epb = entriesPerBlock(cs, T.header.refcountOrder);
    const table = await T.refcountTable();
    const newBlocks = new Map<number, { off: number; buf: Buffer }>();
    const lo = this.batchStart / cs;
    for (;;) {
      const hi = this.nextFree / cs;
      let added = false;
      for (let ti = Math.floor(lo / epb); ti <= Math.floor((hi - 1) / epb); ti++) {
        if (ti >= T.refcountTableEntries)
          throw new Qcow2Error('QCOW2_REFCOUNT_TABLE_FULL', 'the refcount table would have to grow', T.path);
        if (refTableEntry(table, ti) === 0n && !newBlocks.has(ti)) {
          newBlocks.set(ti, { off: this.alloc(), buf: Buffer.alloc(cs) });
          added = true;
        }
      }
      if (!added) break;
    }
    await writeRefcounts(T, lo, this.nextFree / cs, 1n, newBlocks);
    // 2. data and refcounts
    await file.datasync();
    // Link order: a new block may be counted in another new block, and must not be reachable
    // before the block that counts it is (qemu-img check: "refcount=0 reference=1").
    for (const round of linkRounds(newBlocks, cs, epb)) {
      for (const [ti, nb] of round) {
        const b = Buffer.alloc(8);
        encodeRefTableEntry(b, 0, nb.off);
        await file.write(b, T.refcountTableOffset + ti * 8);
        encodeRefTableEntry(table, ti, nb.off);
      }
      await file.datasync();
    }
    // 3. L2 tables: new ones complete, existing ones the changed entries, pieces up to
    // L2_PATCH_GAP apart in one write with the unchanged entries between them as they are
    // (the same bytes again: harmless if torn). A thin delta otherwise costs one small
    // write, and one trip through the thread pool, per work item.
    // They go a few at once (no order among them before the sync): each existing one is a
    // read (the cache holds only a few tables) and a write, which a thin delta has hundreds of.
    T.fileSize = Math.max(T.fileSize, this.nextFree);
    const tables = this.dirty.entries();
    const worker = async (): Promise<void> => {
      const scratch = T.tableBuffer();
      try {
        for (let r = tables.next(); !r.done; r = tables.next()) await this.writeL2(r.value[0], r.value[1], scratch);
      } finally {
        T.releaseTable(scratch);
      }
    };
    const workers = Math.max(1, Math.min(L2_WRITES_IN_FLIGHT, Math.floor(L2_WRITE_BYTES / cs)));
    // Every write settled before a failure is reported: nothing stays in flight.
    const failedL2 = (await Promise.allSettled(Array.from({ length: workers }, worker))).find((r) => r.status === 'rejected');
    if (failedL2) throw failedL2.reason;
    await file.datasync();
    // 4. L1 entries of the new L2 tables.
    let l1Written = false;
    for (const [l1i, d] of this.dirty) {
      if (!d.table) {
        // Keep a cached copy coherent with what was written.
        const cached = T.l2TableCached(l1i);
        if (cached) for (const x of d.patches) x.bytes.copy(cached, x.at);
        continue;
      }
      // Keep the cache coherent; a table it does not hold goes back to the buffer pool.
      if (T.hasCachedL2(d.off)) T.cacheL2(d.off, d.table);
      else T.releaseTable(d.table);
      const b = Buffer.alloc(8);
      encodeL1Entry(b, 0, d.off, true);
      await file.write(b, T.l1TableOffset + l1i * 8);
      b.copy(T.l1, l1i * 8);
      l1Written = true;
    }
    if (l1Written) await file.datasync();
    this.dirty.clear();
    this.dirtyBytes = 0;
    this.batchStart = this.nextFree;
    this.batchCopied = 0;
  }
}
