// The last step of every backup path: read each new layer once, digest it per extent and
// write `manifest.json` into the work folder (temp file, fsync, rename) just before the
// commit, so the rename publishes backup and manifest together: a backup folder of ours
// without one is either unfinished or older than manifests.
//
// Sizes the agent reads: the running-VM figure is `du -sb` of the folder (contract §5.1),
// which now counts the manifest as it counts the side files; the stopped-VM lines list
// the disk files only, so they do not change.
import { readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { NasbackupError, toNasbackupError } from '../../errors.js';
import { describeLayer, layerEntry, writeManifestFile } from '../../store/manifest-file.js';
import type { LayerDigest } from '../../store/layer-digest.js';
import {
  DEFAULT_EXTENT_BYTES,
  DIGEST_ALGORITHM,
  DIGEST_STREAM,
  MANIFEST_FORMAT,
  MANIFEST_VERSION,
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

export async function writeManifest(ctx: OpContext, a: BackupArgs, work: WorkDir, facts: ManifestFacts): Promise<Manifest> {
  try {
    return await manifestStep(ctx, a, work, facts);
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

async function manifestStep(ctx: OpContext, a: BackupArgs, work: WorkDir, facts: ManifestFacts): Promise<Manifest> {
  const started = Date.now();
  const createdAt = new Date().toISOString();
  const disks: ManifestDisk[] = [];
  for (const d of facts.disks) {
    ctx.checkpoint();
    disks.push(
      d.digest
        ? await layerEntry(work.file(d.file), d.volId, d.digest)
        : await describeLayer(work.file(d.file), d.volId, DEFAULT_EXTENT_BYTES, () => ctx.checkpoint()),
    );
  }
  const m: Manifest = {
    format: MANIFEST_FORMAT,
    version: MANIFEST_VERSION,
    tool: { name: 'nasbackup', version: toolVersion() },
    vm: a.vm,
    path: a.path,
    createdAt,
    mode: a.mode,
    kind: facts.kind,
    checkpoint: facts.checkpoint,
    incrementalFrom: facts.incrementalFrom,
    parent: facts.parent,
    digest: { algorithm: DIGEST_ALGORITHM, stream: DIGEST_STREAM, extentBytes: DEFAULT_EXTENT_BYTES },
    disks,
  };
  await writeManifestFile(work.path, m);
  ctx.logger.log(`Manifest of ${a.path}: ${disks.length} disk(s) digested in ${Date.now() - started} ms`);
  return m;
}
