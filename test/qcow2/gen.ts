// Random qcow2 chains built with the real qemu-img/qemu-io (the oracle), and helpers to
// compare the native reader with qemu-img's answers.
import { execFileSync, spawnSync } from 'node:child_process';
import { readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import fc from 'fast-check';
import type { CopySource } from '../../lib/qcow2/index.js';
import type { MapEntry } from '../../lib/qcow2/view.js';

export interface LayerSpec {
  clusterBits: number;
  v2: boolean;
  extL2: boolean;
  /** refcount_bits (v3 only; qemu-img's default 16 when absent). */
  refcountBits?: number;
  /** Virtual size in bytes (multiple of 512, not of the cluster size). */
  size: number;
  ops: string[];
}

export interface ChainSpec {
  layers: LayerSpec[]; // bottom first
}

const KiB = 1024;

/** Pick image options, then qemu-io commands inside the size. */
function layerArb(compressOk: boolean): fc.Arbitrary<LayerSpec> {
  return fc
    .record({
      clusterBits: fc.constantFrom(9, 12, 14, 16, 21),
      v2: fc.boolean(),
      extL2: fc.boolean(),
      refcountBits: fc.constantFrom(16, 16, 4, 8, 64), // not 1 or 2: shared compressed hosts would overflow
      sectors: fc.integer({ min: 1, max: 8 * 1024 }), // up to 4 MiB
    })
    .chain(({ clusterBits, v2, extL2, refcountBits, sectors }) => {
      const size = sectors * 512;
      const ext = !v2 && extL2 && clusterBits >= 14;
      const cs = 1 << clusterBits;
      const off = fc.integer({ min: 0, max: sectors - 1 }).map((s) => s * 512);
      const op = fc.oneof(
        fc
          .tuple(off, fc.integer({ min: 1, max: 512 }), fc.integer({ min: 1, max: 255 }))
          .map(([o, n, p]) => `write -P ${p} ${o} ${Math.min(n * 512, size - o)}`),
        fc.tuple(off, fc.integer({ min: 1, max: 256 })).map(([o, n]) => `write -z ${o} ${Math.min(n * 512, size - o)}`),
        fc.tuple(off, fc.integer({ min: 1, max: 256 })).map(([o, n]) => `discard ${o} ${Math.min(n * 512, size - o)}`),
        fc.tuple(fc.nat(), fc.integer({ min: 1, max: 255 })).map(([k, p]) => {
          const clusters = Math.floor(size / cs);
          if (!compressOk || clusters === 0) return `write -P ${p} 0 ${Math.min(512, size)}`;
          return `write -c -P ${p} ${(k % clusters) * cs} ${cs}`;
        }),
      );
      // qemu-io cannot compress into an allocated cluster: compressed writes first, once each.
      const order = (ops: string[]): string[] => {
        const byOffset = new Map<string, string>();
        for (const o of ops.filter((x) => x.startsWith('write -c'))) byOffset.set(o.split(' ').at(-2)!, o);
        return [...byOffset.values(), ...ops.filter((o) => !o.startsWith('write -c'))];
      };
      return fc
        .array(op, { minLength: 0, maxLength: 6 })
        .map((ops) => ({ clusterBits, v2, extL2: ext, ...(v2 || refcountBits === 16 ? {} : { refcountBits }), size, ops: order(ops) }));
    });
}

export function chainArb(opts: { minLayers?: number; maxLayers?: number; compress?: boolean } = {}): fc.Arbitrary<ChainSpec> {
  return fc
    .array(layerArb(opts.compress ?? true), { minLength: opts.minLayers ?? 1, maxLength: opts.maxLayers ?? 3 })
    .map((layers) => ({ layers }));
}

export function layerOptions(l: LayerSpec): string {
  return [
    `cluster_size=${1 << l.clusterBits}`,
    `compat=${l.v2 ? '0.10' : '1.1'}`,
    ...(l.extL2 ? ['extended_l2=on'] : []),
    ...(l.refcountBits ? [`refcount_bits=${l.refcountBits}`] : []),
  ].join(',');
}

/** Build the chain in `dir` as l0.qcow2 (bottom) … l<n-1>.qcow2 (top); returns the paths. */
export function buildChain(dir: string, spec: ChainSpec): string[] {
  const paths: string[] = [];
  spec.layers.forEach((l, i) => {
    const p = join(dir, `l${i}.qcow2`);
    rmSync(p, { force: true });
    const args = ['create', '-q', '-f', 'qcow2', '-o', layerOptions(l)];
    if (i > 0) args.push('-b', `l${i - 1}.qcow2`, '-F', 'qcow2');
    args.push(p, String(l.size));
    execFileSync('qemu-img', args, { cwd: dir, stdio: ['ignore', 'ignore', 'pipe'] });
    if (l.ops.length) {
      const r = spawnSync('qemu-io', ['-f', 'qcow2', ...l.ops.flatMap((c) => ['-c', c]), p], { encoding: 'utf8' });
      if (r.status !== 0 || /error|failed/i.test(r.stdout)) throw new Error(`qemu-io failed: ${r.stdout}${r.stderr}`);
    }
    paths.push(p);
  });
  return paths;
}

export function qemuMap(path: string): MapEntry[] {
  return JSON.parse(
    execFileSync('qemu-img', ['map', '--output=json', '-U', path], { encoding: 'utf8', maxBuffer: 64 << 20 }),
  ) as MapEntry[];
}

export function qemuInfo(path: string): Record<string, unknown> {
  return JSON.parse(execFileSync('qemu-img', ['info', '--output=json', '-U', path], { encoding: 'utf8' })) as Record<string, unknown>;
}

export function rawContent(path: string, scratch: string): Buffer {
  const out = join(scratch, `raw-${process.pid}-${Math.random().toString(36).slice(2)}.raw`);
  execFileSync('qemu-img', ['convert', '-U', '-O', 'raw', path, out]);
  try {
    return readFileSync(out);
  } finally {
    rmSync(out, { force: true });
  }
}

/** `qemu-img check` exit code (0 clean, 2 corrupt, 3 leaks). */
export function checkCode(path: string): { code: number; out: string } {
  const r = spawnSync('qemu-img', ['check', path], { encoding: 'utf8' });
  return { code: r.status ?? -1, out: r.stdout + r.stderr };
}

/** `qemu-img compare` of an image with a raw file (exit 0 identical). */
export function compareWithRaw(path: string, raw: string): { code: number; out: string } {
  const r = spawnSync('qemu-img', ['compare', '-U', '-f', 'qcow2', '-F', 'raw', path, raw], { encoding: 'utf8' });
  return { code: r.status ?? -1, out: r.stdout + r.stderr };
}

/**
 * qemu-img also asks the host file system (SEEK_DATA) whether a data cluster's host range is a
 * hole and then reports zero:true; the native map reports qcow2 metadata only. Normalise that
 * away and re-merge.
 */
export function normaliseMap(entries: MapEntry[]): MapEntry[] {
  const out: MapEntry[] = [];
  for (const raw of entries) {
    const e: MapEntry = {
      start: raw.start,
      length: raw.length,
      depth: raw.depth,
      present: raw.present,
      zero: raw.data ? false : raw.zero,
      data: raw.data,
    };
    if (raw.offset !== undefined) e.offset = raw.offset;
    const last = out.at(-1);
    if (
      last &&
      last.depth === e.depth &&
      last.present === e.present &&
      last.zero === e.zero &&
      last.data === e.data &&
      (last.offset === undefined) === (e.offset === undefined) &&
      (last.offset === undefined || last.offset + last.length === e.offset)
    )
      last.length += e.length;
    else out.push(e);
  }
  return out;
}

export const numRuns = (dflt: number): number => Number(process.env.NASBACKUP_QCOW2_RUNS ?? dflt);
export { KiB };

/** An in-memory guest disk as a copy source (status from a map of written clusters). */
export function memorySource(content: Buffer, granule: number): CopySource {
  const isData = (o: number): boolean => content.subarray(o, Math.min(o + granule, content.length)).some((b) => b !== 0);
  return {
    virtualSize: content.length,
    async status(offset, maxLen) {
      const kind = isData(offset) ? 'data' : 'zero';
      let len = Math.min(granule - (offset % granule), maxLen);
      while (offset + len < content.length && len < maxLen && (isData(offset + len) ? 'data' : 'zero') === kind)
        len = Math.min(len + granule, maxLen);
      return { length: Math.min(len, content.length - offset), kind };
    },
    async readInto(buf, at, offset, length) {
      content.copy(buf, at, offset, offset + length);
      buf.fill(0, at + Math.max(0, content.length - offset), at + length);
    },
  };
}
