// A backing chain opened for reading: block status through the chain, the allocation
// map in `qemu-img map --output=json` form, and guest reads.
import { Ahead } from './ahead.js';
import { Qcow2Error } from './errors.js';
import { readChain } from './chain.js';
import { Qcow2Image, type Extent, type OpenOptions } from './image.js';
import type { BlockFile } from './io.js';

export interface ChainExtent extends Extent {
  /** Layer the status comes from (0 = top). */
  depth: number;
  /** Allocated (data, zero or compressed) in layer `depth`. */
  present: boolean;
  /** Unallocated down to the view's lower limit (`to`): the layer `to` decides. */
  below: boolean;
}

/** One entry of `qemu-img map --output=json`. */
export interface MapEntry {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
  offset?: number;
}

export interface ChainOpenOptions {
  /** Open the top image read-write (the rebase writer). */
  writableTop?: boolean;
  /** Replace the file of the top image (tests). */
  topFile?: BlockFile;
  l2CacheBytes?: number;
  /** Read the layers' data past the page cache where the file system suits it (NodeBlockFile.open). */
  directReads?: boolean;
}

const READ_CHUNK = 4 << 20;
const READS_IN_FLIGHT = 4;
/** Layers ImageChain.open() opens at once. */
const OPENS_AHEAD = 4;

export class ImageChain {
  private constructor(readonly images: Qcow2Image[]) {}

  static async open(top: string, opts: ChainOpenOptions = {}): Promise<ImageChain> {
    const chain = await readChain(top);
    const images: Qcow2Image[] = [];
    // The next few layers open while one is checked; judged in chain order, so the error is
    // the first layer's, as if each were opened in turn.
    const opening = new Ahead(chain.layers.length, OPENS_AHEAD, (i) => {
      const o: OpenOptions = { writable: i === 0 && (opts.writableTop ?? false) };
      if (i === 0 && opts.topFile) o.file = opts.topFile;
      if (opts.l2CacheBytes) o.l2CacheBytes = opts.l2CacheBytes;
      if (opts.directReads) o.directReads = true; // a writable top reads through the cache (NodeBlockFile.open)
      return Qcow2Image.open(chain.layers[i]!.path, o);
    });
    try {
      for (let i = 0; i < chain.layers.length; i++) {
        const layer = chain.layers[i]!;
        const img = await opening.take(i);
        images.push(img);
        const fmt = img.header.backingFormat;
        if (img.header.backingFile !== null && fmt !== null && fmt !== 'qcow2')
          throw new Qcow2Error('QCOW2_UNSUPPORTED_FEATURE', `${layer.path}: backing format ${fmt} is not supported`, layer.path);
      }
    } catch (e) {
      // Every image that opened, those opened ahead included, is closed (each once).
      await Promise.all(
        opening.started.map((p) =>
          p.then(
            (img) => img.close(),
            () => {},
          ),
        ),
      );
      throw e;
    }
    return new ImageChain(images);
  }

  static fromImages(images: Qcow2Image[]): ImageChain {
    return new ImageChain(images);
  }

  get top(): Qcow2Image {
    return this.images[0]!;
  }

  get virtualSize(): number {
    return this.top.virtualSize;
  }

  async close(): Promise<void> {
    await Promise.all(this.images.map((i) => i.close()));
  }

  /**
   * Status of the guest range at `offset` seen from layer `from`, walking backing files down to
   * (excluding) layer `to`. Like QEMU: ranges past a backing file's end read as zeros.
   */
  async status(offset: number, maxLen: number, from = 0, to = this.images.length): Promise<ChainExtent> {
    let depth = from;
    let len = Math.min(maxLen, this.images[from]!.virtualSize - offset);
    if (!(len > 0)) throw new Qcow2Error('QCOW2_RANGE', `status at ${offset} outside the virtual disk`);
    for (;;) {
      const e = await this.images[depth]!.status(offset, len);
      len = e.length;
      if (e.kind !== 'unallocated') return { ...e, depth, present: true, below: false };
      const next = depth + 1;
      if (next === to && next < this.images.length) return { ...e, depth, present: false, below: true };
      if (next >= this.images.length || next >= to || offset >= this.images[next]!.virtualSize)
        return { ...e, depth, present: false, below: false };
      len = Math.min(len, this.images[next]!.virtualSize - offset);
      depth = next;
    }
  }

  /** The allocation map, as `qemu-img map --output=json` prints it (from layer `from`). */
  async map(from = 0): Promise<MapEntry[]> {
    const out: MapEntry[] = [];
    for await (const e of this.mapEntries(from)) out.push(e);
    return out;
  }

  async *mapEntries(from = 0): AsyncGenerator<MapEntry> {
    const size = this.images[from]!.virtualSize;
    let cur: MapEntry | null = null;
    let pos = 0;
    while (pos < size) {
      const s = await this.status(pos, size - pos, from);
      const e: MapEntry = {
        start: pos,
        length: s.length,
        depth: s.depth - from,
        present: s.present,
        zero: s.kind === 'zero' || s.kind === 'unallocated',
        data: s.kind === 'data' || s.kind === 'compressed',
      };
      if (s.kind !== 'compressed' && s.host !== undefined) e.offset = s.host;
      if (cur && mergeable(cur, e)) cur.length += e.length;
      else {
        if (cur) yield cur;
        cur = e;
      }
      pos += s.length;
    }
    if (cur) yield cur;
  }

  /** Guest content of [offset, offset + length) seen from layer `from` (zeros past the end). */
  async read(offset: number, length: number, from = 0): Promise<Buffer> {
    const buf = Buffer.alloc(length);
    await this.readInto(buf, 0, offset, length, from);
    return buf;
  }

  async readInto(buf: Buffer, bufOffset: number, offset: number, length: number, from = 0): Promise<void> {
    const size = this.images[from]!.virtualSize;
    const end = offset + length;
    const pending: Promise<void>[] = [];
    let pos = offset;
    while (pos < end) {
      if (pos >= size) {
        buf.fill(0, bufOffset + (pos - offset), bufOffset + length);
        break;
      }
      const s = await this.status(pos, Math.min(end - pos, READ_CHUNK), from);
      const at = bufOffset + (pos - offset);
      const img = this.images[s.depth]!;
      if (s.kind === 'data') {
        pending.push(img.readHost(buf, at, s.length, s.host!));
        if (pending.length >= READS_IN_FLIGHT) await Promise.all(pending.splice(0));
      } else if (s.kind === 'compressed') {
        const data = await img.readCompressed(s.compressed!);
        const from0 = s.offset - s.compressed!.clusterStart;
        data.copy(buf, at, from0, from0 + s.length);
      } else {
        buf.fill(0, at, at + s.length);
      }
      pos += s.length;
    }
    await Promise.all(pending);
  }
}

function mergeable(a: MapEntry, b: MapEntry): boolean {
  if (a.zero !== b.zero || a.data !== b.data || a.depth !== b.depth || a.present !== b.present) return false;
  if ((a.offset === undefined) !== (b.offset === undefined)) return false;
  return a.offset === undefined || a.offset + a.length === b.offset;
}

/** `qemu-img map --output=json` of one image (its chain included, like qemu-img). */
export async function mapImage(path: string): Promise<MapEntry[]> {
  const chain = await ImageChain.open(path);
  try {
    return await chain.map();
  } finally {
    await chain.close();
  }
}

/** Per-layer allocation map: the raw statuses of one image, merged, without its backing. */
export async function layerExtents(img: Qcow2Image): Promise<Extent[]> {
  const out: Extent[] = [];
  let pos = 0;
  while (pos < img.virtualSize) {
    const e = await img.status(pos, img.virtualSize - pos);
    const last = out.at(-1);
    if (last && last.kind === e.kind && e.kind !== 'compressed' && last.host === undefined && e.host === undefined) last.length += e.length;
    else if (last && last.kind === e.kind && e.kind !== 'compressed' && last.host !== undefined && last.host + last.length === e.host)
      last.length += e.length;
    else out.push(e);
    pos += e.length;
  }
  return out;
}
