// The rebase writer: allocates at EOF, copies the old view's data with a few reads in flight
// and one write at a time, edits L2 tables, and makes each batch durable in the crash-safe
// order (docs/qcow2-notes.md §7): data → fdatasync → refcounts (new refcount blocks counted,
// and written, before they are linked) → fdatasync → refcount table entries, in rounds so no
// block is linked before the block counting it (fdatasync after each) → L2 (new tables
// complete before linking) → fdatasync → L1 → fdatasync.
import { Qcow2Error } from '../errors.js';
import { writeRefcounts } from '../grow.js';
import type { Qcow2Image, ScratchEntry } from '../image.js';
import { encodeL1Entry, encodeL2Entry, l2EntrySize } from '../l2.js';
import { encodeRefTableEntry, entriesPerBlock, refTableEntry } from '../refcount.js';
import type { ImageChain } from '../view.js';
import type { WorkItem } from './plan.js';

// Copies in flight × their size is the data in memory (4 MiB): large enough for the disk to
// stream, small enough that peak RSS stays within 32 MiB of the idle program's.
const COPY_CHUNK = 1 << 20;
const COPIES_IN_FLIGHT = 4;
/** Dirty L2 tables held per batch (each batch rewrites them): bounds memory on huge sparse disks. */
const MAX_DIRTY_L2_BYTES = 4 << 20;
/** Bytes written between two early writebacks (one at a time). */
const WRITEBACK_BYTES = 64 << 20;

interface DirtyL2 {
  off: number;
  table: Buffer;
  isNew: boolean;
  lo: number;
  hi: number;
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

interface CopyRun {
  guest: number;
  dest: number;
  len: number;
}

/** Takes the work items in guest order; flush() makes everything added so far durable. */
export class Writer {
  private readonly T: Qcow2Image;
  private readonly cs: number;
  private batchStart: number;
  private dirty = new Map<number, DirtyL2>();
  private dirtyBytes = 0;
  /** Copies merged so far and not yet started (the last one may still grow). */
  private queue: CopyRun[] = [];
  private inFlight: Promise<void>[] = [];
  private copyError: Error | null = null;
  private writeTail: Promise<void> = Promise.resolve();
  private readonly buffers: Buffer[] = Array.from({ length: COPIES_IN_FLIGHT }, () => Buffer.allocUnsafe(COPY_CHUNK));
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
    private readonly chain: ImageChain,
    private nextFree: number,
    private readonly batchBytes: number,
    private readonly checkpoint?: () => void,
  ) {
    this.T = chain.top;
    this.cs = this.T.clusterSize;
    this.batchStart = nextFree;
  }

  private alloc(): number {
    const off = this.nextFree;
    this.nextFree += this.cs;
    this.newClusters++;
    return off;
  }

  private async l2ForWrite(l1i: number): Promise<DirtyL2> {
    const d = this.dirty.get(l1i);
    if (d) return d;
    const off = this.T.l2Offset(l1i);
    let entry: DirtyL2;
    if (off === 0) entry = { off: this.alloc(), table: this.T.tableBuffer().fill(0), isNew: true, lo: 0, hi: this.cs };
    else {
      const src = (await this.T.l2Table(l1i))!;
      const table = this.T.tableBuffer();
      src.copy(table);
      entry = { off, table, isNew: false, lo: this.cs, hi: 0 };
    }
    this.dirty.set(l1i, entry);
    this.dirtyBytes += this.cs;
    return entry;
  }

  /** A run of clusters (one L2 table): allocate, queue the copies, edit the L2 entries in memory. */
  async add(item: WorkItem): Promise<void> {
    const T = this.T;
    const l1i = Math.floor(item.c / T.l2Entries);
    const d = await this.l2ForWrite(l1i);
    const e = this.scratch;
    const us = T.subclusterSize;
    const esz = l2EntrySize(T);
    for (let c = item.c; c < item.c + item.n; c++) {
      T.entryInto(d.table, c, e);
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
      const idx = c % T.l2Entries;
      // New clusters are exclusively owned (COPIED); with extended L2 the bitmaps only gain bits.
      if (T.extendedL2)
        encodeL2Entry(d.table, idx, T, {
          type: 'standard',
          host,
          alloc: e.alloc | item.data,
          zero: e.zero | item.zero,
          copied: host !== 0 || e.copied,
          sectors: 0,
        });
      else if (item.data) encodeL2Entry(d.table, idx, T, { type: 'standard', host, alloc: 1, zero: 0, copied: true, sectors: 0 });
      else encodeL2Entry(d.table, idx, T, { type: 'standard', host: 0, alloc: 0, zero: 1, copied: false, sectors: 0 });
    }
    const first = item.c % T.l2Entries;
    d.lo = Math.min(d.lo, first * esz);
    d.hi = Math.max(d.hi, (first + item.n) * esz);
    await this.pump(false);
    if (this.batchCopied >= this.batchBytes || this.dirtyBytes >= MAX_DIRTY_L2_BYTES) {
      await this.flush();
      this.checkpoint?.();
    }
  }

  /** Queue a copy, merged with the previous one when both sides continue it. */
  private copy(guest: number, dest: number, len: number): void {
    this.batchCopied += len;
    this.copiedBytes += len;
    const r = this.queue.at(-1);
    if (r && r.guest + r.len === guest && r.dest + r.len === dest && r.len + len <= COPY_CHUNK) {
      r.len += len;
      return;
    }
    // Pieces of at most one copy buffer (a 2 MiB cluster is two).
    for (let at = 0; at < len; at += COPY_CHUNK)
      this.queue.push({ guest: guest + at, dest: dest + at, len: Math.min(COPY_CHUNK, len - at) });
  }

  /** Start the queued copies (all of them, or all but the last, which may still grow). */
  private async pump(all: boolean): Promise<void> {
    const keep = all ? 0 : 1;
    if (this.queue.length <= keep) return;
    const q = this.queue;
    const n = q.length - keep;
    for (let i = 0; i < n; i++) {
      while (this.inFlight.length >= COPIES_IN_FLIGHT) await this.inFlight.shift();
      if (this.copyError) throw this.copyError;
      this.start(q[i]!);
    }
    this.queue = q.slice(n);
  }

  private start(r: CopyRun): void {
    // A fixed pool of copy buffers: memory stays flat whatever the disk size.
    const buf = this.buffers.pop()!;
    const file = this.T.file;
    const task = (async () => {
      try {
        const view = buf.subarray(0, r.len);
        await this.chain.readInto(view, 0, r.guest, r.len, 1);
        // Reads overlap; writes go one at a time, in order. Concurrent writes gain nothing on
        // a local disk and cost a lot where the NAS client splits them into small requests.
        const write = this.writeTail.then(() => file.write(view, r.dest));
        this.writeTail = write.catch(() => {});
        await write;
        this.unflushed += r.len;
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
      } finally {
        this.buffers.push(buf);
      }
    })();
    // Tasks never reject; the first failure is kept and rethrown before any metadata is written.
    this.inFlight.push(
      task.catch((e: unknown) => {
        this.copyError ??= e instanceof Error ? e : new Error(String(e));
      }),
    );
  }

  private async drain(): Promise<void> {
    await this.pump(true);
    const q = this.inFlight;
    this.inFlight = [];
    await Promise.all(q);
    while (this.writeback) await this.writeback;
    if (this.copyError) throw this.copyError;
    // A failed fdatasync may be reported once only: the next one could pass with data lost.
    if (this.writebackError) throw this.writebackError;
  }

  async flush(): Promise<void> {
    await this.drain();
    if (this.nextFree === this.batchStart && this.dirty.size === 0) return;
    const T = this.T;
    const file = T.file;
    const cs = this.cs;
    this.batches++;
    // 1. data
    await file.datasync();
    // 2. refcounts of every cluster allocated in this batch, new refcount blocks included.
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
    // 3. L2 tables: new ones complete, existing ones the changed entries.
    T.fileSize = Math.max(T.fileSize, this.nextFree);
    for (const d of this.dirty.values()) {
      if (d.isNew) await file.write(d.table, d.off);
      else if (d.hi > d.lo) await file.write(Buffer.from(d.table.subarray(d.lo, d.hi)), d.off + d.lo);
    }
    await file.datasync();
    // 4. L1 entries of the new L2 tables.
    let l1Written = false;
    for (const [l1i, d] of this.dirty) {
      // Keep the cache coherent; a table it does not hold goes back to the buffer pool.
      if (T.hasCachedL2(d.off)) T.cacheL2(d.off, d.table);
      else T.releaseTable(d.table);
      if (!d.isNew) continue;
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
