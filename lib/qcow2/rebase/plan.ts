// Planning the native rebase (metadata only, no write): which subclusters of the target get
// the old view's data or become zero clusters (`workItems`, in guest order and streamed, so
// memory does not grow with the delta), how many clusters that allocates, where allocation
// starts, and whether the refcount table has to grow first.
import { Qcow2Error } from '../errors.js';
import { MAX_REFTABLE_BYTES, type Qcow2Image } from '../image.js';
import { entriesPerBlock, getRefcount } from '../refcount.js';
import type { ImageChain } from '../view.js';

const SKIP = 1;
const ZERO = 2;
const DATA = 4;

export interface WorkItem {
  /** Guest cluster of the target. */
  c: number;
  /** Subclusters to fill with the old view's data / to mark zero (bit 0 only without extended L2). */
  data: number;
  zero: number;
}

export interface Plan {
  items: number;
  dataUnits: number;
  zeroUnits: number;
  newClusters: number;
  nextFree: number;
  /** The refcount table cannot count every new cluster: it is grown first. */
  growTable: boolean;
}

/**
 * The work of the rebase, cluster by cluster of the target, in guest order: which of its
 * unallocated subclusters get the old view's data, which become zero. Metadata only.
 */
export async function* workItems(chain: ImageChain, j: number): AsyncGenerator<WorkItem> {
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
    if (kind === DATA) cur.data |= 1 << (u % nsub);
    else cur.zero |= 1 << (u % nsub);
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

export async function planWork(chain: ImageChain, j: number): Promise<Plan> {
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
    if (e.host !== 0 && !e.copied)
      throw new Qcow2Error('QCOW2_UNSUPPORTED_FEATURE', `cluster ${item.c} is shared (refcount is not 1)`, T.path);
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
export function mustCover(p: Plan, epb: number): (start: number) => number {
  // The new clusters, refcount blocks for them, and slack for block boundaries.
  return (start) => start + p.newClusters + Math.ceil(p.newClusters / epb) + 2;
}

function popcount(x: number): number {
  let n = 0;
  for (let v = x >>> 0; v; v &= v - 1) n++;
  return n;
}
