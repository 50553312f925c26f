// The last step of every backup path: read each new layer once, digest it per extent and
// write `manifest.json` into the work folder (temp file, fsync, rename) just before the
// commit, so the rename publishes backup and manifest together: a backup folder of ours
// without one is either unfinished or older than manifests. The read is cheap: it starts
// right after the data is written (page cache), overlaps the flush, and hashes extents
// between the reads (XXH64) or on every core (SHA-256; store/hash-pool.ts); a writer that
// digests as it writes skips it.
//
// Sizes the agent reads: the running-VM figure is `du -sb` of the folder (contract §5.1),
// which now counts the manifest as it counts the side files; the stopped-VM lines list
// the disk files only, so they do not change.
import { readFileSync } from 'node:fs';
import { stat } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { NasbackupError, toNasbackupError } from '../../errors.js';
import { layerEntry, writeManifestFile } from '../../store/manifest-file.js';
import { digestLayer, type LayerDigest } from '../../store/layer-digest.js';
import { HashPool } from '../../store/hash-pool.js';
import {
  digestSection,
  MANIFEST_FORMAT,
  manifestVersionFor,
  newDigestSpec,
  type Manifest,
  type ManifestDisk,
} from '../../store/manifest.js';
import type { BackupArgs } from './args.js';
import type { WorkDir } from './workdir.js';
import type { OpContext } from '../context.js';

export interface ManifestFacts {
  kind: 'full' | 'incremental';
  checkpoint: string | null;
  incrementalFrom: string | null;
  /** Mount-relative folder of the parent backup, or null. */
  parent: string | null;
  /** Per disk: its file in the work folder, and its digests when the copy computed them as it wrote (else the file is re-read). */
  disks: Array<{ file: string; volId: string; digest?: LayerDigest }>;
}

declare const __NASBACKUP_VERSION__: string | undefined;

/** The bundle has it inlined; dist/ reads package.json beside bin/ (as `--version` does). */
function toolVersion(): string {
  if (typeof __NASBACKUP_VERSION__ === 'string') return __NASBACKUP_VERSION__;
  try {
    const bin = process.argv[1];
    if (bin) return (JSON.parse(readFileSync(join(dirname(bin), '..', 'package.json'), 'utf8')) as { version: string }).version;
  } catch {
    // not started through bin/ (a test calling the operation): unknown
  }
  return 'unknown';
}

/** Below this many bytes of files, worker threads cost more than they save. */
const POOL_MIN_BYTES = 64 << 20;

/** Digests of new layers being computed; `cancel()` stops them (a failed backup). */
export interface PendingDigests {
  started: number;
  result: Promise<Map<string, LayerDigest>>;
  cancel(): Promise<void>;
}

/**
 * Hash workers started ahead, while the data is still being written (a running VM's
 * backup job): their start-up (threads, module loading) then costs the backup nothing.
 * Null when no manifest is written or the layers will be too small to be worth threads
 * (`expectedBytes`, when known). Hand it to digestNewLayers, which closes it; close it
 * yourself if the backup fails before.
 */
export function startHashPool(ctx: OpContext, expectedBytes: number | null): HashPool | null {
  if (ctx.config.benchSkipManifest || (expectedBytes !== null && expectedBytes < POOL_MIN_BYTES)) return null;
  return hashPool(ctx)?.warm(ctx.config.digestAlgorithm) ?? null;
}

/**
 * NASBACKUP_HASH_WORKERS on the running path: 0 hashes on this thread (no pool), n workers,
 * unset one per core. XXH64 never needs a worker (it outruns the reads on one core): its
 * pool hashes inline, between the reads, with the few slots that takes.
 */
function hashPool(ctx: OpContext): HashPool | null {
  const n = ctx.config.hashWorkers;
  if (n === 0) return null;
  if (ctx.config.digestAlgorithm === 'xxh64') return new HashPool({ workers: 0 });
  return new HashPool(n === null ? {} : { workers: n });
}

/**
 * Start reading and digesting `files` (work-folder names) now, e.g. while the NAS is
 * flushed; on `pool` when given (started ahead; closed at the end, whatever the size).
 */
export function digestNewLayers(ctx: OpContext, work: WorkDir, files: readonly string[], warm: HashPool | null = null): PendingDigests {
  const started = Date.now();
  let cancelled = false;
  let pool: HashPool | null = warm;
  const between = (): void => {
    if (cancelled) throw new Error('digests cancelled');
    ctx.checkpoint();
  };
  const result = (async () => {
    const out = new Map<string, LayerDigest>();
    try {
      if (ctx.config.benchSkipManifest) return out;
      let bytes = 0;
      for (const f of files) bytes += (await stat(work.file(f))).size;
      if (pool === null && bytes >= POOL_MIN_BYTES && !cancelled) pool = hashPool(ctx);
      for (const f of files) {
        between();
        const opts = { ...newDigestSpec(ctx.config.digestAlgorithm), between };
        out.set(f, await digestLayer(work.file(f), { ...opts, ...(pool ? { pool } : {}) }));
      }
    } finally {
      await pool?.close();
    }
    return out;
  })();
  // Awaited by writeManifest, or settled by cancel().
  result.catch(() => {});
  return {
    started,
    result,
    cancel: async () => {
      cancelled = true;
      await pool?.close();
      await result.catch(() => {});
    },
  };
}

/**
 * Write the manifest: each disk's digests come from the writer (`facts.disks[].digest`),
 * from digests started earlier (`pending`), or from a read of the file now.
 */
export async function writeManifest(
  ctx: OpContext,
  a: BackupArgs,
  work: WorkDir,
  facts: ManifestFacts,
  pending?: PendingDigests,
): Promise<Manifest | null> {
  if (ctx.config.benchSkipManifest) {
    ctx.logger.log(`Warning: no manifest for ${a.path} (NASBACKUP_BENCH_SKIP_MANIFEST, for measurements only)`);
    return null;
  }
  try {
    return await manifestStep(ctx, a, work, facts, pending);
  } catch (e) {
    if (e instanceof NasbackupError) throw e;
    // Worded and coded as a failed commit: the manifest is part of finishing the backup.
    const code = toNasbackupError(e).code;
    throw new NasbackupError(
      code === 'INTERNAL' ? 'NAS_WRITE_FAILED' : code,
      `Failed to finish the backup ${work.final}: ${(e as Error).message}`,
    );
  }
}

async function manifestStep(
  ctx: OpContext,
  a: BackupArgs,
  work: WorkDir,
  facts: ManifestFacts,
  pending?: PendingDigests,
): Promise<Manifest> {
  const waited = Date.now();
  const createdAt = new Date().toISOString();
  const missing = facts.disks.filter((d) => !d.digest && !pending).map((d) => d.file);
  const run = pending ?? (missing.length > 0 ? digestNewLayers(ctx, work, missing) : null);
  const got = run ? await run.result : new Map<string, LayerDigest>();
  const disks: ManifestDisk[] = [];
  for (const d of facts.disks) {
    ctx.checkpoint();
    const dg = d.digest ?? got.get(d.file);
    if (!dg) throw new Error(`no digests of ${d.file}`);
    disks.push(await layerEntry(work.file(d.file), d.volId, dg));
  }
  const spec = newDigestSpec(ctx.config.digestAlgorithm);
  const m: Manifest = {
    format: MANIFEST_FORMAT,
    version: manifestVersionFor(spec),
    tool: { name: 'nasbackup', version: toolVersion() },
    vm: a.vm,
    path: a.path,
    createdAt,
    mode: a.mode,
    kind: facts.kind,
    checkpoint: facts.checkpoint,
    incrementalFrom: facts.incrementalFrom,
    parent: facts.parent,
    digest: digestSection(spec),
    disks,
  };
  await writeManifestFile(work.path, m);
  // The second figure is what the manifest added to the backup: the wait for digests that ran alongside.
  const done = Date.now();
  ctx.logger.log(
    `Manifest of ${a.path}: ${disks.length} disk(s) digested in ${done - (run?.started ?? waited)} ms (${done - waited} ms on the backup's path)`,
  );
  return m;
}
