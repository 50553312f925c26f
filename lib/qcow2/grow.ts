// Growing the refcount table, crash-safe. The new table and the refcount blocks it needs go
// at the end of the file and count themselves; existing blocks only gain 0 → 1 entries for
// those new clusters. One 12-byte write inside the first sector (refcount_table_offset and
// refcount_table_clusters are adjacent) then switches the header to the new table, and the
// old table's clusters are freed last. A crash before the switch leaves the old table valid
// (the new clusters leak); a crash after it leaves the old table leaked until it is freed.
import { Qcow2Error } from './errors.js';
import { encodeRefcountTablePointer } from './header.js';
import { MAX_REFTABLE_BYTES, type Qcow2Image } from './image.js';
import { encodeRefTableEntry, entriesPerBlock, entryByteSpan, getRefcount, refTableEntry, setRefcount } from './refcount.js';

export interface GrowResult {
  /** First free byte after the new table and blocks (cluster-aligned). */
  nextFree: number;
  tableOffset: number;
  tableClusters: number;
  newBlocks: number;
}

/**
 * Grow `T`'s refcount table so that it covers `mustCover(end)` clusters, where `end` is the
 * first free cluster after the growth's own allocations, which start at byte `nextFree`.
 */
export async function growRefcountTable(T: Qcow2Image, nextFree: number, mustCover: (end: number) => number): Promise<GrowResult> {
  const cs = T.clusterSize;
  const order = T.header.refcountOrder;
  const epb = entriesPerBlock(cs, order);
  if (nextFree % cs !== 0) throw new Qcow2Error('QCOW2_CORRUPT', `allocation start ${nextFree} is not cluster-aligned`, T.path);
  const oldTable = Buffer.from(await T.refcountTable());
  const oldEntries = T.refcountTableEntries;
  const oldOffset = T.refcountTableOffset;
  const oldClusters = T.header.refcountTableClusters;
  const hasBlock = (ti: number): boolean => ti < oldEntries && refTableEntry(oldTable, ti) !== 0n;
  const P = nextFree / cs;

  // Size the table: it, and the blocks that count it and themselves, come first.
  let tc = oldClusters;
  let blocks: number[];
  let end: number;
  for (;;) {
    let stop = P + tc;
    for (;;) {
      const need: number[] = [];
      for (let ti = Math.floor(P / epb); ti <= Math.floor((stop - 1) / epb); ti++) if (!hasBlock(ti)) need.push(ti);
      const next = P + tc + need.length;
      if (next === stop) {
        blocks = need;
        break;
      }
      stop = next;
    }
    end = stop;
    const want = mustCover(end);
    if (tc > oldClusters && (tc * cs) / 8 >= Math.ceil(want / epb)) break;
    tc = Math.max(tc + 1, Math.ceil((Math.ceil(want / epb) * 8) / cs));
    if (tc * cs > MAX_REFTABLE_BYTES)
      throw new Qcow2Error('QCOW2_REFCOUNT_TABLE_FULL', `the refcount table would have to grow past ${MAX_REFTABLE_BYTES} bytes`, T.path);
  }
  const fresh = new Map(blocks.map((ti, i) => [ti, { off: (P + tc + i) * cs, buf: Buffer.alloc(cs) }]));
  const file = T.file;

  // 1. Refcount 1 for every new cluster [P, end): new blocks whole, existing ones in place.
  await writeRefcounts(T, P, end, 1n, fresh);
  // 2. The new table: the old entries plus the new blocks.
  const table = Buffer.alloc(tc * cs);
  oldTable.copy(table);
  for (const [ti, b] of fresh) encodeRefTableEntry(table, ti, b.off);
  await file.write(table, P * cs);
  await file.datasync();
  // 3. The switch.
  const ptr = encodeRefcountTablePointer(P * cs, tc);
  await file.write(ptr.bytes, ptr.offset);
  await file.datasync();
  T.fileSize = Math.max(T.fileSize, end * cs);
  T.moveRefcountTable(P * cs, tc);
  // 4. Free the old table's clusters.
  await writeRefcounts(T, oldOffset / cs, oldOffset / cs + oldClusters, 0n, new Map());
  await file.datasync();
  return { nextFree: end * cs, tableOffset: P * cs, tableClusters: tc, newBlocks: blocks.length };
}

/**
 * Set the refcount of host clusters [lo, hi) to `value` (from 0 when setting, from 1 when
 * freeing). Blocks in `fresh` (by table index, not linked yet) are filled and written whole;
 * linked blocks are changed in place, only the span of changed entries written.
 */
export async function writeRefcounts(
  T: Qcow2Image,
  lo: number,
  hi: number,
  value: 0n | 1n,
  fresh: Map<number, { off: number; buf: Buffer }>,
): Promise<void> {
  const order = T.header.refcountOrder;
  const epb = entriesPerBlock(T.clusterSize, order);
  const before = value === 1n ? 0n : 1n;
  for (let ti = Math.floor(lo / epb); ti <= Math.floor((hi - 1) / epb); ti++) {
    const a = Math.max(lo, ti * epb) - ti * epb;
    const b = Math.min(hi, (ti + 1) * epb) - ti * epb;
    const nb = fresh.get(ti);
    const block = nb ? nb.buf : await T.refBlock(ti);
    if (!block) throw new Qcow2Error('QCOW2_CORRUPT', `no refcount block counts cluster ${ti * epb + a}`, T.path);
    for (let k = a; k < b; k++) {
      const v = getRefcount(block, k, order);
      if (v !== before) throw new Qcow2Error('QCOW2_CORRUPT', `cluster ${ti * epb + k} has refcount ${v}, expected ${before}`, T.path);
      setRefcount(block, k, order, value);
    }
    if (nb) await T.file.write(nb.buf, nb.off);
    else {
      const [s, e] = entryByteSpan(a, b, order);
      await T.file.write(Buffer.from(block.subarray(s, e)), (await T.refBlockOffset(ti)) + s);
    }
  }
}
