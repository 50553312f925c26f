// Tree snapshots with the same facts as the fixtures' nasAfter/primaryAfter entries:
// type, mode, text/sha256 of small files, and for qcow2 files what qemu-img reports
// (header facts, resolved chain, guest-visible content hash, top-layer data, check).
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { lstatSync, readdirSync, readFileSync, readlinkSync, rmSync, openSync, readSync, closeSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { RUN, type Entry } from './fixture.js';
import { normText } from './normalize.js';
import { REAL } from './sandbox.js';

interface Out {
  code: number;
  stdout: string;
  stderr: string;
}

function qemuImg(args: string[]): Promise<Out> {
  return new Promise((res) => {
    execFile(REAL.qemuImg, args, { encoding: 'utf8', maxBuffer: 16 << 20 }, (err, stdout, stderr) => {
      const code = err ? (typeof (err as { code?: unknown }).code === 'number' ? (err as { code: number }).code : 1) : 0;
      res({ code, stdout, stderr });
    });
  });
}

const mode = (m: number): string => (m & 0o7777).toString(8).padStart(4, '0');
const errLine = (o: Out): string => normText(o.stderr.trim());

function isQcow2(path: string): boolean {
  const fd = openSync(path, 'r');
  try {
    const b = Buffer.alloc(4);
    return readSync(fd, b, 0, 4, 0) === 4 && b.equals(Buffer.from([0x51, 0x46, 0x49, 0xfb]));
  } finally {
    closeSync(fd);
  }
}

function fileEntry(rel: string, abs: string, st: { size: number; mode: number }): Entry {
  const data = readFileSync(abs);
  const e: Entry = { path: rel, type: 'file', size: st.size, mode: mode(st.mode), sha256: createHash('sha256').update(data).digest('hex') };
  if (data.length <= 16384) {
    try {
      const text = new TextDecoder('utf-8', { fatal: true }).decode(data);
      const n = normText(text);
      e.text = n;
      if (n !== text) {
        e.sha256 = createHash('sha256').update(n).digest('hex');
        e.sha256OfNormalizedText = true;
      }
    } catch {
      // binary: sha256 only
    }
  }
  return e;
}

let scratchSeq = 0;

/** The backing file name in a qcow2 header (offset 8: u64 offset, offset 16: u32 length), or null. */
function backingName(path: string): string | null {
  const fd = openSync(path, 'r');
  try {
    const h = Buffer.alloc(20);
    if (readSync(fd, h, 0, 20, 0) < 20) return null;
    const off = Number(h.readBigUInt64BE(8));
    const len = h.readUInt32BE(16);
    if (off === 0 || len === 0 || len > 4096) return null;
    const b = Buffer.alloc(len);
    readSync(fd, b, 0, len, off);
    return b.toString('utf8');
  } finally {
    closeSync(fd);
  }
}

/**
 * What the qemu-img facts of a file depend on: its path, its bytes, and the same for
 * each file of its backing chain. Equal keys, equal facts (fixtures share recipes).
 */
function factsKey(abs: string, depth = 0): string {
  let data: Buffer;
  try {
    data = readFileSync(abs);
  } catch {
    return `${abs}:missing`;
  }
  const own = `${abs}:${createHash('sha256').update(data).digest('hex')}`;
  const b = depth < 64 && data.subarray(0, 4).equals(Buffer.from([0x51, 0x46, 0x49, 0xfb])) ? backingName(abs) : null;
  return b === null ? own : `${own}>${factsKey(resolve(dirname(abs), b), depth + 1)}`;
}

const factsCache = new Map<string, Omit<Entry, 'path' | 'type' | 'size' | 'mode'>>();

async function qcow2Entry(rel: string, abs: string, st: { size: number; mode: number }): Promise<Entry> {
  const key = factsKey(abs);
  let facts = factsCache.get(key);
  if (!facts) {
    facts = await qcow2Facts(abs);
    factsCache.set(key, facts);
  }
  return { path: rel, type: 'qcow2', size: st.size, mode: mode(st.mode), ...structuredClone(facts) };
}

async function qcow2Facts(abs: string): Promise<Omit<Entry, 'path' | 'type' | 'size' | 'mode'>> {
  const e: Omit<Entry, 'path' | 'type' | 'size' | 'mode'> = {};
  const info = await qemuImg(['info', '--output=json', '-U', abs]);
  if (info.code === 0) {
    const j = JSON.parse(info.stdout) as Record<string, unknown>;
    const data = ((j['format-specific'] as { data?: Record<string, unknown> } | undefined)?.data ?? {}) as {
      bitmaps?: Array<{ name: string }>;
      corrupt?: boolean;
    };
    e.format = j.format as string;
    e.virtualSize = j['virtual-size'] as number;
    e.backingFilename = (j['backing-filename'] as string | undefined) ?? null;
    e.backingFilenameFormat = (j['backing-filename-format'] as string | undefined) ?? null;
    e.bitmaps = (data.bitmaps ?? []).map((b) => b.name);
    e.corrupt = data.corrupt ?? false;
    if (e.backingFilename) {
      const chain = await qemuImg(['info', '--output=json', '-U', '--backing-chain', abs]);
      if (chain.code === 0) {
        const layers = JSON.parse(chain.stdout) as Array<{ filename: string }>;
        e.backingChain = layers.slice(1).map((l) => normText(resolve(dirname(abs), l.filename)));
      } else {
        e.backingChainError = errLine(chain);
      }
    } else {
      e.backingChain = [];
    }
  } else {
    e.infoError = errLine(info);
  }
  const raw = join(RUN, `content-${process.pid}-${scratchSeq++}.raw`);
  const conv = await qemuImg(['convert', '-U', '-O', 'raw', abs, raw]);
  if (conv.code === 0) {
    e.contentSha256 = createHash('sha256').update(readFileSync(raw)).digest('hex');
  } else {
    e.contentSha256 = null;
    e.contentError = errLine(conv);
  }
  rmSync(raw, { force: true });
  if (info.code === 0) {
    const spec = JSON.stringify({ driver: 'qcow2', backing: null, file: { driver: 'file', filename: abs } });
    const map = await qemuImg(['map', '--output=json', '-U', `json:${spec}`]);
    if (map.code === 0) {
      const ranges: Array<[number, number]> = [];
      for (const m of JSON.parse(map.stdout) as Array<{ start: number; length: number; depth: number; data: boolean }>) {
        if (m.depth !== 0 || !m.data) continue;
        const last = ranges.at(-1);
        if (last && last[0] + last[1] === m.start) last[1] += m.length;
        else ranges.push([m.start, m.length]);
      }
      e.topLayerData = ranges;
    }
  }
  const check = await qemuImg(['check', '--output=json', '-U', abs]);
  try {
    const j = JSON.parse(check.stdout) as Record<string, number>;
    e.check = { exitCode: check.code, checkErrors: j['check-errors'] ?? 0, corruptions: j.corruptions ?? 0, leaks: j.leaks ?? 0 };
  } catch {
    e.check = { exitCode: check.code, error: errLine(check) };
  }
  return e;
}

/** Snapshot of a tree, entries sorted by path (byte order), like the fixtures'. */
export async function snapshotTree(root: string): Promise<Entry[]> {
  const jobs: Array<Promise<Entry>> = [];
  const walk = (rel: string): void => {
    const abs = rel ? join(root, rel) : root;
    for (const name of readdirSync(abs)) {
      const r = rel ? `${rel}/${name}` : name;
      const p = join(root, r);
      const st = lstatSync(p);
      if (st.isSymbolicLink())
        jobs.push(Promise.resolve({ path: r, type: 'link', mode: mode(st.mode), target: normText(readlinkSync(p)) }));
      else if (st.isDirectory()) {
        jobs.push(Promise.resolve({ path: r, type: 'dir', mode: mode(st.mode) }));
        walk(r);
      } else if (st.isFile()) {
        jobs.push(isQcow2(p) ? qcow2Entry(r, p, st) : Promise.resolve(fileEntry(r, p, st)));
      } else jobs.push(Promise.resolve({ path: r, type: 'other', mode: mode(st.mode) }));
    }
  };
  walk('');
  const entries = await Promise.all(jobs);
  return entries.sort((a, b) => Buffer.compare(Buffer.from(a.path), Buffer.from(b.path)));
}
