// The manifest's extent digests: which algorithms exist and one streaming interface over them.
// XXH64 is the default: per-extent checksums here detect damage (bit rot, a truncated or
// overwritten file), which a 64-bit hash does with a miss chance of 2^-64 per bad extent, at
// ~6 GB/s per core against SHA-256's ~1.7 GB/s (SHA-NI). It is no defence against someone who
// can write the NAS, but neither is SHA-256 here: such a person can rewrite the manifest too.
// SHA-256 stays for manifests written before XXH64 existed, and for operators who keep the
// manifests elsewhere as evidence (NASBACKUP_DIGEST=sha256).
import { createHash } from 'node:crypto';
import { Xxh64, Xxh64Memory } from './xxh64.js';

export { Xxh64, Xxh64Memory };

export type DigestAlgorithm = 'xxh64' | 'sha256';
export const DIGEST_ALGORITHMS: readonly DigestAlgorithm[] = ['xxh64', 'sha256'];
export const DEFAULT_DIGEST_ALGORITHM: DigestAlgorithm = 'xxh64';
/** Hex digits of a digest. */
export const DIGEST_HEX_LENGTH: Readonly<Record<DigestAlgorithm, number>> = { xxh64: 16, sha256: 64 };

/** Bytes of a digest in binary: a part digest as the manifest stores it. */
export const PART_DIGEST_BYTES: Readonly<Record<DigestAlgorithm, number>> = { xxh64: 8, sha256: 32 };

/**
 * An extent's digest in a manifest with parts: the algorithm over its parts' digests, in
 * binary, concatenated in guest order (`parts`). Each byte of the extent is still hashed
 * once; the extent's digest binds the parts, so a part digest cannot be changed alone.
 */
export function combineParts(algorithm: DigestAlgorithm, parts: Uint8Array): string {
  const h = createDigest(algorithm);
  h.update(parts);
  return h.digest();
}

export interface StreamDigest {
  update(b: Uint8Array): unknown;
  /** `n` copies of `byte` (the canonical stream's status runs). */
  repeat(byte: number, n: number): unknown;
  /** Lower-case hex; the digest is finished. */
  digest(): string;
}

/** A digest; an XXH64 one reads `memory` in place (input elsewhere is copied into a staging area). */
export function createDigest(algorithm: DigestAlgorithm, memory?: Xxh64Memory): StreamDigest {
  if (algorithm === 'xxh64') return new Xxh64(memory);
  const h = createHash('sha256');
  return { update: (b) => h.update(b), repeat: (byte, n) => repeatInto(h, byte, n), digest: () => h.digest('hex') };
}

const FILL_BYTES = 1 << 16;
const fills = new Map<number, Buffer>();
function repeatInto(h: { update(b: Uint8Array): unknown }, byte: number, n: number): void {
  // Long runs (a 2 TiB unallocated disk) in bounded pieces.
  let f = fills.get(byte);
  if (!f) fills.set(byte, (f = Buffer.alloc(FILL_BYTES, byte)));
  for (let left = n; left > 0; left -= FILL_BYTES) h.update(left >= FILL_BYTES ? f : f.subarray(0, left));
}

export function isDigestAlgorithm(v: unknown): v is DigestAlgorithm {
  return (DIGEST_ALGORITHMS as readonly unknown[]).includes(v);
}
