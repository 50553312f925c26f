// Operator chain tools on a mounted NAS: list, verify, plan a delete, and delete with
// repair of every disk. A delete is idempotent: it re-reads the chains each run, so a
// run interrupted anywhere is finished by running it again.
import { lstat } from 'node:fs/promises';
import { join } from 'node:path';
import { NasbackupError } from '../errors.js';
import { ensureWithin, exists, parseRelativePath } from '../paths.js';
import { QemuImgClient } from '../clients/qemu-img.js';
import { discover, type VmBackups } from '../chain/discover.js';
import { planDelete, type DeletePlan } from '../chain/plan.js';
import type { BackupRecord } from '../chain/provider-plan.js';
import { verifyChains, type VerifyReport } from '../chain/verify.js';
import type { RebaseEngine } from '../engine/types.js';
import type { NasTarget } from '../nas/session.js';
import { syncAfter, type OpContext } from './context.js';
import { removeTree } from './delete.js';
import { safeRebase } from './rebase.js';

export interface ChainArgs {
  nas: NasTarget;
  vm: string;
  /** `<timestamp>` or `<instance>/<timestamp>`. */
  backup?: string;
  force: boolean;
  json: boolean;
  records?: BackupRecord[];
}

function checkVm(vm: string): string {
  const parts = parseRelativePath(vm, { what: '--vm' });
  if (parts.length !== 1) throw new NasbackupError('INVALID_ARGUMENT', `--vm must be an instance name, not a path: ${vm}`);
  return parts[0]!;
}

/** The backup folder name from `--backup`, which must belong to `--vm`. */
export function backupName(vm: string, backup: string | undefined): string {
  if (!backup) throw new NasbackupError('MISSING_ARGUMENT', '--backup <instance>/<timestamp> is required');
  const parts = parseRelativePath(backup, { what: '--backup' });
  if (parts.length === 2 && parts[0] !== vm) throw new NasbackupError('INVALID_ARGUMENT', `--backup ${backup} is not a backup of ${vm}`);
  if (parts.length > 2) throw new NasbackupError('INVALID_ARGUMENT', `--backup must be <instance>/<timestamp>: ${backup}`);
  return parts.at(-1)!;
}

async function load(ctx: OpContext, a: ChainArgs): Promise<{ vm: string; root: string; backups: VmBackups }> {
  const vm = checkVm(a.vm);
  const nas = await ctx.openNas(a.nas);
  const dir = await ensureWithin(nas.mountPoint, vm, { what: '--vm' });
  return { vm, root: nas.mountPoint, backups: await discover(dir) };
}

export async function chainList(ctx: OpContext, a: ChainArgs): Promise<void> {
  const { vm, backups } = await load(ctx, a);
  if (a.json) {
    ctx.out.write(
      JSON.stringify({
        vm,
        backups: backups.backups,
        partials: backups.partials,
        files: backups.files.map((f) => ({
          backup: f.backup,
          file: f.name,
          volId: f.volId,
          kind: f.kind,
          virtualSize: f.virtualSize === null ? null : Number(f.virtualSize),
          backing: f.backingName,
          error: f.error,
        })),
      }) + '\n',
    );
    return;
  }
  ctx.out.write(`${vm}: ${backups.backups.length} backup(s)\n`);
  for (const f of backups.files) {
    const what = f.error ? `UNREADABLE (${f.error})` : f.backingName === null ? 'full' : `<- ${f.backingName}`;
    ctx.out.write(`  ${f.backup}  ${f.name}  ${what}\n`);
  }
  for (const p of backups.partials) ctx.out.write(`  ${p}  (unfinished backup of an interrupted run)\n`);
}

export async function chainVerify(ctx: OpContext, a: ChainArgs): Promise<VerifyReport> {
  const { vm, backups } = await load(ctx, a);
  const qemuImg = new QemuImgClient(ctx.runner, ctx.config.qemuImgBinary, ctx.config.qemuImgTimeoutMs);
  const report = await verifyChains(backups, (abs) => qemuImg.check(abs, { shared: true }));
  if (a.json) {
    ctx.out.write(JSON.stringify({ vm, ...report }) + '\n');
  } else {
    for (const f of report.files) {
      ctx.out.write(`${f.errors.length ? 'FAIL' : 'OK  '} ${vm}/${f.file}${f.errors.length ? `: ${f.errors.join('; ')}` : ''}\n`);
      for (const w of f.warnings) ctx.out.write(`     warning: ${w}\n`);
    }
    for (const w of report.warnings) ctx.out.write(`warning: ${w}\n`);
    const bad = report.files.filter((f) => f.errors.length > 0).length;
    ctx.out.write(`${vm}: ${report.files.length} file(s), ${bad} with errors\n`);
  }
  if (!report.ok) throw new NasbackupError('CHAIN_INVALID', `The backup chains of ${vm} have errors`, { reported: a.json });
  return report;
}

function renderPlan(ctx: OpContext, plan: DeletePlan, json: boolean): void {
  if (json) {
    ctx.out.write(JSON.stringify(plan) + '\n');
    return;
  }
  if (!plan.proceed) return; // the refusal is the error message
  for (const r of plan.rebases) ctx.out.write(`rebase ${r.target} onto ${r.newBacking}\n`);
  for (const d of plan.remove) ctx.out.write(`remove ${d}\n`);
  if (plan.rebases.length === 0 && plan.remove.length === 0) ctx.out.write(`${plan.backup} is already gone\n`);
}

export async function chainPlanDelete(ctx: OpContext, a: ChainArgs): Promise<DeletePlan> {
  const { vm, backups } = await load(ctx, a);
  const plan = await planDelete(backups, vm, backupName(vm, a.backup), { force: a.force, ...(a.records ? { records: a.records } : {}) });
  renderPlan(ctx, plan, a.json);
  if (!plan.proceed) throw new NasbackupError('CHAIN_REFUSED', plan.reason ?? 'refused', { reported: a.json });
  return plan;
}

export async function chainDelete(ctx: OpContext, a: ChainArgs, engine: RebaseEngine): Promise<void> {
  const vm = checkVm(a.vm);
  const name = backupName(vm, a.backup);
  const nas = await ctx.openNas(a.nas);
  const dir = await ensureWithin(nas.mountPoint, vm, { what: '--vm' });
  if (!(await exists(dir))) {
    throw new NasbackupError('FILE_NOT_FOUND', `No backups of ${vm} on this NAS`);
  }
  await ctx.lockVm(nas.mountPoint, vm, 'chain delete');
  // Plan under the lock, from the files as they are now.
  const plan = await planDelete(await discover(dir), vm, name, { force: a.force, ...(a.records ? { records: a.records } : {}) });
  if (!plan.proceed) throw new NasbackupError('CHAIN_REFUSED', plan.reason ?? 'refused');
  const done: string[] = [];
  for (const r of plan.rebases) {
    ctx.checkpoint();
    const target = await ensureWithin(nas.mountPoint, r.target, { what: 'rebase target', minDepth: 3 });
    const backing = await ensureWithin(nas.mountPoint, r.newBacking, { what: 'new backing', minDepth: 3 });
    await safeRebase(ctx, target, backing, engine, dir);
    done.push(`rebased ${r.target} onto ${r.newBacking}`);
    if (!a.json) ctx.out.write(`${done.at(-1)}\n`);
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
    if (st && st.isDirectory()) {
      const quiet = { ...ctx, out: { write: () => {} } };
      await removeTree(a.json ? quiet : ctx, abs, st.dev);
    }
    done.push(`removed ${d}`);
  }
  await syncAfter(ctx, 'chain delete');
  if (a.json) ctx.out.write(JSON.stringify({ ok: true, plan, done }) + '\n');
  ctx.logger.log(`Chain delete of ${join(vm, name)}: ${done.join('; ') || 'nothing to do'}`);
}
