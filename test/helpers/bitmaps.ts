// Persistent qcow2 bitmaps as the tests need to see them: the flags qemu-img reports,
// whether a bitmap has any bit set (read from the image's own bitmap tables, which
// qemu-img does not show), and a bitmap left `in-use` the way a crashed QEMU leaves it.
import { execFileSync, spawn } from 'node:child_process';
import { closeSync, openSync, readSync } from 'node:fs';

const EXT_BITMAPS = 0x23852875;

export interface ImageBitmap {
  name: string;
  flags: string[];
}

/** `qemu-img info` bitmaps (flags: `auto` = enabled, `in-use` = inconsistent). */
export function imageBitmaps(path: string): ImageBitmap[] {
  const info = JSON.parse(execFileSync('qemu-img', ['info', '--output=json', '-U', path], { encoding: 'utf8' })) as {
    'format-specific'?: { data?: { bitmaps?: ImageBitmap[] } };
  };
  return (info['format-specific']?.data?.bitmaps ?? []).map((b) => ({ name: b.name, flags: b.flags }));
}

function readAt(fd: number, offset: number, length: number): Buffer {
  const b = Buffer.alloc(length);
  if (readSync(fd, b, 0, length, offset) !== length) throw new Error(`short read at ${offset}`);
  return b;
}

/**
 * Whether the bitmap records no change at all: every entry of its bitmap table is 0
 * (an all-zero cluster that was never written). Entry bit 0 (all ones) or a data
 * cluster offset means some bit is set.
 */
export function bitmapIsEmpty(path: string, name: string): boolean {
  const fd = openSync(path, 'r');
  try {
    const h = readAt(fd, 0, 104);
    if (h.readUInt32BE(4) < 3) throw new Error(`${path}: qcow2 v2 has no bitmaps`);
    let off = h.readUInt32BE(100);
    for (;;) {
      const e = readAt(fd, off, 8);
      const type = e.readUInt32BE(0);
      const len = e.readUInt32BE(4);
      if (type === 0) throw new Error(`${path}: no bitmaps extension`);
      if (type === EXT_BITMAPS) {
        const x = readAt(fd, off + 8, len);
        const count = x.readUInt32BE(0);
        const dir = readAt(fd, Number(x.readBigUInt64BE(16)), Number(x.readBigUInt64BE(8)));
        let p = 0;
        for (let i = 0; i < count; i++) {
          const tableOffset = Number(dir.readBigUInt64BE(p));
          const tableSize = dir.readUInt32BE(p + 8);
          const nameSize = dir.readUInt16BE(p + 18);
          const extra = dir.readUInt32BE(p + 20);
          const entryName = dir.subarray(p + 24 + extra, p + 24 + extra + nameSize).toString('utf8');
          if (entryName === name) {
            const table = readAt(fd, tableOffset, tableSize * 8);
            for (let t = 0; t < tableSize; t++) if (table.readBigUInt64BE(t * 8) !== 0n) return false;
            return true;
          }
          p = Math.ceil((p + 24 + extra + nameSize) / 8) * 8;
        }
        throw new Error(`${path}: no bitmap ${name}`);
      }
      off += 8 + Math.ceil(len / 8) * 8;
    }
  } finally {
    closeSync(fd);
  }
}

/**
 * Leave the image's enabled bitmaps `in-use`, as a QEMU killed while it had the image
 * open does: qemu-io opens it read-write (setting the flag), then gets SIGKILL.
 */
export async function leaveBitmapsInUse(path: string): Promise<void> {
  const child = spawn('qemu-io', ['-f', 'qcow2', '-c', 'sleep 600000', path], { stdio: 'ignore' });
  const exited = new Promise<void>((resolve) => child.on('exit', () => resolve()));
  try {
    const deadline = Date.now() + 20_000;
    while (!imageBitmaps(path).some((b) => b.flags.includes('in-use'))) {
      if (Date.now() > deadline) throw new Error(`qemu-io did not open ${path} within 20 s`);
      await new Promise((r) => setTimeout(r, 50));
    }
  } finally {
    child.kill('SIGKILL');
    await exited;
  }
}
