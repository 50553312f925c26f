// -o rebase: repoint a backup file at a new backing (chain repair after a middle
// backup is deleted). Everything is checked before anything is written, and a
// failure never touches anything but the target (the original wiped the share).
import { stat } from 'node:fs/promises';
import { basename, dirname, join, relative } from 'node:path';
import { refreshManifestEntry } from '../store/manifest-file.js';
import { assertChainSafe, structuralCheck } from '../store/safety.js';
import { NasbackupError } from '../errors.js';
import { ensureWithin } from '../paths.js';
import { readChain, indexInChain, Qcow2Error, readHeader, type Chain } from '../qcow2/index.js';
import type { NasTarget } from '../nas/session.js';
import type { RebaseResult } from './results.js';
import type { RebaseEngine } from '../engine/types.js';
import { syncAfter, type OpContext } from './context.js';

/** Checked by lib/cli/validate.ts: both mount-relative files, at least `<instance>/<file>`. */
export interface RebaseArgs {
  nas: NasTarget;
  target: string;
  newBacking: string;
  /** The target's instance folder (its first component): the VM lock. */
  instance: string;
}

const TARGET = '--rebase-target';
const BACKING = '--rebase-new-backing';

async function requireFile(abs: string, message: string): Promise<void> {
  const st = await stat(abs).catch(() => null);
  if (st === null) throw new NasbackupError('FILE_NOT_FOUND', message);
  if (!st.isFile()) throw new NasbackupError('PATH_INVALID', `${message} (not a regular file)`);
}

async function requireQcow2(abs: string, what: string): Promise<void> {
  try {
    await readHeader(abs);
  } catch (e) {
    if (e instanceof Qcow2Error)
      throw new NasbackupError('NOT_QCOW2', `${what} is not a usable qcow2 image: ${abs}`, { details: e.message });
    throw e;
  }
}

export async function rebaseOperation(ctx: OpContext, args: RebaseArgs, engine: RebaseEngine): Promise<RebaseResult> {
  const nas = await ctx.openNas(args.nas);
  const root = nas.mountPoint;
  const vm = args.instance;
  await ctx.lockVm(root, vm, 'rebase');
  const target = await ensureWithin(root, args.target, { what: TARGET, minDepth: 2 });
  const backing = await ensureWithin(root, args.newBacking, { what: BACKING, minDepth: 2 });
  const changed = await safeRebase(ctx, target, backing, engine, join(root, vm));
  // Done and confirmed on disk: a signal from here on (or one that raced the engine's
  // last step) must not turn it into a failure; the flush still runs.
  ctx.committed();
  // The engines made the target durable themselves (fdatasync after each step, qemu-img's flush
  // on close); what is left (the manifest entry) is on the NAS: syncfs of the NAS, never a
  // global sync that would wait on every disk of the host.
  await syncAfter(ctx, 'rebase', { afterCommit: true, fileSystemOf: root });
  return { target: args.target, newBacking: args.newBacking, changed };
}

/**
 * Repoint `target` (absolute) at `backing` (absolute) keeping its guest-visible content,
 * with the new reference written relative to the target's folder. Checks everything
 * first; a no-op when already done, so a repeated chain repair is safe. Both chains must
 * stay inside `instanceDir` (the VM's folder on the mount) and pass the chain safety check.
 * Returns whether anything was written.
 */
export async function safeRebase(
  ctx: OpContext,
  target: string,
  backing: string,
  engine: RebaseEngine,
  instanceDir: string,
): Promise<boolean> {
  await requireFile(target, `Rebase target file does not exist: ${target}`);
  await requireFile(backing, `New backing file does not exist: ${backing}`);
  await requireQcow2(target, 'Rebase target');
  await requireQcow2(backing, 'New backing file');
  // Pre-flight, shared by every engine: nothing below (qemu-img included) opens a chain our
  // reader refused.
  const vm = basename(instanceDir);
  const safe = { missingOk: true }; // a missing layer: CHAIN_BROKEN below, as before
  for (const w of await assertChainSafe(target, instanceDir, 'The chain of the rebase target', vm, safe))
    ctx.logger.log(`Warning: ${w.message}`);
  for (const w of await assertChainSafe(backing, instanceDir, 'The chain of the new backing file', vm, safe))
    ctx.logger.log(`Warning: ${w.message}`);

  const tst = await stat(target);
  const bst = await stat(backing);
  if (tst.dev === bst.dev && tst.ino === bst.ino)
    throw new NasbackupError('INVALID_ARGUMENT', `Rebase target and new backing are the same file: ${target}`);

  // The new backing's own chain must be readable and must not lead back to the target.
  const backingChain = await chainOrFail(backing, 'New backing file');
  for (const layer of backingChain.layers) {
    const st = await stat(layer.path);
    if (st.dev === tst.dev && st.ino === tst.ino)
      throw new NasbackupError('INVALID_ARGUMENT', `Rebasing ${target} onto ${backing} would create a backing loop`);
  }

  // Safe rebase reads the old view, so the target's current chain must be intact.
  const chain = await chainOrFail(target, 'Rebase target');
  const name = relative(dirname(target), backing);
  const current = chain.layers[0]!.header;
  const index = await indexInChain(chain, backing);

  if (index === 1 && current.backingFile === name && current.backingFormat === 'qcow2') {
    ctx.logger.log(`Rebase: ${target} already backs onto ${name}; nothing to do`);
    return false;
  }
  if (index === -1) {
    ctx.logger.log(`Rebase: ${backing} is not in the current chain of ${target}; qemu-img compares the whole disk (slow path)`);
  } else {
    ctx.logger.log(`Rebase: ${target} onto ${name} (layer ${index} of its chain)`);
  }
  ctx.checkpoint();
  await engine.rebase({ target, newBacking: backing, newBackingName: name, newBackingFormat: 'qcow2', chainIndex: index });

  // Confirm what was written: the target must now back onto the new backing by that name.
  const after = await readChain(target).catch(() => null);
  const top = after?.layers[0]?.header;
  if (!after || top?.backingFile !== name || (await indexInChain(after, backing)) !== 1) {
    throw new NasbackupError('QEMU_IMG_FAILED', `Rebase of ${target} did not take effect (backing is ${top?.backingFile ?? 'unreadable'})`);
  }
  // And structurally sound (refcounts against every reference, natively; the writer's own
  // proof that it left a valid image). Leaks cost space only; anything else is damage.
  const ck = await structuralCheck(target);
  if (ck.kind === 'failed')
    throw new NasbackupError('CHAIN_CORRUPT', `Rebase of ${target} left a damaged image, check it before use`, { details: ck.message });
  ctx.logger.log(`Rebase: structural check of ${target}: ${ck.kind === 'clean' ? 'clean' : ck.message}`);
  // The layer now holds clusters it took from its old backing: its manifest entry follows,
  // so `chain verify` keeps proving it. The rebase is done whatever happens here.
  const refreshed = await refreshManifestEntry(target).catch((e: Error) => `not updated: ${e.message}`);
  ctx.logger.log(`Rebase: manifest entry of ${target}: ${refreshed}`);
  return true;
}

async function chainOrFail(path: string, what: string): Promise<Chain> {
  try {
    return await readChain(path);
  } catch (e) {
    if (e instanceof Qcow2Error) {
      throw new NasbackupError('CHAIN_BROKEN', `${what} has an unreadable backing chain, refusing to rebase: ${path}`, {
        details: e.message,
      });
    }
    throw e;
  }
}
