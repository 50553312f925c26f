// XXH64 (seed 0), streaming, synchronous: the absorption runs in a small WebAssembly module
// (xxh64.wat), the initialisation and finalisation here. An Xxh64Memory is one instance of
// the module over its own memory, which a caller may also use for its buffers (a HashPool's
// slots): bytes there are hashed where they lie, others are first copied into a staging
// area. Any number of hashes may be open on one memory at once (restore digests several
// layers' extents side by side): the one being fed keeps its state in the memory, the others
// in their own objects. Output: the canonical big-endian hex, as `xxhsum` prints it.
import { XXH64_WASM } from './xxh64-wasm.js';

const M64 = (1n << 64n) - 1n;
const P1 = 0x9e3779b185ebca87n;
const P2 = 0xc2b2ae3d27d4eb4fn;
const P3 = 0x165667b19e3779f9n;
const P4 = 0x85ebca77c2b2ae63n;
const P5 = 0x27d4eb2f165667c5n;

const PAGE = 1 << 16;
/** The state of the hash being fed (accumulators, then the tail), in the memory's first page. */
const STATE = 0;
const STATE_BYTES = 64;
/** The rest of the first page: input from elsewhere is copied here, a piece at a time. */
const STAGE = STATE_BYTES;
const STAGE_BYTES = PAGE - STAGE - 8;

// Node's global; this project's TypeScript libs (no DOM) do not declare it.
declare const WebAssembly: {
  Module: new (bytes: Uint8Array) => object;
  Instance: new (module: object, imports: object) => { exports: unknown };
  Memory: new (d: { initial: number; maximum: number; shared: true }) => { buffer: SharedArrayBuffer };
};

interface Exports {
  update(this: void, h: number, tail: number, p: number, n: number): number;
  repeat(this: void, h: number, tail: number, byte: number, n: number): number;
}

let compiled: object | null = null;

/**
 * One instance of the XXH64 module over a shared memory of its own, sized once (a memory that
 * grows replaces its buffer, and the views on it would no longer see it): the first page is
 * the module's, then `userBytes` (rounded up to whole pages) from `base` are the caller's.
 */
export class Xxh64Memory {
  readonly buffer: SharedArrayBuffer;
  /** First byte of the caller's part. */
  readonly base = PAGE;
  // For Xxh64 only: the instance's functions, views of the memory, and the hash whose state
  // is in the memory now.
  readonly x: Exports;
  readonly bytes: Uint8Array;
  readonly acc: BigUint64Array;
  owner: Xxh64 | null = null;

  constructor(userBytes = 0) {
    const pages = 1 + Math.ceil(Math.max(0, userBytes) / PAGE);
    const memory = new WebAssembly.Memory({ initial: pages, maximum: pages, shared: true });
    // Compiled on first use (~1 ms, synchronous: the module is tiny).
    compiled ??= new WebAssembly.Module(Buffer.from(XXH64_WASM, 'base64'));
    this.x = new WebAssembly.Instance(compiled, { env: { memory } }).exports as Exports;
    this.buffer = memory.buffer;
    this.bytes = new Uint8Array(this.buffer);
    this.acc = new BigUint64Array(this.buffer, STATE, 4);
  }

  /** A new hash that reads this memory in place. */
  hash(): Xxh64 {
    return new Xxh64(this);
  }
}

/** For hashes made without a memory: input is staged through this one. */
let shared: Xxh64Memory | null = null;

const rotl = (x: bigint, r: bigint): bigint => ((x << r) | (x >> (64n - r))) & M64;
const round = (acc: bigint, lane: bigint): bigint => (rotl((acc + lane * P2) & M64, 31n) * P1) & M64;
const merge = (acc: bigint, v: bigint): bigint => ((acc ^ round(0n, v)) * P1 + P4) & M64;

/** The seed-0 accumulators and an empty tail. */
const INITIAL = new Uint8Array(new BigUint64Array([(P1 + P2) & M64, P2, 0n, (M64 + 1n - P1) & M64, 0n, 0n, 0n, 0n]).buffer);

export class Xxh64 {
  private readonly mem: Xxh64Memory;
  /** The state while another hash of the memory is being fed (accumulators, tail). */
  private readonly saved = Uint8Array.from(INITIAL);
  /** Bytes in the tail, not yet a whole stripe (< 32). */
  private tailLen = 0;
  private total = 0;
  /** The hex digest, once taken (the hash is then finished). */
  private hex: string | null = null;

  constructor(mem?: Xxh64Memory) {
    this.mem = mem ?? (shared ??= new Xxh64Memory());
  }

  update(b: Uint8Array): this {
    const m = this.mem;
    if (b.buffer === m.buffer) return this.updateAt(b.byteOffset, b.length);
    for (let at = 0; at < b.length; at += STAGE_BYTES) {
      const n = Math.min(STAGE_BYTES, b.length - at);
      // Staged at the source's alignment: a copy into shared memory is done word by word
      // only when both sides align, byte by byte otherwise (4x slower).
      const to = STAGE + ((b.byteOffset + at) & 7);
      m.bytes.set(b.subarray(at, at + n), to);
      this.updateAt(to, n);
    }
    return this;
  }

  /** The `n` bytes at `offset` of the memory, hashed in place. */
  updateAt(offset: number, n: number): this {
    this.load();
    this.tailLen = this.mem.x.update(STATE, this.tailLen, offset, n);
    this.total += n;
    return this;
  }

  /** `n` copies of `byte`. */
  repeat(byte: number, n: number): this {
    this.load();
    // Pieces below 2^31: the module takes an i32.
    for (let left = n; left > 0; left -= 1 << 30) this.tailLen = this.mem.x.repeat(STATE, this.tailLen, byte, Math.min(left, 1 << 30));
    this.total += n;
    return this;
  }

  /** Hex of the 64-bit hash; the hash is finished. */
  digest(): string {
    if (this.hex !== null) return this.hex;
    this.load();
    this.mem.owner = null;
    const { acc, bytes } = this.mem;
    let h: bigint;
    if (this.total >= 32) {
      const [v1, v2, v3, v4] = acc as unknown as [bigint, bigint, bigint, bigint];
      h = (rotl(v1, 1n) + rotl(v2, 7n) + rotl(v3, 12n) + rotl(v4, 18n)) & M64;
      h = merge(merge(merge(merge(h, v1), v2), v3), v4);
    } else h = P5;
    h = (h + BigInt(this.total)) & M64;
    const t = Buffer.from(bytes.slice(STATE + 32, STATE + 32 + this.tailLen));
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
    return (this.hex = h.toString(16).padStart(16, '0'));
  }

  /** This hash's state into the memory, the previous owner's saved first. */
  private load(): void {
    if (this.hex !== null) throw new Error('XXH64: update after digest');
    const m = this.mem;
    if (m.owner === this) return;
    m.owner?.save();
    m.bytes.set(this.saved, STATE);
    m.owner = this;
  }

  private save(): void {
    this.saved.set(this.mem.bytes.subarray(STATE, STATE + STATE_BYTES));
  }
}
