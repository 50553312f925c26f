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

  static async open(path: string, writable: boolean): Promise<NodeBlockFile> {
    return new NodeBlockFile(path, await openImageFile(path, writable));
  }

  async read(buf: Buffer, offset: number, length: number, position: number): Promise<number> {
    let done = 0;
    try {
      while (done < length) {
        const n = Math.min(length - done, MAX_IO);
        const { bytesRead } = await this.fh.read(buf, offset + done, n, position + done);
        if (bytesRead === 0) break;
        done += bytesRead;
      }
    } catch (e) {
      throw new Qcow2Error('QCOW2_IO', `read of ${this.path} at ${position} failed: ${(e as Error).message}`, this.path);
    }
    return done;
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
    await this.fh.close().catch(() => {});
  }
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

/** Memories known to start at a page boundary (a WebAssembly memory's); JS cannot see an address. */
const pageAligned = new WeakSet<ArrayBufferLike>();

/** Record that `memory` starts at a page boundary (a WebAssembly memory's buffer). */
export function markPageAligned(memory: ArrayBufferLike): void {
  pageAligned.add(memory);
}

/** Direct I/O granule: whole pages of the file, from whole pages of memory. */
const DIRECT_ALIGN = 4096;

/**
 * File systems on a local block device, where O_DIRECT writes go straight to the device. Not
 * network file systems: there a direct write waits for the server's commit, request by request
 * (NFS), or bypasses the client's write-behind; nor tmpfs, whose pages are the data.
 */
const LOCAL_DISK_FS = new Set([
  0xef53, // ext2/3/4
  0x58465342, // xfs
  0x9123683e, // btrfs
  0xf2f52010, // f2fs
]);

/** Whether direct writes suit `path` (just opened as `fh`): a block device, or a file on a local disk's file system. */
async function directSuits(path: string, fh: FileHandle): Promise<boolean> {
  const st = await fh.stat();
  if (st.isBlockDevice()) return true;
  if (!st.isFile()) return false;
  const fs = await statfs(path).catch(() => null);
  return fs !== null && LOCAL_DISK_FS.has(fs.type);
}

/**
 * A file written mostly past the page cache. Each write's whole pages (4 KiB-aligned in the
 * file and in a page-aligned memory, see markPageAligned) go through a second descriptor
 * opened with O_DIRECT; the rest, and everything where the file system refuses O_DIRECT
 * (EINVAL at open or at the first write), goes through the page cache as usual.
 *
 * Why: a restore or copy writes gigabytes nobody reads back soon. Through the page cache each
 * byte is copied once more by the CPU and written back later, and the final fdatasync waits
 * for all of it; direct writes go to the device while later data is read, and leave the cache
 * to the host's VMs. Durability is unchanged: datasync()/sync() still flush the device.
 *
 * Safe with the buffered descriptor beside it: a direct write covers whole pages only, so no
 * page is shared between a direct and a buffered write of different bytes, and the kernel
 * flushes and drops cached pages of a range before writing it directly. Writes of the same
 * range must not overlap in time (callers already order overwrites). On ext4 a direct write
 * that allocates blocks holds the inode lock until it completes, so such writes queue one
 * after another; they still spare the CPU its copy and the cache its flood.
 */
export class DirectWriteFile {
  /** Bytes written directly and through the page cache (for tests and logs). */
  readonly written = { direct: 0, buffered: 0 };
  private constructor(
    readonly path: string,
    readonly fh: FileHandle,
    private direct: FileHandle | null,
  ) {}

  /**
   * Open `path` with `flags` (O_WRONLY or O_RDWR, with O_CREAT/O_EXCL as the caller needs)
   * and, unless `direct` is false, a second descriptor with O_DIRECT where it suits (a block
   * device, or a file on a local disk's file system) and the kernel allows it.
   */
  static async open(path: string, flags: number, mode = 0o600, opts: { direct?: boolean } = {}): Promise<DirectWriteFile> {
    const fh = await open(path, flags, mode);
    let direct: FileHandle | null = null;
    try {
      if (opts.direct !== false && constants.O_DIRECT !== undefined && (await directSuits(path, fh))) {
        const f = flags & ~(constants.O_CREAT | constants.O_EXCL | constants.O_TRUNC);
        direct = await open(path, f | constants.O_DIRECT).catch(() => null);
      }
    } catch (e) {
      await fh.close().catch(() => {});
      throw e;
    }
    return new DirectWriteFile(path, fh, direct);
  }

  /** Whether writes may still go direct (false once the file system refused O_DIRECT). */
  get isDirect(): boolean {
    return this.direct !== null;
  }

  /** Write all of `buf` at `position`. */
  async write(buf: Buffer, position: number): Promise<void> {
    const head = this.direct && pageAligned.has(buf.buffer) ? (DIRECT_ALIGN - (position % DIRECT_ALIGN)) % DIRECT_ALIGN : -1;
    const body = head >= 0 && head < buf.length ? Math.floor((buf.length - head) / DIRECT_ALIGN) * DIRECT_ALIGN : 0;
    if (body === 0 || (buf.byteOffset + head) % DIRECT_ALIGN !== 0) return this.buffered(buf, position);
    if (head > 0) await this.buffered(buf.subarray(0, head), position);
    await this.directWrite(buf.subarray(head, head + body), position + head);
    if (head + body < buf.length) await this.buffered(buf.subarray(head + body), position + head + body);
  }

  private async directWrite(buf: Buffer, position: number): Promise<void> {
    let done = 0;
    while (done < buf.length) {
      const d = this.direct;
      if (d === null) return this.buffered(buf.subarray(done), position + done);
      try {
        const { bytesWritten } = await d.write(buf, done, Math.min(buf.length - done, MAX_IO), position + done);
        // A short direct write (a full device) is finished through the page cache, which reports the error.
        if (bytesWritten === 0 || bytesWritten % DIRECT_ALIGN !== 0) {
          this.written.direct += bytesWritten;
          return this.buffered(buf.subarray(done + bytesWritten), position + done + bytesWritten);
        }
        done += bytesWritten;
        this.written.direct += bytesWritten;
      } catch (e) {
        // EINVAL: this file system (or its alignment) refuses O_DIRECT, and nothing was written.
        if ((e as NodeJS.ErrnoException).code !== 'EINVAL') throw e;
        this.direct = null;
        await d.close().catch(() => {});
      }
    }
  }

  private async buffered(buf: Buffer, position: number): Promise<void> {
    let done = 0;
    while (done < buf.length) {
      const { bytesWritten } = await this.fh.write(buf, done, Math.min(buf.length - done, MAX_IO), position + done);
      done += bytesWritten;
    }
    this.written.buffered += buf.length;
  }

  datasync(): Promise<void> {
    return this.fh.datasync();
  }

  sync(): Promise<void> {
    return this.fh.sync();
  }

  async close(): Promise<void> {
    const d = this.direct;
    this.direct = null;
    await d?.close().catch(() => {});
    await this.fh.close();
  }
}
