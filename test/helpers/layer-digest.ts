// An independent recomputation of a layer's extent digests (the canonical stream of
// lib/store/layer-digest.ts) from qemu-img alone: `qemu-img map` of the layer opened
// without its backing says which ranges it holds as data or zero, and `qemu-img
// convert` of the same layer gives the bytes. No line of lib/qcow2 is involved, nor of our
// digests: SHA-256 is Node's, XXH64 the xxhash-wasm package's (a separate implementation).
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import xxhash from 'xxhash-wasm';
import { readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

const oracle = await xxhash();

export type Algorithm = 'xxh64' | 'sha256';

/** A streaming hash with hex output, by an implementation other than ours. */
export function oracleHash(algorithm: Algorithm): { update(b: Uint8Array): void; hex(): string } {
  if (algorithm === 'sha256') {
    const h = createHash('sha256');
    return { update: (b) => void h.update(b), hex: () => h.digest('hex') };
  }
  const h = oracle.create64();
  return { update: (b) => void h.update(b), hex: () => h.digest().toString(16).padStart(16, '0') };
}

interface MapRow {
  start: number;
  length: number;
  present?: boolean;
  zero: boolean;
  data: boolean;
}

const layerOnly = (path: string): string =>
  `json:${JSON.stringify({ driver: 'qcow2', file: { driver: 'file', filename: path }, backing: null })}`;

/**
 * With `partBytes` (manifest version 3), each listed extent's stream is hashed part by part
 * (every part, held or not), and the extent's digest is the hash of the parts' binary digests.
 */
export function recomputeDigests(
  path: string,
  scratch: string,
  extentBytes = 64 * 1024 * 1024,
  algorithm: Algorithm = 'xxh64',
  partBytes?: number,
): { unitBytes: number; dataBytes: number; zeroBytes: number; extents: Array<{ index: number; digest: string; parts?: string }> } {
  const info = JSON.parse(execFileSync('qemu-img', ['info', '-U', '--output=json', path], { encoding: 'utf8' })) as {
    'cluster-size': number;
    'virtual-size': number;
    'format-specific'?: { data?: { 'extended-l2'?: boolean } };
  };
  // A unit is a subcluster: 1/32 of a cluster with extended L2 (qemu-img map reports those).
  const unit = info['cluster-size'] / (info['format-specific']?.data?.['extended-l2'] ? 32 : 1);
  const size = info['virtual-size'];
  const rows = JSON.parse(execFileSync('qemu-img', ['map', '-U', '--output=json', layerOnly(path)], { encoding: 'utf8' })) as MapRow[];
  const raw = join(scratch, `layer-${process.pid}-${Math.random().toString(36).slice(2)}.raw`);
  execFileSync('qemu-img', ['convert', '-U', '-O', 'raw', layerOnly(path), raw]);
  const bytes = readFileSync(raw);
  rmSync(raw, { force: true });
  // Status per unit: 0 unallocated, 1 data, 2 zero.
  const status = new Uint8Array(Math.ceil(size / unit));
  let dataBytes = 0;
  let zeroBytes = 0;
  for (const r of rows) {
    const s = r.present === false ? 0 : r.data ? 1 : r.zero ? 2 : 0;
    if (s === 1) dataBytes += r.length;
    if (s === 2) zeroBytes += r.length;
    for (let u = Math.floor(r.start / unit); u * unit < r.start + r.length; u++) status[u] = s;
  }
  const extents: Array<{ index: number; digest: string; parts?: string }> = [];
  // A part is whole units: the part size, or the unit when that is larger.
  const part = partBytes === undefined ? extentBytes : Math.max(partBytes, unit);
  for (let index = 0; index * extentBytes < size; index++) {
    const parts: string[] = [];
    let held = false;
    const end = Math.min((index + 1) * extentBytes, size);
    for (let from = index * extentBytes; from < end; from += part) {
      const h = oracleHash(algorithm);
      for (let off = from; off < Math.min(from + part, end); off += unit) {
        const s = status[off / unit]!;
        h.update(Buffer.from([s]));
        if (s === 1) h.update(bytes.subarray(off, Math.min(off + unit, size)));
        if (s !== 0) held = true;
      }
      parts.push(h.hex());
    }
    if (!held) continue;
    if (partBytes === undefined) extents.push({ index, digest: parts[0]! });
    else {
      const bin = Buffer.from(parts.join(''), 'hex');
      const h = oracleHash(algorithm);
      h.update(bin);
      extents.push({ index, digest: h.hex(), parts: bin.toString('base64') });
    }
  }
  return { unitBytes: unit, dataBytes, zeroBytes, extents };
}

/**
 * A manifest.json for backup folder `<instanceDir>/<ts>` written from qemu-img's view of its
 * disk files (recomputeDigests), as a backup would have written it: restore and verify tests
 * get chains with manifests without a line of our digest code in their making.
 */
export function writeManifestFromQemu(
  instanceDir: string,
  ts: string,
  scratch: string,
  extentBytes = 64 * 1024 * 1024,
  algorithm: Algorithm = 'xxh64',
  partBytes?: number,
): void {
  const folder = join(instanceDir, ts);
  const vm = instanceDir.split('/').at(-1)!;
  const disks = readdirSync(folder)
    .filter((n) => /^(root|datadisk)\..+\.qcow2$/.test(n))
    .sort()
    .map((file) => {
      const path = join(folder, file);
      const info = JSON.parse(execFileSync('qemu-img', ['info', '-U', '--output=json', path], { encoding: 'utf8' })) as {
        'virtual-size': number;
        'backing-filename'?: string;
        'backing-filename-format'?: string;
      };
      const d = recomputeDigests(path, scratch, extentBytes, algorithm, partBytes);
      return {
        file,
        volumeId: file.split('.').slice(1, -1).join('.'),
        format: 'qcow2',
        virtualSize: info['virtual-size'],
        backing: info['backing-filename'] ?? null,
        backingFormat: info['backing-filename-format'] ?? null,
        fileBytes: statSync(path).size,
        ...d,
      };
    });
  const m = {
    format: 'nasbackup-manifest',
    // Version 2 brought XXH64, version 3 the parts; a SHA-256 manifest without parts is written as version 1, as before them.
    version: partBytes !== undefined ? 3 : algorithm === 'sha256' ? 1 : 2,
    tool: { name: 'nasbackup', version: 'test' },
    vm,
    path: `${vm}/${ts}`,
    createdAt: new Date(0).toISOString(),
    mode: 'incremental',
    kind: disks.some((d) => d.backing !== null) ? 'incremental' : 'full',
    checkpoint: null,
    incrementalFrom: null,
    parent: null,
    digest: { algorithm, stream: 'nasbackup-layer-v1', extentBytes, ...(partBytes !== undefined ? { partBytes } : {}) },
    disks,
  };
  writeFileSync(join(folder, 'manifest.json'), JSON.stringify(m, null, 2) + '\n');
}
