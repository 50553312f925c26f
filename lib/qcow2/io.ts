// Positional file access for the qcow2 code. An interface, so tests can wrap it
// (crash injection, power-loss models) without touching the format logic.
import { constants } from 'node:fs';
import { open, statfs, type FileHandle } from 'node:fs/promises';
import { Qcow2Error } from './errors.js';

/**
 * Open an image file without ever blocking: O_NONBLOCK makes open() of a FIFO return at once
 * (it has no effect on regular files and block devices), and fstat on the descriptor refuses
 * anything but a regular file or a block device (a FIFO, socket or character device would
 * block a read or never end).
 */
export async function openImageFile(path: string, writable: boolean): Promise<FileHandle> {
  let fh: FileHandle;
  try {
    fh = await open(path, (writable ? constants.O_RDWR : constants.O_RDONLY) | constants.O_NONBLOCK);
  } catch (e) {
    throw new Qcow2Error('QCOW2_IO', `cannot open ${path}: ${(e as Error).message}`, path);
  }
  const st = await fh.stat().catch(() => null);
  if (!st || !(st.isFile() || st.isBlockDevice())) {
    await fh.close().catch(() => {});
    throw new Qcow2Error('QCOW2_NOT_A_FILE', `${path} is not a regular file (a FIFO, socket, device or folder)`, path);
  }
  return fh;
}

export interface BlockFile {
  readonly path: string;
  /** Read up to `length` bytes at `position` into `buf[offset..]`; short only at EOF. */
  read(buf: Buffer, offset: number, length: number, position: number): Promise<number>;
  /** Write all of `buf` at `position`. */
  write(buf: Buffer, position: number): Promise<void>;
  datasync(): Promise<void>;
  /**
   * Optional: start making what was written so far durable, concurrently with further writes
   * (an early fdatasync). Gives no ordering guarantee; a failure must fail the operation.
   */
  writeback?(): Promise<void>;
  size(): Promise<number>;
  close(): Promise<void>;
}

/** Largest single read/write request issued to the OS. */
export const MAX_IO = 8 << 20;

export class NodeBlockFile implements BlockFile {
  private constructor(
    readonly path: string,
    private readonly fh: FileHandle,
  ) {}

  /** A second descriptor with O_DIRECT (opts.directReads, where it suits), for whole-page reads into page-aligned memory. */
  private direct: FileHandle | null = null;
  /** The direct descriptor once the kernel refused a read on it (closed with the file). */
  private refused: FileHandle | null = null;
  /** Bytes read past the page cache and through it (tests, logs). */
  readonly bytesRead = { direct: 0, buffered: 0 };

  /**
   * `opts.directReads`: read whole pages into page-aligned memory (markPageAligned) past the
   * page cache, where the file is a block device or on a local disk's file system (see
   * openDirectReader); everything else, and everything where the kernel refuses, through it.
   */
  static async open(path: string, writable: boolean, opts: { directReads?: boolean } = {}): Promise<NodeBlockFile> {
    const f = new NodeBlockFile(path, await openImageFile(path, writable));
    if (opts.directReads && !writable) f.direct = await openDirectReader(path, f.fh).catch(() => null);
    return f;
  }

  async read(buf: Buffer, offset: number, length: number, position: number): Promise<number> {
    let done = 0;
    try {
      while (done < length) {
        const n = Math.min(length - done, MAX_IO);
        const d = this.direct !== null && directable(buf, offset + done, n, position + done) ? this.direct : null;
        let bytesRead: number;
        try {
          ({ bytesRead } = await (d ?? this.fh).read(buf, offset + done, n, position + done));
        } catch (e) {
          // EINVAL: this file system or device refuses this direct read after all (nothing was
          // read); from here on everything goes through the page cache. The descriptor is closed
          // with the file, as other reads may still be using it.
          if (d === null || (e as NodeJS.ErrnoException).code !== 'EINVAL') throw e;
          if (this.direct === d) {
            this.direct = null;
            this.refused = d;
          }
          continue;
        }
        if (bytesRead === 0) break;
        if (d) this.bytesRead.direct += bytesRead;
        else this.bytesRead.buffered += bytesRead;
        done += bytesRead;
      }
    } catch (e) {
      throw new Qcow2Error('QCOW2_IO', `read of ${this.path} at ${position} failed: ${(e as Error).message}`, this.path);
    }
    return done;
  }

  /** Whether whole-page reads still go past the page cache (false once the kernel refused). */
  get readsDirect(): boolean {
    return this.direct !== null;
  }

  async write(buf: Buffer, position: number): Promise<void> {
    let done = 0;
    try {
      while (done < buf.length) {
        const n = Math.min(buf.length - done, MAX_IO);
        const { bytesWritten } = await this.fh.write(buf, done, n, position + done);
        done += bytesWritten;
      }
    } catch (e) {
      throw new Qcow2Error('QCOW2_IO', `write of ${this.path} at ${position} failed: ${(e as Error).message}`, this.path);
    }
  }

  async datasync(): Promise<void> {
    try {
      await this.fh.datasync();
    } catch (e) {
      throw new Qcow2Error('QCOW2_IO', `fdatasync of ${this.path} failed: ${(e as Error).message}`, this.path);
    }
  }

  writeback(): Promise<void> {
    return this.datasync();
  }

  async size(): Promise<number> {
    return (await this.fh.stat()).size;
  }

  async close(): Promise<void> {
    for (const d of [this.direct, this.refused]) await d?.close().catch(() => {});
    this.direct = this.refused = null;
    await this.fh.close().catch(() => {});
  }
}

/** Direct I/O granule: whole pages of the file, into whole pages of memory. */
const DIRECT_ALIGN = 4096;

/**
 * File systems on a local block device, where an O_DIRECT read goes from the device into our
 * memory. Not network file systems (NFS, CIFS: there each direct read is a round trip to the
 * server, without the client's read-ahead), FUSE, tmpfs or overlays.
 */
const LOCAL_DISK_FS = new Set([
  0xef53, // ext2/3/4
  0x58465342, // xfs
  0x9123683e, // btrfs
  0xf2f52010, // f2fs
]);

/**
 * Per device number, whether its file system is in LOCAL_DISK_FS: statfs once per mount, not
 * once per layer (on NFS each is a round trip to the server). A number reused by another file
 * system later in the process can at worst open O_DIRECT where it is slower or refused (then
 * the cache is used), never read other bytes.
 */
const localDisk = new Map<number, boolean>();

/** Memories known to start at a page boundary (WebAssembly memories); JavaScript cannot see an address. */
const pageAligned = new WeakSet<ArrayBufferLike>();

/** Record that `memory` starts at a page boundary (a WebAssembly memory's buffer). */
export function markPageAligned(memory: ArrayBufferLike): void {
  pageAligned.add(memory);
}

/** Whether `buf[offset..offset+length)` read from file offset `position` may go direct: whole pages, page-aligned memory. */
function directable(buf: Buffer, offset: number, length: number, position: number): boolean {
  return (
    pageAligned.has(buf.buffer) &&
    (buf.byteOffset + offset) % DIRECT_ALIGN === 0 &&
    length % DIRECT_ALIGN === 0 &&
    position % DIRECT_ALIGN === 0
  );
}

/**
 * A second, read-only descriptor of the file `fh` has open, with O_DIRECT, or null where that
 * does not suit (see LOCAL_DISK_FS) or the kernel refuses it. Why: a restore or a verify reads
 * gigabytes of backup nobody reads again soon; past the page cache the CPU does not copy them
 * once more, and the host's page cache (its VMs' memory) is not flooded with them. O_NONBLOCK,
 * and the same device and inode as `fh`: a path swapped for a FIFO between the two opens is
 * never opened blocking, nor another file read.
 */
async function openDirectReader(path: string, fh: FileHandle): Promise<FileHandle | null> {
  if (constants.O_DIRECT === undefined) return null;
  const st = await fh.stat();
  if (!st.isBlockDevice()) {
    let local = localDisk.get(st.dev);
    if (local === undefined) {
      const fs = await statfs(path).catch(() => null);
      if (fs === null) return null;
      localDisk.set(st.dev, (local = LOCAL_DISK_FS.has(fs.type)));
    }
    if (!local) return null;
  }
  const d = await open(path, constants.O_RDONLY | constants.O_NONBLOCK | constants.O_DIRECT).catch(() => null);
  if (d === null) return null;
  const ds = await d.stat().catch(() => null);
  if (ds === null || ds.dev !== st.dev || ds.ino !== st.ino) {
    await d.close().catch(() => {});
    return null;
  }
  return d;
}

// Node's global; this project's TypeScript libs (no DOM) do not declare it.
declare const WebAssembly: { Memory: new (d: { initial: number }) => { buffer: ArrayBuffer } };

/**
 * `count` buffers of `size` bytes at page-aligned addresses. The kernel copies to and from the
 * page cache markedly faster there: a large Buffer or SharedArrayBuffer from malloc starts 16
 * bytes past a page (measured here: ~150 against ~60 ms of system time per GiB read). A
 * WebAssembly memory is mapped at a page boundary; it is sized once and never grown.
 */
export function pageAlignedBuffers(count: number, size: number): Buffer[] {
  const stride = Math.ceil(size / 4096) * 4096;
  const mem = new WebAssembly.Memory({ initial: Math.max(1, Math.ceil((stride * count) / 65536)) });
  markPageAligned(mem.buffer);
  return Array.from({ length: count }, (_, i) => Buffer.from(mem.buffer, i * stride, size));
}
