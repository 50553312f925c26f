// manifest.json on disk: read it without following links or blocking on a FIFO, write it
// atomically (temp file, fsync, rename), and bring one disk's entry up to date after a
// legitimate change of that layer (a safe rebase copies clusters into it).
import { lstat, open, readFile, rename, stat, unlink, writeFile } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { INCOMPAT_EXTL2, readHeader } from '../qcow2/index.js';
import { digestLayer, type LayerDigest } from './layer-digest.js';
import { decodeManifest, encodeManifest, MANIFEST_NAME, type DigestSpec, type Manifest, type ManifestDisk } from './manifest.js';

// A version-3 manifest takes ~13 bytes of JSON per MiB of the extents its disks hold anything in:
// 256 MiB is a VM with ~19 TiB of such extents; anything larger is not a manifest we wrote.
const MANIFEST_MAX_BYTES = 256 << 20;

/** The manifest in backup folder `dir`: absent (null), or what is wrong with it. */
export async function readManifestFile(dir: string): Promise<Manifest | null | { error: string }> {
  const abs = join(dir, MANIFEST_NAME);
  const st = await lstat(abs).catch(() => null);
  if (!st) return null;
  // Never follow a link or read a FIFO; a manifest is a small regular file.
  if (!st.isFile()) return { error: `${MANIFEST_NAME} is not a regular file` };
  if (st.size > MANIFEST_MAX_BYTES) return { error: `${MANIFEST_NAME} is ${st.size} bytes, more than a manifest can be` };
  try {
    return decodeManifest(await readFile(abs, 'utf8'));
  } catch (e) {
    return { error: `${MANIFEST_NAME} is unusable: ${(e as Error).message}` };
  }
}

/** Temp file, fsync, rename: a reader sees the old manifest or the new one, never half of one. */
export async function writeManifestFile(dir: string, m: Manifest): Promise<void> {
  const final = join(dir, MANIFEST_NAME);
  const tmp = `${final}.tmp`;
  try {
    await writeFile(tmp, encodeManifest(m), { mode: 0o644 });
    const fh = await open(tmp, 'r');
    try {
      await fh.sync();
    } finally {
      await fh.close();
    }
    await rename(tmp, final);
  } catch (e) {
    await unlink(tmp).catch(() => {});
    throw e;
  }
}

/** One layer's manifest entry, read from the file as it is now, with the digests `spec` says. */
export async function describeLayer(abs: string, volumeId: string, spec: DigestSpec): Promise<ManifestDisk> {
  return layerEntry(abs, volumeId, await digestLayer(abs, spec));
}

/** One layer's manifest entry from digests already computed (a LayerDigester fed while the file was written). */
export async function layerEntry(abs: string, volumeId: string, dg: LayerDigest): Promise<ManifestDisk> {
  const h = await readHeader(abs);
  if (h.size !== BigInt(dg.virtualSize))
    throw new Error(`${abs}: virtual size ${h.size}, but its digests were computed for ${dg.virtualSize} bytes`);
  const unit = h.clusterSize / ((h.incompatibleFeatures & INCOMPAT_EXTL2) !== 0n ? 32 : 1);
  if (unit !== dg.unitBytes)
    throw new Error(`${abs}: (sub)cluster size ${unit}, but its digests were computed for units of ${dg.unitBytes}`);
  return {
    file: basename(abs),
    volumeId,
    format: 'qcow2',
    virtualSize: dg.virtualSize,
    backing: h.backingFile,
    backingFormat: h.backingFormat,
    fileBytes: Number((await stat(abs, { bigint: true })).size),
    dataBytes: dg.dataBytes,
    zeroBytes: dg.zeroBytes,
    unitBytes: dg.unitBytes,
    extents: dg.extents,
  };
}

/**
 * After `abs` was changed on purpose (rebased): its entry in its folder's manifest is
 * recomputed. Returns what happened, for the log: no manifest, not listed, unusable
 * manifest (left alone: verify reports it), or updated.
 */
export async function refreshManifestEntry(abs: string): Promise<'no manifest' | 'not listed' | 'unusable' | 'updated'> {
  const dir = dirname(abs);
  const m = await readManifestFile(dir);
  if (m === null) return 'no manifest';
  if ('error' in m) return 'unusable';
  const i = m.disks.findIndex((d) => d.file === basename(abs));
  if (i < 0) return 'not listed';
  m.disks[i] = await describeLayer(abs, m.disks[i]!.volumeId, m.digest);
  await writeManifestFile(dir, m);
  return 'updated';
}
