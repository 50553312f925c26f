// The manifest a backup of a bench chain would have written: one per layer, layer 0 the
// full, each later one an incremental on the one before. The caller describes the disk
// (describeLayer of whichever build it measures) and writes the file.
import {
  digestSection,
  MANIFEST_FORMAT,
  manifestVersionFor,
  type DigestSpec,
  type Manifest,
  type ManifestDisk,
} from '../../lib/store/manifest.js';

export interface ChainManifestOptions {
  vm: string;
  /** This backup's timestamp folder, and its parent's (null for the full). */
  ts: string;
  parentTs: string | null;
  /** Position in the chain: the creation time is one second per layer. */
  index: number;
  /** The digests the disk entry was computed with (what describeLayer was given). */
  spec: DigestSpec;
  /** The disk entry (describeLayer's result). */
  disk: ManifestDisk;
}

export function chainManifest(o: ChainManifestOptions): Manifest {
  const kind = o.parentTs === null ? 'full' : 'incremental';
  return {
    format: MANIFEST_FORMAT,
    version: manifestVersionFor(o.spec),
    tool: { name: 'nasbackup', version: 'bench' },
    vm: o.vm,
    path: `${o.vm}/${o.ts}`,
    createdAt: new Date(Date.UTC(2025, 0, 1, 0, 0, o.index)).toISOString(),
    mode: kind,
    kind,
    checkpoint: null,
    incrementalFrom: null,
    parent: o.parentTs === null ? null : `${o.vm}/${o.parentTs}`,
    digest: digestSection(o.spec),
    disks: [o.disk],
  };
}
