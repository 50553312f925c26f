// The chain walk (lib/store/safety.ts inspectChain) scans each layer's metadata while it follows
// the backing reference to the next one. Whatever runs ahead, it must report what a walk that
// awaited every scan in turn reports: the first problem in walk order, the layers up to it, and
// the warnings of those layers only, in order. Real images (qemu-img), damage by byte patches.
import { execFileSync } from 'node:child_process';
import { mkdirSync, readdirSync, readlinkSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { inspectChain } from '../../lib/store/safety.js';
import { removeTempDirs, tempDir } from '../helpers/tmp.js';
import { readU64, writeU64 } from '../security/fixtures.js';

afterAll(removeTempDirs);

/** A chain of `depth` layers in one VM folder, each holding 64 KiB of data; top first. */
function chain(tag: string, depth: number): { dir: string; layers: string[] } {
  const dir = join(tempDir(tag), 'i-1-2-VM');
  const layers: string[] = [];
  for (let i = 0; i < depth; i++) {
    const ts = `2026.01.01.00.00.${String(i).padStart(2, '0')}`;
    mkdirSync(join(dir, ts), { recursive: true });
    const f = join(dir, ts, 'root.vol.qcow2');
    const backing = i === 0 ? [] : ['-b', `../${layers[0]!.split('/').at(-2)}/root.vol.qcow2`, '-F', 'qcow2'];
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', ...backing, f, '16M']);
    execFileSync('qemu-io', ['-f', 'qcow2', '-c', `write -P ${i + 1} ${i * 65536} 64k`, f], { stdio: 'ignore' });
    layers.unshift(f);
  }
  return { dir, layers };
}

/** The L2 table of the first L1 entry points past the end of the file: the scan finds it, the header does not. */
function l2PastEnd(file: string): void {
  const l1 = Number(readU64(file, 40));
  writeU64(file, l1, (1n << 63n) | (1n << 40n));
}

/** Files inside `dir` this process holds open now. */
function openInside(dir: string): string[] {
  const out: string[] = [];
  for (const fd of readdirSync('/proc/self/fd')) {
    try {
      const target = readlinkSync(`/proc/self/fd/${fd}`);
      if (target.startsWith(`${dir}/`)) out.push(target);
    } catch {
      // closed meanwhile
    }
  }
  return out;
}

/** Set the dirty bit (incompatible feature bit 0): a warning, not a refusal. */
function dirty(file: string): void {
  writeU64(file, 72, readU64(file, 72) | 1n);
}

describe('chain walk with scans running ahead', () => {
  it('a clean chain deeper than the scans in flight: every layer, no problem, no warning', async () => {
    const { dir, layers } = chain('walk-clean', 9);
    const r = await inspectChain(layers[0]!, dir);
    expect(r.problem).toBeNull();
    expect(r.layers).toEqual(layers);
    expect(r.warnings).toEqual([]);
  });

  it('damage scanned in a middle layer comes before a missing layer further down, and the walk ends at it', async () => {
    const { dir, layers } = chain('walk-order', 8);
    l2PastEnd(layers[2]!);
    rmSync(layers[6]!);
    const r = await inspectChain(layers[0]!, dir);
    expect(r.problem).toMatchObject({ kind: 'corrupt', layer: layers[2], reference: false });
    expect(r.problem!.message).toContain(layers[2]!);
    expect(r.layers).toEqual(layers.slice(0, 3));
  });

  it('of two damaged layers the upper one is reported, with only the warnings above and at it', async () => {
    const { dir, layers } = chain('walk-two', 8);
    dirty(layers[0]!);
    dirty(layers[3]!);
    l2PastEnd(layers[3]!);
    dirty(layers[4]!);
    l2PastEnd(layers[5]!);
    const r = await inspectChain(layers[0]!, dir);
    expect(r.problem).toMatchObject({ kind: 'corrupt', layer: layers[3] });
    expect(r.layers).toEqual(layers.slice(0, 4));
    expect(r.warnings.map((w) => [w.code, w.message.split(' ')[0]])).toEqual([
      ['IMAGE_DIRTY', layers[0]],
      ['IMAGE_DIRTY', layers[3]],
    ]);
  });

  it('a scan problem in the layer holding a bad backing reference is reported before the reference', async () => {
    const { dir, layers } = chain('walk-ref', 3);
    // The top's backing name made absolute (the same length: the header keeps its layout).
    const top = layers[0]!;
    const len = Number(readU64(top, 16) >> 32n);
    const at = Number(readU64(top, 8));
    const abs = '/' + 'x'.repeat(len - 1);
    execFileSync('python3', ['-c', `f=open(${JSON.stringify(top)},'r+b');f.seek(${at});f.write(${JSON.stringify(abs)}.encode())`]);
    const refOnly = await inspectChain(top, dir);
    expect(refOnly.problem).toMatchObject({ kind: 'unsafe', layer: top, reference: true });
    l2PastEnd(top);
    const r = await inspectChain(top, dir);
    expect(r.problem).toMatchObject({ kind: 'corrupt', layer: top, reference: false });
    expect(r.layers).toEqual([top]);
  });

  it('a deep chain whose damage is below the scans first in flight: found, and nothing below it is listed', async () => {
    const { dir, layers } = chain('walk-deep', 12);
    l2PastEnd(layers[9]!);
    const r = await inspectChain(layers[0]!, dir);
    expect(r.problem).toMatchObject({ kind: 'corrupt', layer: layers[9] });
    expect(r.layers).toEqual(layers.slice(0, 10));
  });

  it('nothing it started ahead still reads the folder once it returns (the NAS may be unmounted next)', async () => {
    const { dir, layers } = chain('walk-settle', 12);
    // Stopped at the top by its scan, with the next layers' headers guessed and their scans started.
    l2PastEnd(layers[0]!);
    const atTop = await inspectChain(layers[0]!, dir);
    expect(atTop.problem).toMatchObject({ kind: 'corrupt', layer: layers[0] });
    expect(openInside(dir)).toEqual([]);
    // Stopped further down, by a missing layer, while scans above it ran.
    rmSync(layers[7]!);
    const r = await inspectChain(layers[1]!, dir);
    expect(r.problem).toMatchObject({ kind: 'broken', layer: layers[6], reference: true });
    expect(r.layers).toEqual(layers.slice(1, 7));
    expect(openInside(dir)).toEqual([]);
  });
});
