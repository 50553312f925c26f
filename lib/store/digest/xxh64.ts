// XXH64 (seed 0), streaming, synchronous: the stripe loop runs in a small WebAssembly module
// (xxh64.wat), everything else here. Each hash keeps its own accumulators, so any number may
// be open at once (restore digests several layers' extents side by side); the module's
// memory is only a staging area for one update() at a time. Output: the canonical
// big-endian hex, as `xxhsum` prints it.
import { XXH64_WASM } from './xxh64-wasm.js';

const M64 = (1n << 64n) - 1n;
const P1 = 0x9e3779b185ebca87n;
const P2 = 0xc2b2ae3d27d4eb4fn;
const P3 = 0x165667b19e3779f9n;
const P4 = 0x85ebca77c2b2ae63n;
const P5 = 0x27d4eb2f165667c5n;

/** Accumulators at 0, data from 64 (+ up to 7): 1 MiB per call (the memory has 17 pages of 64 KiB). */
const STATE = 0;
const DATA = 64;
const CHUNK = 1 << 20;

// Node's global; this project's TypeScript libs (no DOM) do not declare it.
declare const WebAssembly: {
  Module: new (bytes: Uint8Array) => object;
  Instance: new (module: object) => { exports: unknown };
};

interface Stripes {
  memory: { buffer: ArrayBuffer };
  stripes(this: void, state: number, data: number, n: number): void;
}

let module: { mem: Uint8Array; acc: BigUint64Array; stripes: Stripes['stripes'] } | null = null;
/** Compiled on first use (~1 ms, synchronous: the module is tiny). */
function wasm(): NonNullable<typeof module> {
  if (!module) {
    const inst = new WebAssembly.Instance(new WebAssembly.Module(Buffer.from(XXH64_WASM, 'base64')));
    const x = inst.exports as Stripes;
    module = { mem: new Uint8Array(x.memory.buffer), acc: new BigUint64Array(x.memory.buffer, STATE, 4), stripes: x.stripes };
  }
  return module;
}

const rotl = (x: bigint, r: bigint): bigint => ((x << r) | (x >> (64n - r))) & M64;
const round = (acc: bigint, lane: bigint): bigint => (rotl((acc + lane * P2) & M64, 31n) * P1) & M64;
const merge = (acc: bigint, v: bigint): bigint => ((acc ^ round(0n, v)) * P1 + P4) & M64;

export class Xxh64 {
  private readonly acc = new BigUint64Array([(P1 + P2) & M64, P2, 0n, (M64 + 1n - P1) & M64]);
  /** Bytes not yet a whole stripe (< 32). */
  private readonly tail = Buffer.alloc(32);
  private tailLen = 0;
  private total = 0;
  private done = false;

  update(b: Uint8Array): this {
    if (this.done) throw new Error('XXH64: update after digest');
    this.total += b.length;
    let off = 0;
    if (this.tailLen > 0) {
      const take = Math.min(32 - this.tailLen, b.length);
      this.tail.set(b.subarray(0, take), this.tailLen);
      this.tailLen += take;
      off = take;
      if (this.tailLen < 32) return this;
      this.absorb(this.tail, 0, 32);
      this.tailLen = 0;
    }
    const whole = (b.length - off) & ~31;
    if (whole > 0) this.absorb(b, off, whole);
    off += whole;
    if (off < b.length) {
      this.tail.set(b.subarray(off), 0);
      this.tailLen = b.length - off;
    }
    return this;
  }

  /** Hex of the 64-bit hash; the hash is finished. */
  digest(): string {
    this.done = true;
    let h: bigint;
    if (this.total >= 32) {
      const [v1, v2, v3, v4] = this.acc as unknown as [bigint, bigint, bigint, bigint];
      h = (rotl(v1, 1n) + rotl(v2, 7n) + rotl(v3, 12n) + rotl(v4, 18n)) & M64;
      h = merge(merge(merge(merge(h, v1), v2), v3), v4);
    } else h = P5;
    h = (h + BigInt(this.total)) & M64;
    const t = this.tail;
    let i = 0;
    for (; i + 8 <= this.tailLen; i += 8) {
      h ^= round(0n, t.readBigUInt64LE(i));
      h = (rotl(h, 27n) * P1 + P4) & M64;
    }
    if (i + 4 <= this.tailLen) {
      h ^= (BigInt(t.readUInt32LE(i)) * P1) & M64;
      h = (rotl(h, 23n) * P2 + P3) & M64;
      i += 4;
    }
    for (; i < this.tailLen; i++) {
      h ^= (BigInt(t[i]!) * P5) & M64;
      h = (rotl(h, 11n) * P1) & M64;
    }
    h ^= h >> 33n;
    h = (h * P2) & M64;
    h ^= h >> 29n;
    h = (h * P3) & M64;
    h ^= h >> 32n;
    return h.toString(16).padStart(16, '0');
  }

  /** Whole stripes of b[off, off + len), len a multiple of 32, staged through the module's memory. */
  private absorb(b: Uint8Array, off: number, len: number): void {
    const w = wasm();
    w.acc.set(this.acc);
    for (let at = off, end = off + len; at < end; at += CHUNK) {
      const n = Math.min(CHUNK, end - at);
      // Staged at the source's alignment: a copy out of shared memory (a HashPool slot) is
      // done word by word only when both sides align, byte by byte otherwise (4x slower);
      // the canonical stream's status bytes put most data at odd offsets.
      const to = DATA + ((b.byteOffset + at) & 7);
      w.mem.set(b.subarray(at, at + n), to);
      w.stripes(STATE, to, n >>> 5);
    }
    this.acc.set(w.acc);
  }
}
