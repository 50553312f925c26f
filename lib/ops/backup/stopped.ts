// Backup of a stopped VM: a qemu-img copy of each -d disk. Stops at the first failure
// (the original carried on into a deleted folder); bitmaps are added to the sources
// only once every copy succeeded, so the next running backup can be incremental.
import { stat } from 'node:fs/promises';
import { STOPPED_FALLBACK_REASON, type BackupReport } from '../../agent-output.js';
import { NasbackupError } from '../../errors.js';
import { exists } from '../../paths.js';
import { Qcow2Error, readHeader } from '../../qcow2/index.js';
import { softly, ToolError } from '../../clients/failure.js';
import type { QemuImgClient } from '../../clients/qemu-img.js';
import { backupFileName, volumeId } from '../../store/disks.js';
import type { BackupArgs } from './args.js';
import { apparentSize, WorkDir } from './workdir.js';
import { writeManifest } from './manifest.js';
import { verifyBackup } from './verify.js';
import { syncAfter, type OpContext } from '../context.js';
import type { BackupResult } from '../results.js';

/**
 * Source format, stated explicitly rather than probed: RBD and block devices are raw.
 * A file with the qcow2 magic is qcow2 even when its header is damaged: qemu-img
 * must refuse it, not copy its bytes as a "raw" disk.
 */
async function sourceFormat(src: string): Promise<'qcow2' | 'raw'> {
  if (src.startsWith('rbd:') || src.startsWith('/dev/')) return 'raw';
  return readHeader(src).then(
    () => 'qcow2' as const,
    (e: unknown) => (e instanceof Qcow2Error && (e.code === 'QCOW2_BAD_MAGIC' || e.code === 'QCOW2_IO') ? 'raw' : 'qcow2'),
  );
}

export async function stoppedBackup(ctx: OpContext, a: BackupArgs): Promise<BackupResult> {
  const { qemuImg } = ctx.clients;
  const disks = a.diskPaths.map((src, i) => {
    const volId = volumeId(src);
    return { src, volId, file: backupFileName(i, volId) };
  });
  if (new Set(disks.map((d) => d.volId)).size !== disks.length) {
    throw new NasbackupError('INVALID_ARGUMENT', `Two disks share a volume id; their backup files would collide: ${a.diskPaths.join(',')}`);
  }
  for (const d of disks) {
    if (!d.src.startsWith('rbd:') && !(await exists(d.src, { follow: true }))) {
      throw new NasbackupError('FILE_NOT_FOUND', `Source disk does not exist: ${d.src}`);
    }
  }
  const nas = await ctx.openNas(a.nas);
  await ctx.lockVm(nas.mountPoint, a.instance, 'backup');
  const work = await WorkDir.create(nas.mountPoint, a.path, { staleAfterMs: ctx.config.lockStaleAfterMs, log: (m) => ctx.logger.log(m) });
  try {
    const formats: Array<'qcow2' | 'raw'> = [];
    for (const d of disks) {
      ctx.checkpoint();
      const fmt = await sourceFormat(d.src);
      formats.push(fmt);
      const dst = work.file(d.file);
      await qemuImg.convert(d.src, fmt, dst);
    }
    await syncAfter(ctx, 'backup');
    const manifest = await writeManifest(ctx, a, work, {
      kind: 'full',
      checkpoint: a.bitmapNew,
      incrementalFrom: null,
      parent: null,
      disks: disks.map((d) => ({ file: d.file, volId: d.volId })),
    });
    if (a.verify) await verifyBackup(ctx, work, manifest);
    await ctx.commit(() => work.commit());

    // Seed the bitmap the next (running) incremental starts from. Only qcow2 files can
    // carry one; a disk without it makes that incremental fall back to a full, safely.
    // BITMAP_CREATED= is printed only when every disk has it empty and recording.
    let bitmapCreated: string | null = null;
    if (a.bitmapNew) {
      let all = true;
      for (const [i, d] of disks.entries()) {
        if (formats[i] !== 'qcow2') {
          all = false;
          ctx.logger.log(`No bitmap on ${d.src}: only qcow2 files can carry one`);
          continue;
        }
        if (!(await seedBitmap(ctx, qemuImg, d.src, a.bitmapNew))) all = false;
      }
      bitmapCreated = all ? a.bitmapNew : null;
      // The next incremental may only start from a bitmap that records on every disk.
      if (!all)
        ctx.logger.log(`Not reporting BITMAP_CREATED=${a.bitmapNew}: it is not an empty, recording bitmap on every disk (see above)`);
    }

    const sizes = await Promise.all(
      disks.map(async (d) => ({ name: d.file, size: (await stat(`${work.final}/${d.file}`, { bigint: true })).size })),
    );
    const report: BackupReport = {
      profile: a.profile,
      fallbackReason: a.mode === 'incremental' ? STOPPED_FALLBACK_REASON : null,
      bitmapCreated,
      warnings: [],
      totalBytes: await apparentSize(work.final),
    };
    ctx.logger.log(`Backup of stopped VM ${a.vm} to ${work.final} completed (${report.totalBytes} bytes)`);
    return { vm: a.vm, path: a.path, mode: a.mode, format: 'stopped', report, warnings: [], jobBlock: '', files: sizes };
  } catch (e) {
    await work.discard().catch((err: Error) => ctx.leftover(`Could not remove the unfinished backup ${work.path}: ${err.message}`));
    throw e;
  }
}

/**
 * Add the bitmap: it must end up recording, persistent and empty, or it is not reported.
 * One that already exists (an earlier attempt of this backup, or a crash) cannot be
 * trusted as it is: a disabled one records nothing even when cleared, an in-use one
 * cannot be cleared at all. So it is replaced (removed and added in one qemu-img run)
 * and then read back.
 */
async function seedBitmap(ctx: OpContext, qemuImg: QemuImgClient, src: string, name: string): Promise<boolean> {
  const added = await qemuImg.addBitmap(src, name).catch((e: unknown) => toolText(e));
  if (added === true) return true;
  if (typeof added === 'string') {
    ctx.logger.log(`Warning: could not add bitmap ${name} to ${src}: ${added}`);
    return false;
  }
  const refused = await softly(qemuImg.replaceBitmap(src, name));
  if (refused !== null) {
    ctx.logger.log(`Warning: bitmap ${name} already exists on ${src} and could not be replaced: ${refused}`);
    return false;
  }
  let flags: string[] | undefined;
  try {
    flags = (await qemuImg.bitmaps(src)).find((b) => b.name === name)?.flags;
  } catch (e) {
    ctx.logger.log(`Warning: cannot read back bitmap ${name} on ${src}: ${toolText(e)}`);
    return false;
  }
  if (!flags?.includes('auto') || flags.includes('in-use')) {
    ctx.logger.log(
      `Warning: bitmap ${name} on ${src} is not recording after it was replaced (${flags ? `flags: ${flags.join(',') || 'none'}` : 'missing'})`,
    );
    return false;
  }
  ctx.logger.log(`Replaced the existing bitmap ${name} on ${src} with an empty, recording one`);
  return true;
}

/** A tool failure's own text; anything else propagates. */
function toolText(e: unknown): string {
  if (e instanceof ToolError) return e.details;
  throw e;
}
