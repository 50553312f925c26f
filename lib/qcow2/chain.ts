// Backing chain discovery from qcow2 headers alone (no qemu-img, no locks needed).
// Backing names are resolved relative to the directory of the image that stores them.
import { stat } from 'node:fs/promises';
import { dirname, isAbsolute, resolve } from 'node:path';
import { Qcow2Error } from './errors.js';
import { readHeader, type Qcow2Header } from './header.js';

export interface ChainLayer {
  /** Absolute path of this layer. */
  path: string;
  header: Qcow2Header;
}

export interface Chain {
  layers: ChainLayer[];
}

export const MAX_CHAIN_DEPTH = 1024;

/** Protocols and json: pseudo-names are never followed from untrusted NAS content. */
export function isFollowableBackingName(name: string): boolean {
  if (name.startsWith('json:')) return false;
  return !/^[a-z][a-z0-9+.-]*:/i.test(name);
}

export function resolveBackingName(imagePath: string, name: string): string {
  return isAbsolute(name) ? name : resolve(dirname(imagePath), name);
}

/**
 * Read the chain starting at `top`. Throws QCOW2_CHAIN_MISSING when a backing file
 * does not exist (the error's `path` names it), and never loops on a cycle.
 */
export async function readChain(top: string): Promise<Chain> {
  const layers: ChainLayer[] = [];
  const seen = new Set<string>();
  let path = resolve(top);
  for (;;) {
    const st = await stat(path).catch(() => null);
    if (st === null) {
      const referrer = layers.at(-1)?.path;
      throw new Qcow2Error(
        'QCOW2_CHAIN_MISSING',
        referrer ? `backing file ${path} of ${referrer} does not exist` : `${path} does not exist`,
        path,
      );
    }
    const key = `${st.dev}:${st.ino}`;
    if (seen.has(key)) throw new Qcow2Error('QCOW2_CHAIN_CYCLE', `backing chain of ${top} loops at ${path}`, path);
    seen.add(key);
    const header = await readHeader(path);
    layers.push({ path, header });
    if (header.backingFile === null) return { layers };
    if (layers.length >= MAX_CHAIN_DEPTH)
      throw new Qcow2Error('QCOW2_CHAIN_TOO_DEEP', `backing chain of ${top} is deeper than ${MAX_CHAIN_DEPTH}`, path);
    if (!isFollowableBackingName(header.backingFile))
      throw new Qcow2Error('QCOW2_CHAIN_UNFOLLOWABLE', `${path} has a backing reference that is not a file: ${header.backingFile}`, path);
    path = resolveBackingName(path, header.backingFile);
  }
}

/** Index of `candidate` among the backing layers of `chain` (1 = direct backing), or -1. */
export async function indexInChain(chain: Chain, candidate: string): Promise<number> {
  const st = await stat(candidate).catch(() => null);
  if (st === null) return -1;
  for (let i = 1; i < chain.layers.length; i++) {
    const ls = await stat(chain.layers[i]!.path).catch(() => null);
    if (ls && ls.dev === st.dev && ls.ino === st.ino) return i;
  }
  return -1;
}
