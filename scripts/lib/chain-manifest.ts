// The manifest a backup of a bench chain would have written: one per layer, layer 0 the
// full, each later one an incremental on the one before. The caller describes the disk
// (describeLayer of whichever build it measures) and writes the file.
import { DEFAULT_DIGEST_ALGORITHM, type DigestAlgorithm } from '../../lib/store/digest/index.js';
import { DIGEST_STREAM, MANIFEST_FORMAT, manifestVersionFor, type Manifest, type ManifestDisk } from '../../lib/store/manifest.js';

export interface ChainManifestOptions {
  vm: string;
  /** This backup's timestamp folder, and its parent's (null for the full). */
  ts: string;
  parentTs: string | null;
  /** Position in the chain: the creation time is one second per layer. */
  index: number;
  extentBytes: number;
  /** The algorithm the disk entry's digests were computed with (describeLayer's default unless said). */
  algorithm?: DigestAlgorithm;
  /** The disk entry (describeLayer's result). */
  disk: ManifestDisk;
}

export function chainManifest(o: ChainManifestOptions): Manifest {
  const kind = o.parentTs === null ? 'full' : 'incremental';
  const algorithm = o.algorithm ?? DEFAULT_DIGEST_ALGORITHM;
  return {
    format: MANIFEST_FORMAT,
    version: manifestVersionFor(algorithm),
    tool: { name: 'nasbackup', version: 'bench' },
    vm: o.vm,
    path: `${o.vm}/${o.ts}`,
    createdAt: new Date(Date.UTC(2025, 0, 1, 0, 0, o.index)).toISOString(),
    mode: kind,
    kind,
    checkpoint: null,
    incrementalFrom: null,
    parent: o.parentTs === null ? null : `${o.vm}/${o.parentTs}`,
    digest: { algorithm, stream: DIGEST_STREAM, extentBytes: o.extentBytes },
    disks: [o.disk],
  };
}
