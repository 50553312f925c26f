// Planning the native rebase (metadata only, no write): which subclusters of the target get
// the old view's data or become zero clusters (`workItems`, in guest order and streamed, so
// memory does not grow with the delta), how many clusters that allocates, where allocation
// starts, and whether the refcount table has to grow first.
import { Qcow2Error } from '../errors.js';
import { MAX_REFTABLE_BYTES, type Qcow2Image, type ScratchEntry } from '../image.js';
import { emptyRefTableEntries, entriesPerBlock, lastNonzeroEntry } from '../refcount.js';
import type { ImageChain } from '../view.js';

const SKIP = 1;
const ZERO = 2;
const DATA = 4;

export interface WorkItem {
  /** First guest cluster of the target. */
  c: number;
  /** Clusters in the run: consecutive, inside one L2 table, all with the same masks. */
  n: number;
  /** Subclusters to fill with the old view's data / to mark zero (bit 0 only without extended L2). */
  data: number;
  zero: number;
}

/**
 * Where the old view's data sits, as the plan's walk found it: guest ranges, in guest order,
 * each contiguous in one layer's file. With it the copy reads the removed layers directly,
 * with no L2 lookup (on a thin delta each lookup is a read waiting in the thread pool behind
 * the data, on the copy's critical path).
 */
export class SourceMap {
  readonly guest: number[] = [];
  readonly len: number[] = [];
  readonly depth: number[] = [];
  readonly host: number[] = [];
  get length(): number {
    return this.guest.length;
  }
  add(guest: number, len: number, depth: number, host: number): void {
    const k = this.guest.length - 1;
    if (k >= 0 && this.guest[k]! + this.len[k]! === guest && this.depth[k] === depth && this.host[k]! + this.len[k]! === host) {
      this.len[k]! += len;
      return;
    }
    this.guest.push(guest);
    this.len.push(len);
    this.depth.push(depth);
    this.host.push(host);
  }
  /** Index of the first range ending after `pos` (length: none). */
  find(pos: number): number {
    let lo = 0;
    let hi = this.guest.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (this.guest[mid]! + this.len[mid]! <= pos) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }
}

export interface Plan {
  items: number;
  /** The work items when few enough to keep (the writer then needs no second walk), else null. */
  work: WorkItem[] | null;
  /** Where their data is, kept with them (null when the work is not kept, or too scattered). */
  sources: SourceMap | null;
  dataUnits: number;
  zeroUnits: number;
  newClusters: number;
  nextFree: number;
  /** The refcount table cannot count every new cluster: it is grown first. */
  growTable: boolean;
}

/**
 * The work of the rebase, in guest order, as runs of clusters of the target: which of their
 * unallocated subclusters get the old view's data, which become zero. Metadata only. Runs
 * (not single clusters) keep the per-cluster cost of a contiguous delta at a few integer
 * operations: no object, promise or generator step per cluster.
 */
export async function* workItems(
  chain: ImageChain,
  j: number,
  onPos?: (pos: number) => void,
  onData?: (guest: number, len: number, depth: number, host: number) => void,
): AsyncGenerator<WorkItem> {
  const T = chain.top;
  if (j <= 1) return;
  const us = T.subclusterSize;
  const nsub = T.subclusters;
  const l2e = T.l2Entries;
  const size = T.virtualSize;
  const v2 = T.header.version === 2;
  const b1Size = chain.images[1]!.virtualSize;
  let ready: WorkItem[] = [];
  let run: WorkItem | null = null;
  // The cluster whose subclusters are being collected (extended L2), -1: none.
  let cc = -1;
  let cd = 0;
  let cz = 0;
  let unit = -1;
  let flags = 0;
  /** Append whole clusters [c0, c0 + count) with masks d/z, split at L2 table boundaries. */
  const extend = (c0: number, count: number, d: number, z: number): void => {
    while (count > 0) {
      const k = Math.min(count, l2e - (c0 % l2e));
      if (run && run.c + run.n === c0 && run.data === d && run.zero === z && c0 % l2e !== 0) run.n += k;
      else {
        if (run) ready.push(run);
        run = { c: c0, n: k, data: d, zero: z };
      }
      c0 += k;
      count -= k;
    }
  };
  const finishCluster = (): void => {
    if (cc < 0) return;
    extend(cc, 1, cd, cz);
    cc = -1;
  };
  const emitUnit = (u: number, kind: number): void => {
    const c = Math.floor(u / nsub);
    if (c !== cc) {
      finishCluster();
      cc = c;
      cd = 0;
      cz = 0;
    }
    if (kind === DATA) cd |= 1 << (u % nsub);
    else cz |= 1 << (u % nsub);
  };
  // Every subcluster bit set, as the per-unit path builds it (a signed 32-bit mask).
  let full = 0;
  for (let s = 0; s < nsub; s++) full |= 1 << s;
  /** Units [u0, u1) all of one kind (not SKIP). */
  const emitRange = (u0: number, u1: number, kind: number): void => {
    let u = u0;
    while (u < u1 && u % nsub !== 0) emitUnit(u++, kind);
    const whole = Math.floor((u1 - u) / nsub);
    if (whole > 0) {
      finishCluster();
      extend(u / nsub, whole, kind === DATA ? full : 0, kind === ZERO ? full : 0);
      u += whole * nsub;
    }
    while (u < u1) emitUnit(u++, kind);
  };
  const emit = (u: number, f: number): void => {
    if (f === SKIP) return;
    emitUnit(u, f === ZERO ? ZERO : DATA);
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
      if (cls !== SKIP && u1 > u0 + 1) emitRange(u0 + 1, u1, cls);
      unit = u1;
      flags = cls;
    }
  };
  async function* drainReady(): AsyncGenerator<WorkItem> {
    const out = ready;
    ready = [];
    for (const w of out) yield* fixV2(chain, j, w, v2);
  }
  let pos = 0;
  while (pos < size) {
    onPos?.(pos);
    const e = await T.status(pos, size - pos);
    if (e.kind === 'unallocated') {
      const end = pos + e.length;
      let p = pos;
      while (p < end) {
        if (p >= b1Size) {
          add(p, end - p, ZERO); // the old backing is shorter: the old view reads zeros
          break;
        }
        onPos?.(p);
        const s = await chain.status(p, end - p, 1, j);
        if (onData && s.kind === 'data' && !s.below && s.host !== undefined) onData(p, s.length, s.depth, s.host);
        add(p, s.length, s.below ? SKIP : s.kind === 'data' || s.kind === 'compressed' ? DATA : ZERO);
        p += s.length;
        // Hand finished runs on as they come: one unallocated extent of the target may
        // span the whole disk, and holding its items would make memory grow with the delta.
        if (ready.length) yield* drainReady();
      }
    }
    pos += e.length;
    if (ready.length) yield* drainReady();
  }
  if (unit >= 0) emit(unit, flags);
  finishCluster();
  if (run) ready.push(run);
  yield* drainReady();
}

/** v2 has no zero flag: zero units become data, unless the new view reads zeros there anyway. */
async function* fixV2(chain: ImageChain, j: number, w: WorkItem, v2: boolean): AsyncGenerator<WorkItem> {
  if (!v2 || w.zero === 0) {
    if (w.data || w.zero) yield w;
    return;
  }
  const T = chain.top;
  for (let k = 0; k < w.n; k++) {
    const c = w.c + k;
    const data = (await newViewIsZero(chain, j, c * T.clusterSize, T.clusterSize)) ? w.data : w.data | w.zero;
    if (data) yield { c, n: 1, data, zero: 0 };
  }
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

/** The target's metadata must be safe to extend: unique, exclusively owned L2 tables. */
export function checkTargetMetadata(T: Qcow2Image): void {
  const seen = new Set<number>();
  for (let i = 0; i < T.header.l1Size; i++) {
    const off = T.l2Offset(i);
    if (off === 0) continue;
    if (seen.has(off)) throw new Qcow2Error('QCOW2_CORRUPT', `L2 table at ${off} is referenced twice`, T.path);
    seen.add(off);
    if (!T.l1Copied(i)) throw new Qcow2Error('QCOW2_UNSUPPORTED_FEATURE', `L2 table at ${off} is shared (refcount is not 1)`, T.path);
  }
}

/** Work items (about 50 bytes each), and source ranges (about 40), kept from the plan for the writer. */
const MAX_KEPT_ITEMS = 16384;
/** L1 indices the prefetch runs ahead of the walk (fewer where the L2 cache is smaller). */
const PREFETCH_AHEAD = 3;

/** Where the walk is (guest bytes), for the prefetch to keep a few tables ahead of it. */
class WalkPosition {
  pos = 0;
  done = false;
  private waiters: Array<() => void> = [];
  advance(pos: number): void {
    if (pos <= this.pos) return;
    this.pos = pos;
    for (const w of this.waiters.splice(0)) w();
  }
  finish(): void {
    this.done = true;
    for (const w of this.waiters.splice(0)) w();
  }
  /** Settles once the walk is past `pos` or done. */
  reach(pos: number): Promise<void> {
    return this.pos >= pos || this.done ? Promise.resolve() : new Promise((r) => this.waiters.push(r));
  }
}

/**
 * Load the L2 tables the walk will need (the target's and the removed layers') into their
 * images' caches a few at a time, a few tables ahead of the walk, so its own one-at-a-time
 * lookups find them there: on a cold cache the walk of a large sparse disk is otherwise a
 * long series of random reads, each waiting its turn. Never further ahead than the (small)
 * caches hold next to the table in use. Errors are left for the walk to report.
 */
async function prefetchL2(chain: ImageChain, j: number, walk: WalkPosition): Promise<void> {
  const imgs = chain.images
    .slice(0, j)
    .map((img) => ({ img, span: img.clusterSize * img.l2Entries, ahead: Math.min(PREFETCH_AHEAD, img.l2CacheTables - 2) }));
  const l1max = Math.max(...imgs.map((i) => i.img.header.l1Size));
  const tables = function* (): Generator<{ img: Qcow2Image; i: number; due: number }> {
    for (let i = 0; i < l1max; i++)
      for (const x of imgs) if (x.ahead > 0 && i < x.img.header.l1Size) yield { img: x.img, i, due: (i - x.ahead) * x.span };
  };
  const it = tables();
  const worker = async (): Promise<void> => {
    for (let r = it.next(); !r.done && !walk.done; r = it.next()) {
      const { img, i, due } = r.value;
      await walk.reach(due);
      if (walk.done) return;
      try {
        if (img.l2TableCached(i) === undefined) await img.l2Table(i);
      } catch {
        /* the walk reports it */
      }
    }
  };
  await Promise.all(Array.from({ length: PREFETCH_AHEAD * 2 }, worker));
}

export async function planWork(chain: ImageChain, j: number): Promise<Plan> {
  const T = chain.top;
  const newL2 = new Set<number>();
  const p: Plan = {
    items: 0,
    work: [],
    sources: new SourceMap(),
    dataUnits: 0,
    zeroUnits: 0,
    newClusters: 0,
    nextFree: 0,
    growTable: false,
  };
  const e: ScratchEntry = { type: 'standard', host: 0, alloc: 0, zero: 0, copied: false, sectors: 0, size: 0 };
  const walk = new WalkPosition();
  const prefetch = prefetchL2(chain, j, walk);
  try {
    await walkPlan();
  } finally {
    walk.finish();
    await prefetch;
  }
  async function walkPlan(): Promise<void> {
    const onData = (guest: number, len: number, depth: number, host: number): void => {
      if (p.sources && p.sources.length < MAX_KEPT_ITEMS) p.sources.add(guest, len, depth, host);
      else p.sources = null;
    };
    for await (const item of workItems(chain, j, (pos) => walk.advance(pos), onData)) {
      p.items++;
      if (p.work && p.work.length < MAX_KEPT_ITEMS) p.work.push(item);
      else p.work = null;
      p.dataUnits += popcount(item.data) * item.n;
      p.zeroUnits += popcount(item.zero) * item.n;
      const l1i = Math.floor(item.c / T.l2Entries);
      const table = await T.l2Table(l1i);
      if (table === null && !newL2.has(l1i)) {
        newL2.add(l1i);
        p.newClusters++;
      }
      for (let c = item.c; c < item.c + item.n; c++) {
        T.entryInto(table, c, e);
        if (e.type !== 'standard') throw new Qcow2Error('QCOW2_CORRUPT', `cluster ${c} changed under the rebase`, T.path);
        if (item.data && e.host === 0) p.newClusters++;
        if (e.host !== 0 && !e.copied)
          throw new Qcow2Error('QCOW2_UNSUPPORTED_FEATURE', `cluster ${c} is shared (refcount is not 1)`, T.path);
      }
    }
  }
  if (!p.work) p.sources = null;
  // Allocation starts at the aligned end of the file, above any cluster with a refcount
  // (clusters leaked by an interrupted earlier run are never reused).
  const cs = T.clusterSize;
  let next = Math.ceil(T.fileSize / cs);
  const epb = entriesPerBlock(cs, T.header.refcountOrder);
  const rt = await T.refcountTable();
  for (let ti = Math.floor(next / epb); ti < T.refcountTableEntries; ti++) {
    // No block: nothing counted there (no read, no promise); empty entries a run at a time.
    const unset = emptyRefTableEntries(rt, ti, T.refcountTableEntries - ti);
    if (unset > 0) {
      ti += unset - 1;
      continue;
    }
    const b = await T.refBlock(ti);
    if (!b) continue;
    const k = lastNonzeroEntry(b, T.header.refcountOrder);
    if (k >= 0) next = Math.max(next, ti * epb + k + 1);
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
export function mustCover(p: Plan, epb: number): (start: number) => number {
  // The new clusters, refcount blocks for them, and slack for block boundaries.
  return (start) => start + p.newClusters + Math.ceil(p.newClusters / epb) + 2;
}

function popcount(x: number): number {
  let n = 0;
  for (let v = x >>> 0; v; v &= v - 1) n++;
  return n;
}
