// The rebase writer: allocates at EOF, copies the old view's data with a few reads in flight
// and one write at a time, edits L2 tables, and makes each batch durable in the crash-safe
// order (docs/qcow2-notes.md §7): data → fdatasync → refcounts (new refcount blocks counted,
// and written, before they are linked) → fdatasync → refcount table entries, in rounds so no
// block is linked before the block counting it (fdatasync after each) → L2 (new tables
// complete before linking) → fdatasync → L1 → fdatasync.
import { Qcow2Error } from '../errors.js';
import { writeRefcounts } from '../grow.js';
import type { Qcow2Image } from '../image.js';
import { encodeL1Entry, encodeL2Entry, l2EntrySize } from '../l2.js';
import { encodeRefTableEntry, entriesPerBlock, refTableEntry } from '../refcount.js';
import type { ImageChain } from '../view.js';
import type { WorkItem } from './plan.js';

const COPY_CHUNK = 4 << 20;
const COPIES_IN_FLIGHT = 4;
const MAX_DIRTY_L2_BYTES = 32 << 20;

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

/** Takes the work items in guest order; flush() makes everything added so far durable. */
export class Writer {
  private readonly T: Qcow2Image;
  private readonly cs: number;
  private batchStart: number;
  private dirty = new Map<number, DirtyL2>();
  private copyQueue: Promise<void>[] = [];
  private copyError: Error | null = null;
  private writeTail: Promise<void> = Promise.resolve();
  private readonly buffers: Buffer[] = Array.from({ length: COPIES_IN_FLIGHT }, () => Buffer.allocUnsafe(COPY_CHUNK));
  private run: { guest: number; dest: number; len: number } | null = null;
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
    if (off === 0) entry = { off: this.alloc(), table: Buffer.alloc(this.cs), isNew: true, lo: 0, hi: this.cs };
    else entry = { off, table: Buffer.from((await this.T.l2Table(l1i))!), isNew: false, lo: this.cs, hi: 0 };
    this.dirty.set(l1i, entry);
    return entry;
  }

  async add(item: WorkItem): Promise<void> {
    const T = this.T;
    const l1i = Math.floor(item.c / T.l2Entries);
    const d = await this.l2ForWrite(l1i);
    const e = T.decodeEntry(d.table, item.c);
    if (e.type !== 'standard') throw new Qcow2Error('QCOW2_CORRUPT', `cluster ${item.c} changed under the rebase`, T.path);
    let host = e.host;
    if (item.data && host === 0) host = this.alloc();
    const us = T.subclusterSize;
    for (let s = 0; s < T.subclusters;) {
      if (!(item.data & (1 << s))) {
        s++;
        continue;
      }
      let n = 1;
      while (s + n < T.subclusters && item.data & (1 << (s + n))) n++;
      await this.copy(item.c * this.cs + s * us, host + s * us, n * us);
      s += n;
    }
    const idx = item.c % T.l2Entries;
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
    const at = idx * l2EntrySize(T);
    d.lo = Math.min(d.lo, at);
    d.hi = Math.max(d.hi, at + l2EntrySize(T));
    if (this.batchCopied >= this.batchBytes || this.dirty.size * this.cs >= MAX_DIRTY_L2_BYTES) {
      await this.flush();
      this.checkpoint?.();
    }
  }

  private async copy(guest: number, dest: number, len: number): Promise<void> {
    this.batchCopied += len;
    this.copiedBytes += len;
    const r = this.run;
    if (r && r.guest + r.len === guest && r.dest + r.len === dest && r.len + len <= COPY_CHUNK) {
      r.len += len;
      return;
    }
    await this.submitRun();
    this.run = { guest, dest, len };
  }

  private async submitRun(): Promise<void> {
    const r = this.run;
    this.run = null;
    if (!r) return;
    while (this.copyQueue.length >= COPIES_IN_FLIGHT || this.buffers.length === 0) await this.copyQueue.shift();
    if (this.copyError) throw this.copyError;
    // A fixed pool of copy buffers: memory stays flat whatever the disk size.
    const buf = this.buffers.pop()!;
    const task = (async () => {
      try {
        const view = buf.subarray(0, r.len);
        await this.chain.readInto(view, 0, r.guest, r.len, 1);
        // Reads overlap; writes go one at a time. Concurrent writes gain nothing on a local
        // disk and cost a lot where the NAS client splits them into small requests.
        const write = this.writeTail.then(() => this.T.file.write(view, r.dest));
        this.writeTail = write.catch(() => {});
        await write;
      } finally {
        this.buffers.push(buf);
      }
    })();
    // Queued tasks never reject; the first failure is kept and rethrown before any metadata is written.
    this.copyQueue.push(
      task.catch((e: unknown) => {
        this.copyError ??= e instanceof Error ? e : new Error(String(e));
      }),
    );
  }

  private async drain(): Promise<void> {
    await this.submitRun();
    const q = this.copyQueue;
    this.copyQueue = [];
    await Promise.all(q);
    if (this.copyError) throw this.copyError;
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
      T.cacheL2(d.off, d.table);
      if (!d.isNew) continue;
      const b = Buffer.alloc(8);
      encodeL1Entry(b, 0, d.off, true);
      await file.write(b, T.l1TableOffset + l1i * 8);
      b.copy(T.l1, l1i * 8);
      l1Written = true;
    }
    if (l1Written) await file.datasync();
    this.dirty.clear();
    this.batchStart = this.nextFree;
    this.batchCopied = 0;
  }
}
