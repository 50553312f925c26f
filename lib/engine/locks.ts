// Is a QEMU process holding an image? QEMU locks images with OFD byte-range locks on
// bytes 100.. (permissions held) and 200.. (permissions not shared); /proc/locks lists
// them as OFDLCK with the file's major:minor:inode. Racy and local-only by nature: the
// per-VM lock file on the share is the real serialisation, this is the safety net.
import { readFile, stat } from 'node:fs/promises';

export interface LockProbe {
  /** Paths held by an OFD lock in QEMU's ranges; null when /proc/locks cannot be read. */
  held(paths: readonly string[]): Promise<string[] | null>;
}

function majorMinor(dev: number): [number, number] {
  // glibc's gnu_dev_major/minor on a 64-bit dev_t (Node gives a double; fine below 2^53).
  const big = BigInt(dev);
  const major = Number(((big >> 8n) & 0xfffn) | ((big >> 32n) & ~0xfffn));
  const minor = Number((big & 0xffn) | ((big >> 12n) & ~0xffn));
  return [major, minor];
}

/** Parse /proc/locks: the set of "maj:min:inode" keys with an OFD lock touching bytes 100..299. */
export function ofdLockedKeys(procLocks: string): Set<string> {
  const out = new Set<string>();
  for (const line of procLocks.split('\n')) {
    // "1: OFDLCK ADVISORY  READ  -1 fd:01:1234 100 100"  (blocked waiters start with "->")
    const f = line.trim().split(/\s+/);
    const i = f.indexOf('OFDLCK');
    if (i < 0 || f.length < i + 7) continue;
    const [maj, min, ino] = (f[i + 4] ?? '').split(':');
    const start = Number(f[i + 5]);
    const endRaw = f[i + 6]!;
    const end = endRaw === 'EOF' ? Number.MAX_SAFE_INTEGER : Number(endRaw);
    if (!maj || !min || !ino || !(start <= 299 && end >= 100)) continue;
    out.add(`${parseInt(maj, 16)}:${parseInt(min, 16)}:${ino}`);
  }
  return out;
}

export class ProcLocksProbe implements LockProbe {
  constructor(private readonly procLocks = '/proc/locks') {}

  async held(paths: readonly string[]): Promise<string[] | null> {
    let text: string;
    try {
      text = await readFile(this.procLocks, 'utf8');
    } catch {
      return null;
    }
    const keys = ofdLockedKeys(text);
    const out: string[] = [];
    for (const p of paths) {
      const st = await stat(p).catch(() => null);
      if (!st) continue;
      const [maj, min] = majorMinor(st.dev);
      if (keys.has(`${maj}:${min}:${st.ino}`)) out.push(p);
    }
    return out;
  }
}
