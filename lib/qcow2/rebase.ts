// Native safe rebase for the in-chain case: the target T backs onto O1 → … → O(j-1) → N
// and is repointed at N. Every cluster (subcluster with extended L2) that the removed
// layers O1..O(j-1) allocate and T does not is copied into T — data as data, zero
// clusters as zero clusters — without reading N. The new backing name is switched to last.
//
// Crash safety (docs/qcow2-notes.md §7): new clusters are appended at EOF and only unallocated
// L2 entries are pointed at them. A refcount table too small for the new clusters is first
// replaced by a larger one (grow.ts). Per batch: data and refcounts (new refcount blocks are
// counted, and written, before being linked) → fdatasync → refcount table entries, in rounds
// so no block is linked before the block counting it (fdatasync after each) → L2 (new tables
// complete before linking) → fdatasync → L1 → fdatasync. The new name goes into free header
// space before the first batch (durable with its data); the pointer switch is the last write.
// A crash at any point leaves a valid image (leaks at most) whose content equals the original
// chain's, and a rerun finishes the job.
//
// The parts: rebase/plan.ts (what to copy), rebase/writer.ts (the batches, in the order above),
// rebase/commit.ts (the header). This file checks the shape and runs them in order.
import { stat } from 'node:fs/promises';
import { Qcow2Error } from './errors.js';
import { checkWritable, MAX_BACKING_NAME } from './header.js';
import { growRefcountTable } from './grow.js';
import { Qcow2Image } from './image.js';
import { NodeBlockFile, type BlockFile } from './io.js';
import { ImageChain } from './view.js';
import { checkTargetMetadata, mustCover, planWork, workItems } from './rebase/plan.js';
import { Writer } from './rebase/writer.js';
import { clearUnknownAutoclear, commitHeader, planHeader, writeBackingName } from './rebase/commit.js';

const L2_CACHE_BYTES = 512 << 10;

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
  /** Data per crash-consistent batch (default 1 GiB: each batch ends with a pause of the pipeline for its syncs). */
  batchBytes?: number;
  /** Copy requests: bytes each (default 1 MiB) and how many at once (default 4); memory is their product. */
  copy?: { requestBytes?: number; buffers?: number };
  hooks?: RebaseHooks;
  /** Wrap the target's file (tests: power-loss models). */
  wrapFile?: (f: BlockFile) => BlockFile;
  /** Plan only: every check, no write. */
  dryRun?: boolean;
  /**
   * Called once every check passed and the plan is made, before the first write (not on a
   * dry run): an error thrown before it left the target untouched.
   */
  onPlanned?: () => void;
  log?: (message: string) => void;
  /**
   * Called before each copy request, between batches (each leaves a consistent image) and
   * before the header commit; throw here to stop early (a termination signal): the batch in
   * progress is dropped (its data sits in clusters nothing references). A rerun finishes the job.
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
  /** Not counted: an early writeback adds durability only; the ordered syncs are the crash points. */
  get writeback(): (() => Promise<void>) | undefined {
    const inner = this.inner;
    return inner.writeback ? () => inner.writeback!() : undefined;
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

/** Safe rebase of `target` onto `newBacking` (in its chain), natively. */
export async function nativeRebase(opts: NativeRebaseOptions): Promise<NativeRebaseResult> {
  const log = opts.log ?? (() => {});
  const box: { hooked: HookedFile | null } = { hooked: null };
  const chain = await ImageChain.open(opts.target, {
    writableTop: !opts.dryRun,
    // The scans are sequential: a few tables per image suffice, and memory stays flat.
    l2CacheBytes: L2_CACHE_BYTES,
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
    opts.onPlanned?.();

    await clearUnknownAutoclear(T);
    await writeBackingName(T, headerPlan, opts.newBackingName);
    let nextFree = plan.nextFree;
    if (plan.growTable) {
      const g = await growRefcountTable(T, nextFree, mustCover(plan, T.refcountEntriesPerBlock));
      log(
        `refcount table of ${opts.target} moved to ${g.tableOffset} (${g.tableClusters} cluster(s), ${g.newBlocks} new refcount block(s))`,
      );
      nextFree = g.nextFree;
      result.refcountTableGrown = true;
      opts.checkpoint?.();
    }
    const w = new Writer(chain, nextFree, opts.batchBytes ?? 1 << 30, opts.checkpoint, opts.copy, plan.sources);
    await w.apply(plan.work ?? workItems(chain, j));
    opts.checkpoint?.();
    result.copiedBytes = w.copiedBytes;
    result.newClusters = w.newClusters;
    result.batches = w.batches;
    // Every batch ends with fdatasyncs, and so does a grown refcount table: the name is durable.
    await commitHeader(T, headerPlan, opts.newBackingName, w.batches > 0 || result.refcountTableGrown);
    result.ops = box.hooked?.ops ?? 0;
    return result;
  } finally {
    await chain.close();
  }
}
