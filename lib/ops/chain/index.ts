// Operator chain tools on a mounted NAS: list, verify, plan a delete, and delete with
// repair of every disk. Each returns its result (lib/output.ts renders it). A delete is idempotent: it re-reads the chains each run, so a
// run interrupted anywhere is finished by running it again.
import { lstat } from 'node:fs/promises';
import { join } from 'node:path';
import { NasbackupError, withResult } from '../../errors.js';
import { ensureWithin, exists } from '../../paths.js';
import { backingFile, discover, type BackupFile, type VmBackups } from '../../store/backups.js';
import { readLayerDigest } from '../../store/layer-read.js';
import type { HashPool } from '../../store/hash-pool.js';
import { structuralCheck, type StructuralCheck } from '../../store/safety.js';
import type { DeletePlan } from './plan.js';
import type { BackupRecord } from './provider-plan.js';
import { verifyChains, type VerifyReport } from '../../store/verify-chains.js';
import type { RebaseEngine } from '../../engine/types.js';
import type { BlockFile } from '../../qcow2/index.js';
import type { NasTarget } from '../../nas/session.js';
import { syncAfter, type OpContext } from '../context.js';

/** Checked by lib/cli/validate.ts (validateChainArgs). */
export interface ChainArgs {
  nas: NasTarget;
  /** The instance folder (one path component). */
  vm: string;
  /** The backup's folder name (`<timestamp>`) below the instance; required by plan-delete and delete. */
  backup?: string;
  force: boolean;
  records?: BackupRecord[];
}

// Loaded by the commands that use them (verify, run most, needs none: a faster start).
const planner = () => import('./plan.js');
/**
 * The re-read's pool: slots of 2 MiB (the default's 4 MiB made no faster re-read in paired
 * runs here: the layers read at once keep the disk busy) halve the memory its slots take,
 * ~20 MiB of peak RSS with two cores.
 */
const VERIFY_SLOT_BYTES = 2 << 20;
const newHashPool = async (): Promise<HashPool> =>
  new (await import('../../store/hash-pool.js')).HashPool({ slotBytes: VERIFY_SLOT_BYTES });

/** validateChainArgs requires --backup for plan-delete and delete. */
function required(backup: string | undefined): string {
  if (backup === undefined) throw new NasbackupError('INTERNAL', 'Internal error: --backup was not checked');
  return backup;
}

async function load(ctx: OpContext, a: ChainArgs): Promise<{ vm: string; root: string; backups: VmBackups }> {
  const vm = a.vm;
  const nas = await ctx.openNas(a.nas);
  const dir = await ensureWithin(nas.mountPoint, vm, { what: '--vm' });
  return { vm, root: nas.mountPoint, backups: await discover(dir) };
}

export interface ChainListResult {
  vm: string;
  backups: VmBackups;
}

export async function chainList(ctx: OpContext, a: ChainArgs): Promise<ChainListResult> {
  const { vm, backups } = await load(ctx, a);
  return { vm, backups };
}

export interface ChainVerifyResult {
  vm: string;
  report: VerifyReport;
}

/** Below this (data to prove in all), starting worker threads costs more than hashing here. */
const POOL_MIN_BYTES = 64 << 20;

export interface VerifyOptions {
  /** Data bytes compared so far, of the total (a progress bar on a terminal). */
  progress?: (done: number, total: number) => void;
}

export async function chainVerify(ctx: OpContext, a: ChainArgs, opts: VerifyOptions = {}): Promise<ChainVerifyResult> {
  const { vm, root, backups: all } = await load(ctx, a);
  if (!(await exists(all.instanceDir)) || (all.backups.length === 0 && all.partials.length === 0)) {
    throw new NasbackupError('FILE_NOT_FOUND', `No backups of ${vm} on this NAS`);
  }
  let backups = all;
  if (a.backup !== undefined) {
    if (!all.backups.includes(a.backup)) throw new NasbackupError('FILE_NOT_FOUND', `No backup ${vm}/${a.backup} on this NAS`);
    backups = await pointInTime(all, a.backup);
  }
  ctx.logger.log(`Chain verify of ${vm}${a.backup ? `/${a.backup}` : ''} on ${root}`);
  const check = async (abs: string, file?: BlockFile): Promise<StructuralCheck> => {
    const r = await structuralCheck(abs, () => ctx.clients.qemuImg.check(abs, { shared: true }), file);
    ctx.logger.log(`Structural check of ${abs}: ${r.kind}${r.kind === 'clean' ? '' : ` (${r.message})`} [${r.by}]`);
    return r;
  };
  // With data enough to prove, every layer is hashed on the pool: XXH64 between the reads
  // here, SHA-256 on worker threads (every core; they start with the first such extent).
  // The first layers are re-read before the last manifests are read, so the pool is made
  // now when the files may hold that much data (their size bounds what they hold, but for
  // compressed clusters: those are read into buffers of their own, and the pool follows
  // once the manifests say how much data there is). The pool's slots bound the memory.
  let pool: Promise<HashPool> | undefined;
  let fileBytes = 0;
  for (const f of backups.files) fileBytes += backups.looked?.get(f.abs)?.st.size ?? 0;
  if (fileBytes >= POOL_MIN_BYTES) pool = newHashPool();
  let report: VerifyReport;
  // Read buffers for the layers hashed here, reused from layer to layer.
  const spare: Buffer[] = [];
  try {
    report = await verifyChains(backups, check, 4, {
      scope: backups.backups,
      // A layer's structural check and re-read in one task: a few at once keep the disk and the cores busy.
      layers: 4,
      // (Told once every manifest is read: the layers re-read before that hash here.)
      planned: (bytes) => {
        if (bytes >= POOL_MIN_BYTES) pool ??= newHashPool();
      },
      // Several reads in flight per layer, a few layers at once (lib/store/layer-read.ts).
      digest: async (abs, { extentBytes, algorithm, partBytes }, onData, file) => {
        const p = await pool;
        return readLayerDigest(abs, {
          extentBytes,
          algorithm,
          ...(partBytes !== undefined ? { partBytes } : {}),
          ...(file ? { file } : {}),
          between: () => ctx.checkpoint(),
          ...(onData ? { onData } : {}),
          ...(p ? { pool: p } : { spare }),
        });
      },
      between: () => ctx.checkpoint(),
      ...(opts.progress ? { progress: opts.progress } : {}),
    });
  } finally {
    await (await pool?.catch(() => undefined))?.close();
  }
  const result = { vm, report };
  if (!report.ok) throw new NasbackupError('CHAIN_INVALID', `The backup chains of ${vm} have errors`, { result });
  return result;
}

/** One point in time: the files of `backup` and every layer below them, and the folders they are in. */
async function pointInTime(all: VmBackups, backup: string): Promise<VmBackups> {
  const keep = new Set<BackupFile>();
  for (let todo = all.files.filter((f) => f.backup === backup); todo.length > 0;) {
    const f = todo.pop()!;
    if (keep.has(f)) continue;
    keep.add(f);
    const parent = await backingFile(all, f);
    if (parent) todo.push(parent);
  }
  const files = all.files.filter((f) => keep.has(f));
  const folders = new Set([backup, ...files.map((f) => f.backup)]);
  return { ...all, files, backups: all.backups.filter((b) => folders.has(b)), partials: [] };
}

export interface ChainPlanResult {
  plan: DeletePlan;
}

export async function chainPlanDelete(ctx: OpContext, a: ChainArgs): Promise<ChainPlanResult> {
  const { vm, backups } = await load(ctx, a);
  const { planDelete } = await planner();
  const plan = await planDelete(backups, vm, required(a.backup), { force: a.force, ...(a.records ? { records: a.records } : {}) });
  if (!plan.proceed) throw new NasbackupError('CHAIN_REFUSED', plan.reason ?? 'refused', { result: { plan } });
  return { plan };
}

export interface ChainDeleteResult {
  plan: DeletePlan;
  /** What was done, in order: `rebased <file> onto <file>`, `removed <instance>/<timestamp>` (NAS-relative). */
  done: string[];
}

/**
 * `approve`: asked once the plan is made (under the lock) and before anything changes;
 * false leaves everything as it was (NOT_CONFIRMED).
 */
export async function chainDelete(
  ctx: OpContext,
  a: ChainArgs,
  engine: RebaseEngine,
  approve?: (plan: DeletePlan) => Promise<boolean>,
): Promise<ChainDeleteResult> {
  const vm = a.vm;
  const name = required(a.backup);
  const nas = await ctx.openNas(a.nas);
  const dir = await ensureWithin(nas.mountPoint, vm, { what: '--vm' });
  if (!(await exists(dir))) {
    throw new NasbackupError('FILE_NOT_FOUND', `No backups of ${vm} on this NAS`);
  }
  await ctx.lockVm(nas.mountPoint, vm, 'chain delete');
  const [{ planDelete }, { removeTree }, { safeRebase }] = await Promise.all([planner(), import('../delete.js'), import('../rebase.js')]);
  // Plan under the lock, from the files as they are now.
  const plan = await planDelete(await discover(dir), vm, name, { force: a.force, ...(a.records ? { records: a.records } : {}) });
  if (!plan.proceed) throw new NasbackupError('CHAIN_REFUSED', plan.reason ?? 'refused', { result: { plan, done: [] } });
  const done: string[] = [];
  const result: ChainDeleteResult = { plan, done };
  if (approve && (plan.rebases.length > 0 || plan.remove.length > 0) && !(await approve(plan))) {
    throw new NasbackupError('NOT_CONFIRMED', `Not confirmed: nothing of ${join(vm, name)} was changed`);
  }
  try {
    for (const r of plan.rebases) {
      ctx.checkpoint();
      const target = await ensureWithin(nas.mountPoint, r.target, { what: 'rebase target', minDepth: 3 });
      const backing = await ensureWithin(nas.mountPoint, r.newBacking, { what: 'new backing', minDepth: 3 });
      await safeRebase(ctx, target, backing, engine, dir);
      done.push(`rebased ${r.target} onto ${r.newBacking}`);
    }
    // Nothing may depend on what is removed: re-read and re-plan before each removal.
    for (const d of plan.remove) {
      ctx.checkpoint();
      const again = await planDelete(await discover(dir), vm, d.split('/').at(-1)!, { force: a.force });
      if (!again.proceed || again.rebases.length > 0 || again.remove.length > 1 || (again.remove.length === 1 && again.remove[0] !== d)) {
        throw new NasbackupError('CHAIN_REFUSED', `Refusing to remove ${d}: backups still depend on it`, { details: again.reason ?? '' });
      }
      const abs = await ensureWithin(nas.mountPoint, d, { what: 'backup', minDepth: 2 });
      const st = await lstat(abs).catch(() => null);
      if (st && st.isDirectory()) await removeTree(ctx, abs, st.dev, []);
      done.push(`removed ${d}`);
    }
  } catch (e) {
    throw withResult(e, result); // what was done before the failure is still reported
  }
  await syncAfter(ctx, 'chain delete', { fileSystemOf: nas.mountPoint }); // the NAS only
  ctx.logger.log(`Chain delete of ${join(vm, name)}: ${done.join('; ') || 'nothing to do'}`);
  return result;
}
