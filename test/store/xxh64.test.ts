// XXH64, ours (a WebAssembly module + BigInt finalisation), against the xxhash-wasm
// package (another implementation) and the specification's published values: every length
// around the 4-, 8- and 32-byte boundaries, random lengths up to several MiB, fed in random
// pieces (so the tail carried between updates is exercised), and several hashes open at
// once; data in a hash's own memory (a HashPool's slots) hashed in place, at any alignment,
// interleaved with hashes of other memories; runs of one byte. The module the program loads
// is the assembled xxh64.wat, byte for byte.
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { createDigest } from '../../lib/store/digest/index.js';
import { Xxh64, Xxh64Memory } from '../../lib/store/digest/xxh64.js';
import { XXH64_WASM } from '../../lib/store/digest/xxh64-wasm.js';
import { oracleHash } from '../helpers/layer-digest.js';
import { rng } from '../helpers/random.js';

const theirs = (b: Uint8Array): string => {
  const h = oracleHash('xxh64');
  h.update(b);
  return h.hex();
};

function bytes(rand: (n: number) => number, n: number): Buffer {
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i++) b[i] = rand(256);
  return b;
}

describe('XXH64', () => {
  it('the published values: the empty input, and "abc"', () => {
    expect(new Xxh64().digest()).toBe('ef46db3751d8e999');
    expect(new Xxh64().update(Buffer.from('abc')).digest()).toBe('44bc2cf5ad770999');
  });

  it("createDigest gives this XXH64, or Node's SHA-256", () => {
    const x = createDigest('xxh64');
    x.update(Buffer.from('abc'));
    expect(x.digest()).toBe('44bc2cf5ad770999');
    const s = createDigest('sha256');
    s.update(Buffer.from('abc'));
    expect(s.digest()).toBe(createHash('sha256').update('abc').digest('hex'));
  });

  it('every length from 0 to 200 bytes, whole and byte by byte, equals xxhash-wasm', () => {
    const rand = rng(64);
    for (let n = 0; n <= 200; n++) {
      const b = bytes(rand, n);
      const one = new Xxh64().update(b).digest();
      const h = new Xxh64();
      for (let i = 0; i < n; i++) h.update(b.subarray(i, i + 1));
      expect([n, one, h.digest()]).toEqual([n, theirs(b), theirs(b)]);
    }
  });

  it('random lengths up to 5 MiB in random pieces (past the 1 MiB staging area), several hashes interleaved', () => {
    const rand = rng(2026);
    const inputs = Array.from({ length: 6 }, () => bytes(rand, rand(5 << 20)));
    const hashes = inputs.map(() => new Xxh64());
    const at = inputs.map(() => 0);
    // Feed the six hashes by turns, a random piece each (0 bytes sometimes).
    while (at.some((p, i) => p < inputs[i]!.length)) {
      const i = rand(inputs.length);
      const input = inputs[i]!;
      const from = at[i]!;
      const n = Math.min(input.length - from, rand(3) === 0 ? rand(40) : rand(3 << 20));
      hashes[i]!.update(input.subarray(from, from + n));
      at[i] = from + n;
    }
    expect(hashes.map((h) => h.digest())).toEqual(inputs.map(theirs));
  });

  it('in place: pieces of its memory at any offset, several hashes on two memories fed by turns, with staged input mixed in', () => {
    const rand = rng(17);
    const size = 3 << 20;
    const mems = [new Xxh64Memory(size), new Xxh64Memory(size)];
    for (const m of mems) {
      const b = Buffer.from(m.buffer, m.base, size);
      b.set(bytes(rand, size));
    }
    // Four hashes per memory, each over random pieces of it (a piece may repeat or overlap another's).
    const feeds = mems.flatMap((m) => Array.from({ length: 4 }, () => ({ m, h: m.hash(), oracle: oracleHash('xxh64'), left: 40 })));
    while (feeds.some((f) => f.left > 0)) {
      const f = feeds[rand(feeds.length)]!;
      if (f.left === 0) continue;
      f.left--;
      const n = rand(3) === 0 ? rand(70) : rand(300 << 10);
      const at = f.m.base + rand(size - n);
      const piece = Buffer.from(f.m.buffer, at, n);
      if (rand(4) === 0)
        f.h.update(Buffer.from(piece)); // a copy: staged, not in place
      else if (rand(2) === 0) f.h.update(piece);
      else f.h.updateAt(at, n);
      f.oracle.update(piece);
    }
    expect(feeds.map((f) => f.h.digest())).toEqual(feeds.map((f) => f.oracle.hex()));
  });

  it('runs of one byte equal the bytes themselves, short and long, at every tail length', () => {
    const rand = rng(5);
    for (let i = 0; i < 200; i++) {
      const h = new Xxh64();
      const o = oracleHash('xxh64');
      for (let k = rand(6); k >= 0; k--) {
        const lead = bytes(rand, rand(40));
        const byte = rand(256);
        const n = rand(2) === 0 ? rand(100) : rand(1 << 20);
        h.update(lead).repeat(byte, n);
        o.update(lead);
        o.update(Buffer.alloc(n, byte));
      }
      expect(h.digest()).toBe(o.hex());
    }
  });

  it('a finished hash refuses more input, and gives the same digest again', () => {
    const h = new Xxh64();
    const d = h.digest();
    expect(() => h.update(Buffer.from('x'))).toThrow(/after digest/);
    expect(() => h.repeat(1, 1)).toThrow(/after digest/);
    expect(h.digest()).toBe(d);
  });

  it('the module loaded is xxh64.wat assembled (scripts/build-wasm.mjs)', async () => {
    // @ts-expect-error: a plain .mjs script without types
    const script = (await import('../../scripts/build-wasm.mjs')) as { assemble: () => Promise<Buffer> };
    expect((await script.assemble()).toString('base64')).toBe(XXH64_WASM);
    expect(readFileSync(new URL('../../lib/store/digest/xxh64.wat', import.meta.url), 'utf8')).toContain('(func (export "update")');
  });
});
