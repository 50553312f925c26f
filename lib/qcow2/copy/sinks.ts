// Sinks of the copy engine besides Qcow2Writer: a new sparse raw file (zeros are holes) and a
// block device or existing file written in place (zeros are written: it holds old data).
import { constants } from 'node:fs';
import { open, unlink, type FileHandle } from 'node:fs/promises';
import { Qcow2Error } from '../errors.js';
import { MAX_IO } from '../io.js';
import type { CopySink } from './engine.js';

async function pwrite(fh: FileHandle, path: string, buf: Buffer, position: number): Promise<void> {
  let done = 0;
  try {
    while (done < buf.length) {
      const { bytesWritten } = await fh.write(buf, done, Math.min(buf.length - done, MAX_IO), position + done);
      done += bytesWritten;
    }
  } catch (e) {
    throw new Qcow2Error('QCOW2_IO', `write of ${path} at ${position} failed: ${(e as Error).message}`, path);
  }
}

/** A new raw file of the virtual size (O_EXCL), sparse: zero ranges are left as holes. */
export class RawFileSink implements CopySink {
  readonly unit = 4096;
  private constructor(
    readonly path: string,
    private readonly fh: FileHandle,
  ) {}

  static async create(path: string, virtualSize: number, mode = 0o600): Promise<RawFileSink> {
    let fh: FileHandle;
    try {
      fh = await open(path, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL, mode);
      await fh.truncate(virtualSize);
    } catch (e) {
      throw new Qcow2Error('QCOW2_IO', `cannot create ${path}: ${(e as Error).message}`, path);
    }
    return new RawFileSink(path, fh);
  }

  writeData(offset: number, buf: Buffer): Promise<void> {
    return pwrite(this.fh, this.path, buf, offset);
  }

  writeZero(): Promise<void> {
    return Promise.resolve(); // a hole of a new file
  }

  /** fdatasync and close. */
  async finish(): Promise<void> {
    try {
      await this.fh.datasync();
    } catch (e) {
      throw new Qcow2Error('QCOW2_IO', `fdatasync of ${this.path} failed: ${(e as Error).message}`, this.path);
    } finally {
      await this.fh.close().catch(() => {});
    }
  }

  async abort(): Promise<void> {
    await this.fh.close().catch(() => {});
    await unlink(this.path).catch(() => {});
  }
}

const ZERO_CHUNK = Buffer.alloc(1 << 20);

/** An open block device (or existing file) written in place: zero ranges are written as zeros. */
export class BlockDeviceSink implements CopySink {
  readonly unit = 4096;
  constructor(
    readonly path: string,
    private readonly fh: FileHandle,
  ) {}

  writeData(offset: number, buf: Buffer): Promise<void> {
    return pwrite(this.fh, this.path, buf, offset);
  }

  async writeZero(offset: number, length: number): Promise<void> {
    // One shared zero buffer, a few writes at once.
    const jobs: Array<Promise<void>> = [];
    for (let o = 0; o < length; o += ZERO_CHUNK.length) {
      jobs.push(pwrite(this.fh, this.path, ZERO_CHUNK.subarray(0, Math.min(ZERO_CHUNK.length, length - o)), offset + o));
      if (jobs.length >= 4) await Promise.all(jobs.splice(0));
    }
    await Promise.all(jobs);
  }

  /** fsync (the caller owns and closes the handle). */
  async flush(): Promise<void> {
    try {
      await this.fh.sync();
    } catch (e) {
      throw new Qcow2Error('QCOW2_IO', `fsync of ${this.path} failed: ${(e as Error).message}`, this.path);
    }
  }
}
