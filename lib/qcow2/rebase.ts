// Native safe rebase for the in-chain case: the target T backs onto O1 → … → O(j-1) → N
// and is repointed at N. Every cluster (subcluster with extended L2) that the removed
// layers O1..O(j-1) allocate and T does not is copied into T — data as data, zero
// clusters as zero clusters — without reading N. The new backing name is written last.
//
// Crash safety (docs/qcow2-notes.md §7): new clusters are appended at EOF and only unallocated
// L2 entries are pointed at them. A refcount table too small for the new clusters is first
// replaced by a larger one (grow.ts). Per batch: data → fdatasync → refcounts (new refcount
// blocks are counted, and written, before being linked) → fdatasync → refcount table
// entries, in rounds so no block is linked before the block counting it (fdatasync after
// each) → L2 (new tables complete before linking) → fdatasync → L1 → fdatasync. A crash at
// any point leaves a valid image (leaks at most) whose content equals the original chain's,
// and a rerun finishes the job.
import { stat } from 'node:fs/promises';
import { setFlagsFromString } from 'node:v8';
import { Qcow2Error } from './errors.js';
import { AUTOCLEAR_KNOWN, checkWritable, encodeHeader, EXT_BACKING_FORMAT, MAX_BACKING_NAME } from './header.js';
import { growRefcountTable, writeRefcounts } from './grow.js';
import { COPIED, MAX_REFTABLE_BYTES, Qcow2Image, ZERO_FLAG } from './image.js';
import { NodeBlockFile, type BlockFile } from './io.js';
import { entriesPerBlock, getRefcount } from './refcount.js';
import { ImageChain } from './view.js';

export interface RebaseHooks {
  /**
   * Called after every write and every fdatasync of the target, numbered from 1. Throwing here
   * (or killing the process) simulates a crash at that point.
   */
  afterOp?(n: number, what: 'write' | 'sync', detail: string): void | Promise<void>;
}

export interface NativeRebaseOptions {
  /** Path of the image to repoint. */
  target: string;
  /** Path of the new backing file; must be in the target's current backing chain. */
  newBacking: string;
  /** What gets written into the header (relative to the target's folder). */
  newBackingName: string;
  newBackingFormat?: 'qcow2';
  /** Data per crash-consistent batch (default 256 MiB). */
  batchBytes?: number;
  hooks?: RebaseHooks;
  /** Wrap the target's file (tests: power-loss models). */
  wrapFile?: (f: BlockFile) => BlockFile;
  /** Plan only: every check, no write. */
  dryRun?: boolean;
  log?: (message: string) => void;
  /**
   * Called between batches (each leaves a consistent image) and before the header commit; throw
   * here to stop early (a termination signal). A rerun finishes the job.
   */
  checkpoint?: () => void;
}

export interface NativeRebaseResult {
  /** Backing layers removed from the chain (0: only the header changes). */
  removedLayers: number;
  dataUnits: number;
  zeroUnits: number;
  copiedBytes: number;
  newClusters: number;
  batches: number;
  /** Writes plus syncs issued to the target. */
  ops: number;
  /** The refcount table was too small for the new clusters and was moved to a larger one. */
  refcountTableGrown: boolean;
}

const SKIP = 1;
const ZERO = 2;
const DATA = 4;
const COPY_CHUNK = 4 << 20;
const COPIES_IN_FLIGHT = 4;
const MAX_DIRTY_L2_BYTES = 32 << 20;

interface WorkItem {
  /** Guest cluster of the target. */
  c: number;
  /** Subclusters to fill with the old view's data / to mark zero (bit 0 only without extended L2). */
  data: number;
  zero: number;
}

/** Counts and reports every write and sync of the target. */
class HookedFile implements BlockFile {
  ops = 0;
  constructor(
    private readonly inner: BlockFile,
    private readonly hooks: RebaseHooks | undefined,
  ) {}
  get path(): string {
    return this.inner.path;
  }
  read(buf: Buffer, offset: number, length: number, position: number): Promise<number> {
    return this.inner.read(buf, offset, length, position);
  }
  async write(buf: Buffer, position: number): Promise<void> {
    await this.inner.write(buf, position);
    const n = ++this.ops;
    await this.hooks?.afterOp?.(n, 'write', `${buf.length}@${position}`);
  }
  async datasync(): Promise<void> {
    await this.inner.datasync();
    const n = ++this.ops;
    await this.hooks?.afterOp?.(n, 'sync', '');
  }
  size(): Promise<number> {
    return this.inner.size();
  }
  close(): Promise<void> {
    return this.inner.close();
  }
}

async function sameFile(a: string, b: string): Promise<boolean> {
  const [x, y] = await Promise.all([stat(a).catch(() => null), stat(b).catch(() => null)]);
  return !!x && !!y && x.dev === y.dev && x.ino === y.ino;
}

/**
 * The work of the rebase, cluster by cluster of the target, in guest order: which of its
 * unallocated subclusters get the old view's data, which become zero. Metadata only.
 */
async function* workItems(chain: ImageChain, j: number): AsyncGenerator<WorkItem> {
  const T = chain.top;
  if (j <= 1) return;
  const us = T.subclusterSize;
  const nsub = T.subclusters;
  const size = T.virtualSize;
  const v2 = T.header.version === 2;
  const b1Size = chain.images[1]!.virtualSize;
  let ready: WorkItem[] = [];
  let cur: WorkItem | null = null;
  let unit = -1;
  let flags = 0;
  const emit = (u: number, f: number): void => {
    if (f === SKIP) return;
    const kind = f === ZERO ? ZERO : DATA;
    const c = Math.floor(u / nsub);
    if (!cur || cur.c !== c) {
      if (cur) ready.push(cur);
      cur = { c, data: 0, zero: 0 };
    }
    if (kind === DATA) cur.data |= 1 << u % nsub;
    else cur.zero |= 1 << u % nsub;
  };
  const add = (p: number, len: number, cls: number): void => {
    const u0 = Math.floor(p / us);
    const u1 = Math.floor((p + len - 1) / us);
    if (u0 === unit) flags |= cls;
    else {
      if (unit >= 0) emit(unit, flags);
      unit = u0;
      flags = cls;
    }
    if (u1 > u0) {
      emit(unit, flags);
      if (cls !== SKIP) for (let u = u0 + 1; u < u1; u++) emit(u, cls);
      unit = u1;
      flags = cls;
    }
  };
  async function* drainReady(): AsyncGenerator<WorkItem> {
    const out = ready;
    ready = [];
    for (const w of out) {
      const f = await fixV2(chain, j, w, v2);
      if (f.data || f.zero) yield f;
    }
  }
  let pos = 0;
  while (pos < size) {
    const e = await T.status(pos, size - pos);
    if (e.kind === 'unallocated') {
      const end = pos + e.length;
      let p = pos;
      while (p < end) {
        if (p >= b1Size) {
          add(p, end - p, ZERO); // the old backing is shorter: the old view reads zeros
          p = end;
          break;
        }
        const s = await chain.status(p, end - p, 1, j);
        add(p, s.length, s.below ? SKIP : s.kind === 'data' || s.kind === 'compressed' ? DATA : ZERO);
        p += s.length;
        // Hand finished clusters on as they come: one unallocated extent of the target may
        // span the whole disk, and holding its items would make memory grow with the delta.
        if (ready.length) yield* drainReady();
      }
    }
    pos += e.length;
    if (ready.length) yield* drainReady();
  }
  if (unit >= 0) emit(unit, flags);
  if (cur) ready.push(cur);
  for (const w of ready) {
    const f = await fixV2(chain, j, w, v2);
    if (f.data || f.zero) yield f;
  }
}

/** v2 has no zero flag: zero units become data, unless the new view reads zeros there anyway. */
async function fixV2(chain: ImageChain, j: number, w: WorkItem, v2: boolean): Promise<WorkItem> {
  if (!v2 || w.zero === 0) return w;
  const T = chain.top;
  const start = w.c * T.clusterSize;
  if (!(await newViewIsZero(chain, j, start, T.clusterSize))) w.data |= w.zero;
  w.zero = 0;
  return w;
}

async function newViewIsZero(chain: ImageChain, j: number, start: number, len: number): Promise<boolean> {
  const N = chain.images[j]!;
  let p = start;
  const end = Math.min(start + len, N.virtualSize);
  while (p < end) {
    const s = await chain.status(p, end - p, j);
    if (s.kind === 'data' || s.kind === 'compressed') return false;
    p += s.length;
  }
  return true;
}

interface DirtyL2 {
  off: number;
  table: Buffer;
  isNew: boolean;
  lo: number;
  hi: number;
}

interface Plan {
  items: number;
  dataUnits: number;
  zeroUnits: number;
  newClusters: number;
  nextFree: number;
  /** The refcount table cannot count every new cluster: it is grown first. */
  growTable: boolean;
}

let youngGenerationCapped = false;

/**
 * Peak memory must not grow with the copy. V8 doubles the young generation whenever enough
 * has survived since the last growth, which a long copy always reaches: up to 16 MiB
 * semi-spaces, ~20–30 MiB more RSS. V8 reads this flag at each growth decision, so setting it
 * now takes effect; it is process-wide, and costs only more frequent (small) scavenges.
 */
function capYoungGeneration(): void {
  if (youngGenerationCapped) return;
  youngGenerationCapped = true;
  try {
    setFlagsFromString('--semi-space-growth-factor=1');
  } catch {
    /* a runtime without it: memory is still bounded, only higher */
  }
}

/** Safe rebase of `target` onto `newBacking` (in its chain), natively. */
export async function nativeRebase(opts: NativeRebaseOptions): Promise<NativeRebaseResult> {
  capYoungGeneration();
  const log = opts.log ?? (() => {});
  const box: { hooked: HookedFile | null } = { hooked: null };
  const chain = await ImageChain.open(opts.target, {
    writableTop: !opts.dryRun,
    ...(opts.dryRun
      ? {}
      : {
          topFile: await (async () => {
            const f = await NodeBlockFile.open(opts.target, true);
            box.hooked = new HookedFile(opts.wrapFile ? opts.wrapFile(f) : f, opts.hooks);
            return box.hooked;
          })(),
        }),
  });
  try {
    const T = chain.top;
    checkWritable(T.header, opts.target);
    let j = -1;
    for (let i = 1; i < chain.images.length; i++) {
      if (await sameFile(chain.images[i]!.path, opts.newBacking)) {
        j = i;
        break;
      }
    }
    if (j < 0) throw new Qcow2Error('QCOW2_REBASE_SHAPE', `${opts.newBacking} is not in the backing chain of ${opts.target}`, opts.target);
    if (T.header.backingFormat !== null && T.header.backingFormat !== 'qcow2')
      throw new Qcow2Error('QCOW2_UNSUPPORTED_FEATURE', `backing format ${T.header.backingFormat}`, opts.target);
    for (let i = 1; i < j; i++) {
      const L = chain.images[i]!;
      if (L.header.compressionType === 1 && !Qcow2Image.zstdAvailable())
        throw new Qcow2Error('QCOW2_UNSUPPORTED_FEATURE', `${L.path} uses zstd compression and this Node has no zstd decoder`, L.path);
    }
    const name = Buffer.from(opts.newBackingName, 'utf8');
    if (name.length === 0 || name.length > MAX_BACKING_NAME)
      throw new Qcow2Error('QCOW2_BACKING_NAME', `invalid backing name length ${name.length}`, opts.target);
    checkTargetMetadata(T);
    const c0 = Buffer.alloc(T.clusterSize);
    await T.file.read(c0, 0, c0.length, 0);
    const headerPlan = planHeader(T, c0, opts.newBackingName); // throws QCOW2_HEADER_FULL early
    const plan = await planWork(chain, j);
    log(
      `native rebase of ${opts.target}: ${j - 1} layer(s) removed, ${plan.dataUnits} data and ${plan.zeroUnits} zero unit(s) of ${T.subclusterSize} bytes, ${plan.newClusters} new cluster(s)${plan.growTable ? ', refcount table grows first' : ''}`,
    );
    const result: NativeRebaseResult = {
      removedLayers: j - 1,
      dataUnits: plan.dataUnits,
      zeroUnits: plan.zeroUnits,
      copiedBytes: 0,
      newClusters: 0,
      batches: 0,
      ops: 0,
      refcountTableGrown: false,
    };
    if (opts.dryRun) return result;

    const file = T.file;
    // Unknown autoclear bits are cleared before the first write (spec).
    if (T.header.version === 3 && (T.header.autoclearFeatures & ~AUTOCLEAR_KNOWN) !== 0n) {
      T.header.autoclearFeatures &= AUTOCLEAR_KNOWN;
      const b = Buffer.alloc(8);
      b.writeBigUInt64BE(T.header.autoclearFeatures);
      await file.write(b, 88);
      await file.datasync();
    }
    let nextFree = plan.nextFree;
    if (plan.growTable) {
      const g = await growRefcountTable(T, nextFree, mustCover(plan, T.refcountEntriesPerBlock));
      log(`refcount table of ${opts.target} moved to ${g.tableOffset} (${g.tableClusters} cluster(s), ${g.newBlocks} new refcount block(s))`);
      nextFree = g.nextFree;
      result.refcountTableGrown = true;
      opts.checkpoint?.();
    }
    const w = new Writer(chain, nextFree, opts.batchBytes ?? 256 << 20, opts.checkpoint);
    for await (const item of workItems(chain, j)) await w.add(item);
    await w.flush();
    opts.checkpoint?.();
    result.copiedBytes = w.copiedBytes;
    result.newClusters = w.newClusters;
    result.batches = w.batches;
    await commitHeader(T, headerPlan, opts.newBackingName);
    result.ops = box.hooked?.ops ?? 0;
    return result;
  } finally {
    await chain.close();
  }
}

/** The target's metadata must be safe to extend: unique, exclusively owned L2 tables. */
function checkTargetMetadata(T: Qcow2Image): void {
  const seen = new Set<number>();
  for (let i = 0; i < T.header.l1Size; i++) {
    const off = T.l2Offset(i);
    if (off === 0) continue;
    if (seen.has(off)) throw new Qcow2Error('QCOW2_CORRUPT', `L2 table at ${off} is referenced twice`, T.path);
    seen.add(off);
    if (!T.l1Copied(i)) throw new Qcow2Error('QCOW2_UNSUPPORTED_FEATURE', `L2 table at ${off} is shared (refcount is not 1)`, T.path);
  }
}

async function planWork(chain: ImageChain, j: number): Promise<Plan> {
  const T = chain.top;
  const newL2 = new Set<number>();
  const p: Plan = { items: 0, dataUnits: 0, zeroUnits: 0, newClusters: 0, nextFree: 0, growTable: false };
  for await (const item of workItems(chain, j)) {
    p.items++;
    p.dataUnits += popcount(item.data);
    p.zeroUnits += popcount(item.zero);
    const l1i = Math.floor(item.c / T.l2Entries);
    if (T.l2Offset(l1i) === 0 && !newL2.has(l1i)) {
      newL2.add(l1i);
      p.newClusters++;
    }
    const e = await T.entry(item.c);
    if (e.type !== 'standard') throw new Qcow2Error('QCOW2_CORRUPT', `cluster ${item.c} changed under the rebase`, T.path);
    if (item.data && e.host === 0) p.newClusters++;
    if (e.host !== 0 && !e.copied) throw new Qcow2Error('QCOW2_UNSUPPORTED_FEATURE', `cluster ${item.c} is shared (refcount is not 1)`, T.path);
  }
  // Allocation starts at the aligned end of the file, above any cluster with a refcount
  // (clusters leaked by an interrupted earlier run are never reused).
  const cs = T.clusterSize;
  let next = Math.ceil(T.fileSize / cs);
  const epb = entriesPerBlock(cs, T.header.refcountOrder);
  for (let ti = Math.floor(next / epb); ti < T.refcountTableEntries; ti++) {
    const b = await T.refBlock(ti);
    if (!b) continue;
    for (let k = epb - 1; k >= 0; k--) {
      if (getRefcount(b, k, T.header.refcountOrder) !== 0n) {
        next = Math.max(next, ti * epb + k + 1);
        break;
      }
    }
  }
  p.nextFree = next * cs;
  const cover = mustCover(p, epb)(next);
  p.growTable = p.newClusters > 0 && cover > T.refcountTableEntries * epb;
  // The grown table itself adds clusters; twice the bare need is a safe over-estimate here.
  if (p.growTable && 2 * Math.ceil(cover / epb) * 8 > MAX_REFTABLE_BYTES)
    throw new Qcow2Error('QCOW2_REFCOUNT_TABLE_FULL', `the refcount table would have to grow past ${MAX_REFTABLE_BYTES} bytes`, T.path);
  return p;
}

/** Clusters the refcount table must cover when the rebase's allocations start at cluster `start`. */
function mustCover(p: Plan, epb: number): (start: number) => number {
  // The new clusters, refcount blocks for them, and slack for block boundaries.
  return (start) => start + p.newClusters + Math.ceil(p.newClusters / epb) + 2;
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

function popcount(x: number): number {
  let n = 0;
  for (let v = x >>> 0; v; v &= v - 1) n++;
  return n;
}

class Writer {
  private readonly T: Qcow2Image;
  private readonly cs: number;
  private batchStart: number;
  private dirty = new Map<number, DirtyL2>();
  private copyQueue: Promise<void>[] = [];
  private copyError: unknown = null;
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
    for (let s = 0; s < T.subclusters; ) {
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
    if (T.extendedL2) {
      const at = idx * 16;
      if (host !== 0) d.table.writeBigUInt64BE(BigInt(host) | COPIED, at);
      d.table.writeBigUInt64BE(BigInt((e.alloc | item.data) >>> 0) | (BigInt((e.zero | item.zero) >>> 0) << 32n), at + 8);
      d.lo = Math.min(d.lo, at);
      d.hi = Math.max(d.hi, at + 16);
    } else {
      const at = idx * 8;
      d.table.writeBigUInt64BE(item.data ? BigInt(host) | COPIED : ZERO_FLAG, at);
      d.lo = Math.min(d.lo, at);
      d.hi = Math.max(d.hi, at + 8);
    }
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
        this.copyError ??= e;
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
        if (ti >= T.refcountTableEntries) throw new Qcow2Error('QCOW2_REFCOUNT_TABLE_FULL', 'the refcount table would have to grow', T.path);
        if (table.readBigUInt64BE(ti * 8) === 0n && !newBlocks.has(ti)) {
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
        b.writeBigUInt64BE(BigInt(nb.off));
        await file.write(b, T.refcountTableOffset + ti * 8);
        table.writeBigUInt64BE(BigInt(nb.off), ti * 8);
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
      b.writeBigUInt64BE(BigInt(d.off) | COPIED);
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

interface HeaderPlan {
  /** Where the new name goes; null: rewrite the header prefix in one write (QEMU's way). */
  nameAt: number | null;
  /** The backing-format extension must be added after the pointer switch. */
  addFormat: boolean;
}

function planHeader(T: Qcow2Image, c0: Buffer, name: string): HeaderPlan {
  const h = T.header;
  const n = Buffer.byteLength(name, 'utf8');
  const cs = T.clusterSize;
  const addFormat = h.backingFormat !== 'qcow2';
  const endMarkerPresent = h.extensionsEnd + 8 <= cs && c0.subarray(h.extensionsEnd, h.extensionsEnd + 8).every((x) => x === 0);
  const newExtEnd = h.extensionsEnd + (addFormat ? 16 : 0) + 8;
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
 * The commit point. The new name goes into free space of cluster 0 that does not overlap the
 * current name, then one sector-sized write switches backing_file_offset/size; a missing
 * backing-format extension is added afterwards, its type/length word last.
 */
async function commitHeader(T: Qcow2Image, plan: HeaderPlan, name: string): Promise<void> {
  const file = T.file;
  const h = T.header;
  if (plan.nameAt === null) {
    const enc = encodeHeader(h, { backingFile: name, backingFormat: 'qcow2' });
    await file.write(enc.bytes, 0);
    await file.datasync();
    return;
  }
  const nameBuf = Buffer.from(name, 'utf8');
  await file.write(nameBuf, plan.nameAt);
  await file.datasync();
  const ptr = Buffer.alloc(12);
  ptr.writeBigUInt64BE(BigInt(plan.nameAt), 0);
  ptr.writeUInt32BE(nameBuf.length, 8);
  await file.write(ptr, 8);
  await file.datasync();
  if (plan.addFormat) {
    const body = Buffer.alloc(16);
    body.write('qcow2', 0, 'utf8'); // data padded to 8, then the new end marker
    await file.write(body, h.extensionsEnd + 8);
    await file.datasync();
    const head = Buffer.alloc(8);
    head.writeUInt32BE(EXT_BACKING_FORMAT, 0);
    head.writeUInt32BE(5, 4);
    await file.write(head, h.extensionsEnd);
    await file.datasync();
  }
}
