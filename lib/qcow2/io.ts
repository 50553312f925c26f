// Positional file access for the qcow2 code. An interface, so tests can wrap it
// (crash injection, power-loss models) without touching the format logic.
import { constants } from 'node:fs';
import { open, type FileHandle } from 'node:fs/promises';
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
  return Array.from({ length: count }, (_, i) => Buffer.from(mem.buffer, i * stride, size));
}
