// --verify (#12898): the backup just written is proved before it is published, as
// `chain verify --backup` would prove it: the structure of its chain (backing references
// inside the VM folder, formats, virtual sizes, the chain safety check, the native structural check),
// then its content re-read from the NAS (this host's cached pages of the files dropped
// first) and compared with the manifest's digests. A failure fails the backup: the work
// folder is discarded by the caller's undo, so a backup that failed never looks finished.
import { open, readdir, realpath } from 'node:fs/promises';
import { basename, dirname } from 'node:path';
import { NasbackupError } from '../../errors.js';
import { partLayout, type Manifest } from '../../store/manifest.js';
import { structuralCheck, type StructuralCheck } from '../../store/safety.js';
import { volumeIdOfBackupFile } from '../../store/disks.js';
import { HashPool } from '../../store/hash-pool.js';
import { digestLayer } from '../../store/layer-digest.js';
import { backingFile, discover, readBackupFile, type BackupFile, type VmBackups } from '../../store/backups.js';
import { compareExtents, verifyChains } from '../../store/verify-chains.js';
import type { OpContext } from '../context.js';
import type { WorkDir } from './workdir.js';

/** --verify: throws BACKUP_VERIFY_FAILED (one line: the first problem, and how many more) when the backup is not proved. */
export async function verifyBackup(ctx: OpContext, work: WorkDir, manifest: Manifest | null): Promise<void> {
  const problems = await verifyNewBackup(ctx, work, manifest);
  for (const p of problems) ctx.logger.log(`Verify: ${p}`);
  if (problems.length > 0)
    throw new NasbackupError(
      'BACKUP_VERIFY_FAILED',
      `Backup verification failed, backup removed: ${problems[0]}${problems.length > 1 ? ` (and ${problems.length - 1} more problem(s), see the log)` : ''}`,
    );
}

/** Problems found, one line each (`<file>: <what>`); empty when the backup is proved. */
export async function verifyNewBackup(ctx: OpContext, work: WorkDir, manifest: Manifest | null): Promise<string[]> {
  const started = Date.now();
  const instanceDir = dirname(work.final);
  const ts = basename(work.final);
  const all = await discover(instanceDir);
  const realDir = await realpath(instanceDir);
  const fresh: BackupFile[] = [];
  for (const name of (await readdir(work.path)).sort()) {
    if (volumeIdOfBackupFile(name) === null) continue;
    const f = await readBackupFile(realDir, ts, name, work.file(name));
    if (f) fresh.push(f);
  }
  // The new backup's point in time: its files and every layer below them.
  const files = [...fresh];
  for (let todo = [...fresh]; todo.length > 0;) {
    const parent = await backingFile(all, todo.pop()!);
    if (parent && !files.includes(parent)) {
      files.push(parent);
      todo.push(parent);
    }
  }
  const folders = new Set(files.map((f) => f.backup));
  const vm: VmBackups = { instanceDir, backups: [...all.backups.filter((b) => folders.has(b)), ts], files, partials: [] };
  const check = async (abs: string): Promise<StructuralCheck> => {
    const r = await structuralCheck(abs, () => ctx.clients.qemuImg.check(abs, { shared: true }));
    ctx.logger.log(`Structural check of ${abs}: ${r.kind}${r.kind === 'clean' ? '' : ` (${r.message})`} [${r.by}]`);
    return r;
  };
  const report = await verifyChains(vm, check, 2);
  const problems: string[] = [];
  for (const r of report.files) for (const e of r.errors) problems.push(`${r.file}: ${e}`);
  ctx.checkpoint();

  if (manifest === null) {
    ctx.logger.log(`Verify of ${ts}: no manifest, structural checks only`);
  } else if (problems.length === 0) {
    problems.push(...(await verifyContent(ctx, work, ts, manifest, fresh)));
  }
  ctx.logger.log(
    `Verify of ${ts}: ${fresh.length} new file(s), ${files.length} layer(s) checked in ${Date.now() - started} ms: ${problems.length === 0 ? 'OK' : `${problems.length} problem(s)`}`,
  );
  return problems;
}

/** Each new file re-read from the NAS and compared, extent by extent, with the manifest. */
async function verifyContent(ctx: OpContext, work: WorkDir, ts: string, m: Manifest, fresh: BackupFile[]): Promise<string[]> {
  const problems: string[] = [];
  for (const f of fresh) if (!m.disks.some((d) => d.file === f.name)) problems.push(`${ts}/${f.name}: not listed in the manifest`);
  const bytes = m.disks.reduce((n, d) => n + d.fileBytes, 0);
  const pool = bytes >= 64 << 20 ? new HashPool() : null;
  try {
    for (const d of m.disks) {
      ctx.checkpoint();
      const f = fresh.find((x) => x.name === d.file);
      const where = `${ts}/${d.file}`;
      if (!f) {
        problems.push(`${where}: listed in the manifest but missing`);
        continue;
      }
      if (f.virtualSize !== BigInt(d.virtualSize))
        problems.push(`${where}: virtual size ${f.virtualSize}, the manifest says ${d.virtualSize}`);
      if (f.backingName !== d.backing)
        problems.push(`${where}: backing ${f.backingName ?? 'none'}, the manifest says ${d.backing ?? 'none'}`);
      await dropCachedPages(ctx, f.abs);
      try {
        const got = await digestLayer(f.abs, {
          extentBytes: m.digest.extentBytes,
          algorithm: m.digest.algorithm,
          ...(m.digest.partBytes !== undefined ? { partBytes: m.digest.partBytes } : {}),
          between: () => ctx.checkpoint(),
          ...(pool ? { pool } : {}),
          // On a local disk, from the device itself: no page the kernel still caches can stand in for it.
          directReads: true,
        });
        for (const p of compareExtents(d.extents, got.extents, partLayout(m.digest, d))) problems.push(`${where}: ${p}`);
      } catch (e) {
        if (e instanceof NasbackupError) throw e;
        problems.push(`${where}: content unreadable: ${(e as Error).message}`);
      }
    }
  } finally {
    await pool?.close();
  }
  return problems;
}

/**
 * So the re-read comes from the NAS, not from what this host still caches of the write:
 * flush the file, then ask the kernel to drop its clean pages (GNU dd's nocache). Best
 * effort: where that is not possible the read is served from the cache, and the log says so.
 */
async function dropCachedPages(ctx: OpContext, abs: string): Promise<void> {
  const fh = await open(abs, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
  const r = await ctx.clients.host.dropCache(abs).catch((e: Error) => e.message);
  if (r !== undefined)
    ctx.logger.log(`Verify: could not drop the cached pages of ${abs} (${r}); its re-read may come from this host's cache`);
}
