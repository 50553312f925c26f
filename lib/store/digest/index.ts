// The manifest's extent digests: which algorithms exist and one streaming interface over them.
// XXH64 is the default: per-extent checksums here detect damage (bit rot, a truncated or
// overwritten file), which a 64-bit hash does with a miss chance of 2^-64 per bad extent, at
// ~6 GB/s per core against SHA-256's ~1.7 GB/s (SHA-NI). It is no defence against someone who
// can write the NAS, but neither is SHA-256 here: such a person can rewrite the manifest too.
// SHA-256 stays for manifests written before XXH64 existed, and for operators who keep the
// manifests elsewhere as evidence (NASBACKUP_DIGEST=sha256).
import { createHash } from 'node:crypto';
import { Xxh64 } from './xxh64.js';

export type DigestAlgorithm = 'xxh64' | 'sha256';
export const DIGEST_ALGORITHMS: readonly DigestAlgorithm[] = ['xxh64', 'sha256'];
export const DEFAULT_DIGEST_ALGORITHM: DigestAlgorithm = 'xxh64';
/** Hex digits of a digest. */
export const DIGEST_HEX_LENGTH: Readonly<Record<DigestAlgorithm, number>> = { xxh64: 16, sha256: 64 };

export interface StreamDigest {
  update(b: Uint8Array): unknown;
  /** Lower-case hex; the digest is finished. */
  digest(): string;
}

export function createDigest(algorithm: DigestAlgorithm): StreamDigest {
  if (algorithm === 'xxh64') return new Xxh64();
  const h = createHash('sha256');
  return { update: (b) => h.update(b), digest: () => h.digest('hex') };
}

export function isDigestAlgorithm(v: unknown): v is DigestAlgorithm {
  return (DIGEST_ALGORITHMS as readonly unknown[]).includes(v);
}
