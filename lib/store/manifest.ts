// The manifest of one backup (`manifest.json` in its folder): what the backup is (VM,
// time, mode, checkpoint, parent) and, per disk file, its identity and content digests
// per fixed guest extent, so `chain verify` can prove content and name the bad layer and
// extent. Pure: encode, decode and validate; the digests are computed in layer-digest.ts.
import { combineParts, DIGEST_HEX_LENGTH, isDigestAlgorithm, PART_DIGEST_BYTES, type DigestAlgorithm } from './digest/index.js';

/** The file's name inside a backup folder. */
export const MANIFEST_NAME = 'manifest.json';
/** The `format` field: what this JSON is. */
export const MANIFEST_FORMAT = 'nasbackup-manifest';
/**
 * The newest schema version this reader knows; it refuses a newer one rather than misreading
 * it. Version 2 added the XXH64 digest; version 3 the parts (an extent's digest is then made
 * over its parts' digests, so a restore proves only the parts it restores). A SHA-256
 * manifest is still written as version 1, which every release reads.
 */
export const MANIFEST_VERSION = 3;
export type ManifestVersion = 1 | 2 | 3;
/** Name of the canonical stream definition (status byte per unit + a data unit's bytes). */
export const DIGEST_STREAM = 'nasbackup-layer-v1';
export const DEFAULT_EXTENT_BYTES = 64 * 1024 * 1024;
/** Parts of new XXH64 manifests: ~13 bytes of JSON per MiB of each extent the layer holds anything in (803 bytes an extent). */
export const DEFAULT_PART_BYTES = 1024 * 1024;

/**
 * A layer's part: the manifest's part size, or the layer's unit when that is larger (a part is
 * whole units). Both are powers of two, so it divides the extent.
 */
export const layerPartBytes = (partBytes: number, unitBytes: number): number => Math.max(partBytes, unitBytes);

/** The digests a new backup's manifest records, for its algorithm. */
export function newDigestSpec(algorithm: DigestAlgorithm): DigestSpec {
  return {
    algorithm,
    extentBytes: DEFAULT_EXTENT_BYTES,
    // SHA-256 parts would make a manifest 4 times larger; its manifests stay version 1.
    ...(algorithm === 'xxh64' ? { partBytes: DEFAULT_PART_BYTES } : {}),
  };
}

/** Where a layer's parts lie (for messages): its part and extent sizes, a part digest's bytes. */
export interface PartLayout {
  extentBytes: number;
  partBytes: number;
  digestBytes: number;
  virtualSize: number;
}
export const partLayout = (spec: DigestSpec, d: Pick<ManifestDisk, 'unitBytes' | 'virtualSize'>): PartLayout | undefined =>
  spec.partBytes === undefined
    ? undefined
    : {
        extentBytes: spec.extentBytes,
        partBytes: layerPartBytes(spec.partBytes, d.unitBytes),
        digestBytes: PART_DIGEST_BYTES[spec.algorithm],
        virtualSize: d.virtualSize,
      };

/** A manifest's `digest` section for these digests. */
export const digestSection = (spec: DigestSpec): Manifest['digest'] => ({
  algorithm: spec.algorithm,
  stream: DIGEST_STREAM,
  extentBytes: spec.extentBytes,
  ...(spec.partBytes !== undefined ? { partBytes: spec.partBytes } : {}),
});

/** The oldest version that can carry a manifest with these digests. */
export const manifestVersionFor = (spec: DigestSpec): ManifestVersion =>
  spec.partBytes !== undefined ? 3 : spec.algorithm === 'sha256' ? 1 : 2;

export interface ExtentDigest {
  /** Extent number: guest bytes [index * extentBytes, (index + 1) * extentBytes). */
  index: number;
  /**
   * Lower-case hex, of the manifest's digest algorithm over the canonical stream (layer-digest.ts);
   * with parts, over the parts' digests instead (digest/index.ts, combineParts).
   */
  digest: string;
  /** Version 3: the digests of the extent's parts (of its canonical stream, part by part), concatenated, in base64. */
  parts?: string;
}

export interface ManifestDisk {
  /** File name inside the backup folder (`root.<vol>.qcow2`, `datadisk.<vol>.qcow2`). */
  file: string;
  volumeId: string;
  format: 'qcow2';
  virtualSize: number;
  /** The backing reference as stored in the header (relative), or null for a full. */
  backing: string | null;
  backingFormat: string | null;
  /** st_size of the file. */
  fileBytes: number;
  /** Guest bytes this layer holds as data, and as zero clusters. */
  dataBytes: number;
  zeroBytes: number;
  /** Unit of the canonical stream: the layer's (sub)cluster size. */
  unitBytes: number;
  /** Only extents where the layer holds something; an extent not listed must be wholly unallocated in it. */
  extents: ExtentDigest[];
}

/** How a manifest's digests are computed: what a reader needs to recompute them. */
export type DigestSpec = Pick<Manifest['digest'], 'algorithm' | 'extentBytes' | 'partBytes'>;

export interface Manifest {
  format: typeof MANIFEST_FORMAT;
  version: ManifestVersion;
  tool: { name: 'nasbackup'; version: string };
  vm: string;
  /** Mount-relative `<instance>/<timestamp>`. */
  path: string;
  /** ISO 8601, UTC, when the backup's data was complete. */
  createdAt: string;
  /** The mode the agent asked for, and what was taken (a fallback makes a full). */
  mode: 'legacy' | 'full' | 'incremental';
  kind: 'full' | 'incremental';
  /** Running VM: the checkpoint created with the backup; stopped VM: the bitmap asked for (seeded on the sources after the commit). */
  checkpoint: string | null;
  /** The checkpoint an incremental was taken against. */
  incrementalFrom: string | null;
  /** Mount-relative folder of the parent backup (incremental), or null. */
  parent: string | null;
  /** `partBytes` (version 3): each listed extent also records its parts' digests. */
  digest: { algorithm: DigestAlgorithm; stream: typeof DIGEST_STREAM; extentBytes: number; partBytes?: number };
  disks: ManifestDisk[];
}

export function encodeManifest(m: Manifest): string {
  return JSON.stringify(m, null, 2) + '\n';
}

export class ManifestError extends Error {}

type Obj = Record<string, unknown>;
const isPowerOfTwo = (n: number): boolean => n > 0 && 2 ** Math.round(Math.log2(n)) === n;
const isObj = (v: unknown): v is Obj => typeof v === 'object' && v !== null && !Array.isArray(v);

function str(o: Obj, k: string, where: string): string {
  const v = o[k];
  if (typeof v !== 'string') throw new ManifestError(`${where}${k} is not a string`);
  return v;
}
function strOrNull(o: Obj, k: string, where: string): string | null {
  return o[k] === null ? null : str(o, k, where);
}
function count(o: Obj, k: string, where: string): number {
  const v = o[k];
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0) throw new ManifestError(`${where}${k} is not a non-negative integer`);
  return v;
}
function oneOf<T extends string>(o: Obj, k: string, allowed: readonly T[], where: string): T {
  const v = str(o, k, where);
  if (!(allowed as readonly string[]).includes(v))
    throw new ManifestError(`${where}${k} is ${JSON.stringify(v)}, not one of ${allowed.join(', ')}`);
  return v as T;
}

/** Parse and validate; throws ManifestError with what is wrong. */
export function decodeManifest(text: string): Manifest {
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (e) {
    throw new ManifestError(`not JSON: ${(e as Error).message}`);
  }
  if (!isObj(raw)) throw new ManifestError('not a JSON object');
  if (raw.format !== MANIFEST_FORMAT) throw new ManifestError(`format is ${JSON.stringify(raw.format)}, not ${MANIFEST_FORMAT}`);
  const version = raw.version;
  if (version !== 1 && version !== 2 && version !== 3)
    throw new ManifestError(`version ${JSON.stringify(version)} is not supported (this reader knows 1 to ${MANIFEST_VERSION})`);
  const tool = raw.tool;
  if (!isObj(tool) || tool.name !== 'nasbackup' || typeof tool.version !== 'string')
    throw new ManifestError('tool is not {name: nasbackup, version}');
  const d = raw.digest;
  if (!isObj(d) || d.stream !== DIGEST_STREAM) throw new ManifestError(`digest is not over ${DIGEST_STREAM}`);
  const algorithm = d.algorithm;
  if (!isDigestAlgorithm(algorithm) || (version === 1 && algorithm !== 'sha256'))
    throw new ManifestError(`digest.algorithm ${JSON.stringify(algorithm)} is not known to manifest version ${version}`);
  const hexLength = DIGEST_HEX_LENGTH[algorithm];
  const hex = new RegExp(`^[0-9a-f]{${hexLength}}$`);
  const extentBytes = count(d, 'extentBytes', 'digest.');
  if (extentBytes === 0 || extentBytes % 512 !== 0) throw new ManifestError('digest.extentBytes is not a positive multiple of 512');
  let partBytes: number | undefined;
  if (version === 3) {
    partBytes = count(d, 'partBytes', 'digest.');
    if (!isPowerOfTwo(partBytes) || partBytes < 512 || extentBytes % partBytes !== 0)
      throw new ManifestError('digest.partBytes is not a power of two from 512 that divides digest.extentBytes');
  } else if (d.partBytes !== undefined) throw new ManifestError(`digest.partBytes is not known to manifest version ${version}`);
  if (!Array.isArray(raw.disks)) throw new ManifestError('disks is not an array');
  const files = new Set<string>();
  const disks = raw.disks.map((x: unknown, i): ManifestDisk => {
    const w = `disks[${i}].`;
    if (!isObj(x)) throw new ManifestError(`disks[${i}] is not an object`);
    const file = str(x, 'file', w);
    if (file.includes('/') || file === '' || file === '.' || file === '..') throw new ManifestError(`${w}file is not a plain file name`);
    if (files.has(file)) throw new ManifestError(`${w}file ${file} is listed twice`);
    files.add(file);
    if (!Array.isArray(x.extents)) throw new ManifestError(`${w}extents is not an array`);
    const virtualSize = count(x, 'virtualSize', w);
    const unitBytes = count(x, 'unitBytes', w);
    const part = partBytes === undefined ? 0 : layerPartBytes(partBytes, unitBytes);
    if (part > 0 && (!isPowerOfTwo(unitBytes) || extentBytes % part !== 0))
      throw new ManifestError(`${w}unitBytes is not a power of two whose multiple divides digest.extentBytes`);
    const extentCount = Math.ceil(virtualSize / extentBytes);
    let last = -1;
    const extents = x.extents.map((e: unknown, j): ExtentDigest => {
      const we = `${w}extents[${j}].`;
      if (!isObj(e)) throw new ManifestError(`${we.slice(0, -1)} is not an object`);
      const index = count(e, 'index', we);
      if (index <= last || index >= extentCount) throw new ManifestError(`${we}index ${index} is out of order or past the disk's end`);
      last = index;
      const digest = str(e, 'digest', we);
      if (!hex.test(digest)) throw new ManifestError(`${we}digest is not ${hexLength} hex digits`);
      if (part === 0) {
        if (e.parts !== undefined) throw new ManifestError(`${we}parts is not known to manifest version ${version}`);
        return { index, digest };
      }
      // The parts are bound to the extent's digest: one edited alone is refused here.
      const parts = str(e, 'parts', we);
      const bytes = Buffer.from(parts, 'base64');
      const want =
        Math.ceil((Math.min(virtualSize, (index + 1) * extentBytes) - index * extentBytes) / part) * PART_DIGEST_BYTES[algorithm];
      if (bytes.length !== want || bytes.toString('base64') !== parts) throw new ManifestError(`${we}parts is not ${want} bytes in base64`);
      if (combineParts(algorithm, bytes) !== digest) throw new ManifestError(`${we}digest is not the digest of its parts`);
      return { index, digest, parts };
    });
    return {
      file,
      volumeId: str(x, 'volumeId', w),
      format: oneOf(x, 'format', ['qcow2'] as const, w),
      virtualSize,
      backing: strOrNull(x, 'backing', w),
      backingFormat: strOrNull(x, 'backingFormat', w),
      fileBytes: count(x, 'fileBytes', w),
      dataBytes: count(x, 'dataBytes', w),
      zeroBytes: count(x, 'zeroBytes', w),
      unitBytes,
      extents,
    };
  });
  return {
    format: MANIFEST_FORMAT,
    version,
    tool: { name: 'nasbackup', version: tool.version },
    vm: str(raw, 'vm', ''),
    path: str(raw, 'path', ''),
    createdAt: str(raw, 'createdAt', ''),
    mode: oneOf(raw, 'mode', ['legacy', 'full', 'incremental'] as const, ''),
    kind: oneOf(raw, 'kind', ['full', 'incremental'] as const, ''),
    checkpoint: strOrNull(raw, 'checkpoint', ''),
    incrementalFrom: strOrNull(raw, 'incrementalFrom', ''),
    parent: strOrNull(raw, 'parent', ''),
    digest: { algorithm, stream: DIGEST_STREAM, extentBytes, ...(partBytes === undefined ? {} : { partBytes }) },
    disks,
  };
}
