// An independent recomputation of a layer's extent digests (the canonical stream of
// lib/store/layer-digest.ts) from qemu-img alone: `qemu-img map` of the layer opened
// without its backing says which ranges it holds as data or zero, and `qemu-img
// convert` of the same layer gives the bytes. No line of lib/qcow2 is involved.
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';

interface MapRow {
  start: number;
  length: number;
  present?: boolean;
  zero: boolean;
  data: boolean;
}

const layerOnly = (path: string): string =>
  `json:${JSON.stringify({ driver: 'qcow2', file: { driver: 'file', filename: path }, backing: null })}`;

export function recomputeDigests(
  path: string,
  scratch: string,
  extentBytes = 64 * 1024 * 1024,
): { unitBytes: number; dataBytes: number; zeroBytes: number; extents: Array<{ index: number; digest: string }> } {
  const info = JSON.parse(execFileSync('qemu-img', ['info', '-U', '--output=json', path], { encoding: 'utf8' })) as {
    'cluster-size': number;
    'virtual-size': number;
  };
  const unit = info['cluster-size'];
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
  const extents: Array<{ index: number; digest: string }> = [];
  for (let index = 0; index * extentBytes < size; index++) {
    const h = createHash('sha256');
    let held = false;
    const end = Math.min((index + 1) * extentBytes, size);
    for (let off = index * extentBytes; off < end; off += unit) {
      const s = status[off / unit]!;
      h.update(Buffer.from([s]));
      if (s === 1) h.update(bytes.subarray(off, Math.min(off + unit, size)));
      if (s !== 0) held = true;
    }
    if (held) extents.push({ index, digest: h.digest('hex') });
  }
  return { unitBytes: unit, dataBytes, zeroBytes, extents };
}
