// Verify every chain of a VM: backing files present, named relatively, inside the VM
// folder, no cycles, equal virtual sizes, the chain safety check (regular files, no
// external data file, no corrupt bit, tables inside the file; a dirty bit is a warning),
// and the structural check clean (lib/qcow2/check.ts: refcounts against every reference;
// qemu-img check only for what it cannot answer, and never on a chain our reader rejected:
// a FIFO or a loop would hang it). Then content: each layer of a backup with a manifest.json is re-read and its
// digest per extent compared with the manifest (lib/store/layer-digest.ts); a backup
// without one (older than manifests) gets the structural checks only, and says so.
// Per file the order is fixed (its chain walk, then its structural check and content, those two
// at once), and the files are pipelined: one file's data is read while others are walked and checked.
import { realpath } from 'node:fs/promises';
import { basename, join, resolve } from 'node:path';
import { NasbackupError, type Warning } from '../errors.js';
import { NodeBlockFile, type BlockFile } from '../qcow2/index.js';
import { backingFile, insideInstance, type BackupFile, type VmBackups } from './backups.js';
import { inspectChain, prefetchLayer, type ChainProblem, type InspectOptions, type StructuralCheck } from './safety.js';
import type { LayerDigest } from './layer-digest.js';
import { MANIFEST_NAME, partLayout, type DigestSpec, type ExtentDigest, type ManifestDisk, type PartLayout } from './manifest.js';
import { readManifestFile } from './manifest-file.js';

export interface FileReport {
  file: string;
  backing: string | null;
  errors: string[];
  warnings: Warning[];
}

export interface VerifyReport {
  ok: boolean;
  files: FileReport[];
  warnings: Warning[];
}

/** The structural check of one file (lib/store/safety.ts structuralCheck); `file`: the file, already open. */
export type CheckFn = (abs: string, file?: BlockFile) => Promise<StructuralCheck>;

/** The checks of `f`'s backing reference; `refProblem` is what the chain safety check found in it. */
async function checkReference(
  vm: VmBackups,
  f: BackupFile,
  errors: string[],
  refProblem: ChainProblem | null,
  rel: (m: string) => string,
): Promise<void> {
  if (f.backingName === null) return;
  const before = errors.length;
  if (f.backingName.startsWith('/')) errors.push(`backing name is absolute (${f.backingName}); chains on the NAS must be relative`);
  if (f.backingAbs === null) {
    errors.push(`backing reference is not a file name: ${f.backingName}`);
    return;
  }
  if (!insideInstance(vm, f.backingAbs)) errors.push(`backing file is outside the VM folder: ${f.backingName}`);
  if (f.backingFormat !== null && f.backingFormat !== 'qcow2') errors.push(`backing format is ${f.backingFormat}, not qcow2`);
  const parent = await backingFile(vm, f);
  if (parent === null) {
    // Name the real reason (a FIFO, a device, …) when the reader found one.
    const why = refProblem?.kind === 'unsafe' && errors.length === before ? rel(refProblem.message) : null;
    errors.push(why ?? `backing file is missing or not a backup file: ${f.backingName}`);
  } else {
    if (parent.volId !== f.volId) errors.push(`backs onto another volume's file (${parent.backup}/${parent.name})`);
    if (parent.virtualSize !== null && f.virtualSize !== null && parent.virtualSize !== f.virtualSize) {
      errors.push(`virtual size ${f.virtualSize} differs from its backing's ${parent.virtualSize}`);
    }
  }
  // A bad reference the checks above did not name (a loop, …).
  if (refProblem && errors.length === before) errors.push(rel(refProblem.message));
}

export interface ContentOptions {
  /** Backup folders whose content is compared with their manifests. */
  scope: readonly string[];
  digest: DigestFn;
  /** A cancellation point between layers. */
  between?: () => void;
  /** Layers re-read at once (default 2: different files and extents in flight together). */
  layers?: number;
  /** Data bytes compared so far of the total the manifests list (a progress bar). */
  progress?: (done: number, total: number) => void;
  /**
   * Told the data bytes and layers to re-read as soon as every manifest is read (before the
   * chain walks end; the first layers' re-reads may have started): the caller may start its
   * hash workers meanwhile.
   */
  planned?: (bytes: number, layers: number) => void;
  /** Reads a backup folder's manifest (tests: to hold one back). */
  readManifest?: (dir: string) => Promise<ManifestRead>;
}

/** Chain walks at once (each mostly waits for small reads). */
const WALKS = 8;
/** Manifests read at once. */
const MANIFESTS = 8;

/**
 * Every check of every file, pipelined: a file's structural check and the re-read of its
 * content start as soon as its own chain walk has found it sound, while the other walks go
 * on; the lines are put in a fixed order at the end (walk, structure, content), the order
 * they had when the phases ran one after the other.
 */
export async function verifyChains(vm: VmBackups, check: CheckFn, concurrency = 2, content?: ContentOptions): Promise<VerifyReport> {
  const reports = new Map<BackupFile, FileReport>();
  // Shared by the walks: each layer is looked at and scanned once, whatever walks reach it.
  const shared: InspectOptions = {
    scanned: new Map(),
    cleanBelow: new Map(),
    // What discovery read already (real path, stat, header) is not read again.
    looks: new Map([...(vm.looked ?? [])].map(([abs, l]) => [abs, Promise.resolve(l)])),
    realDir: await realpath(vm.instanceDir).catch(() => resolve(vm.instanceDir)),
  };
  // Messages name files relative to the VM folder, as the report does.
  const rel = (m: string): string => m.split(`${vm.instanceDir}/`).join('');
  for (const f of vm.files) {
    const r: FileReport = { file: `${f.backup}/${f.name}`, backing: f.backingName, errors: [], warnings: [] };
    reports.set(f, r);
    if (f.error) r.errors.push(`unreadable header: ${f.error}`);
  }
  // The manifests, read while the chains are walked, then what each file's content is compared with.
  const plan = content ? planContent(vm, reports, readManifests(vm, content), content) : null;
  const structural = new Map<BackupFile, StructuralCheck>();
  const checks = limiter(concurrency);
  const layers = limiter(content?.layers ?? 2);
  // The chain walks, a few at a time; a walk stops at a lower layer another walk found clean,
  // so the VM's files are walked about once. True: the file's chain was refused.
  const walks = limiter(WALKS);
  const walked = new Map<BackupFile, Promise<boolean>>();
  const tasks: Promise<void>[] = [];
  for (const f of vm.files) {
    const w = f.error
      ? Promise.resolve(true)
      : walks(async () => {
          const r = reports.get(f)!;
          await prefetchLayer(f.abs, shared.realDir!, shared);
          const safety = await inspectChain(f.abs, vm.instanceDir, shared);
          for (const w of safety.warnings)
            if (w.message.startsWith(`${f.abs} `) || w.message.startsWith(`${f.abs}:`)) r.warnings.push({ ...w, message: rel(w.message) });
          const p = safety.problem;
          // This file's own damage first; its backing reference is judged by the checks below.
          if (p && p.layer === f.abs && !p.reference) r.errors.push(rel(p.message));
          await checkReference(vm, f, r.errors, p && p.layer === f.abs && p.reference ? p : null, rel);
          // What breaks further down the chain.
          if (p && p.layer !== f.abs) r.errors.push(`chain ${p.kind === 'broken' ? 'unreadable' : p.kind}: ${rel(p.message)}`);
          return p !== null;
        });
    walked.set(f, w);
    tasks.push(
      w.then(async (rejected) => {
        const jobs = plan ? await plan.jobsOf(f) : [];
        // Neither the structural check nor the content of a chain our reader rejected.
        if (rejected) {
          for (const j of jobs) plan!.skip(j);
          return;
        }
        if (jobs.length === 0) {
          structural.set(f, await checks(() => check(f.abs)));
          return;
        }
        // Structure and content through one open file, at once: neither result gates the other
        // (the walk above decided the layer may be read), so the data starts streaming while
        // the check walks the refcounts; the tables one reads first the other gets remembered.
        await layers(async () => {
          // Data past the page cache where the NAS is a local disk (lib/qcow2/io.ts): read once, not kept.
          const opened = await NodeBlockFile.open(f.abs, false, { directReads: true }).catch(() => undefined);
          const file = opened && new RememberedReads(opened);
          try {
            const both = await Promise.allSettled([
              check(f.abs, file).then((s) => void structural.set(f, s)),
              (async (): Promise<void> => {
                for (const j of jobs) await plan!.compare(j, file);
              })(),
            ]);
            // The file is closed only once both readers are done, whatever failed.
            for (const x of both) if (x.status === 'rejected') throw x.reason;
          } finally {
            await file?.close();
          }
        });
      }),
    );
  }
  const settled = await Promise.allSettled([...walked.values(), ...tasks, ...(plan ? [plan.all] : [])]);
  for (const x of settled) if (x.status === 'rejected') throw x.reason;
  const found = plan ? await plan.all : null;

  const files = [...reports.values()];
  const warnings = vm.partials.map((p): Warning => ({
    code: 'UNFINISHED_BACKUP',
    message: `unfinished backup folder of an interrupted run: ${p}`,
  }));
  for (const f of vm.files) {
    const r = reports.get(f)!;
    if (!f.error && (await walked.get(f)))
      r.warnings.push({ code: 'CHECK_SKIPPED', message: 'structural check skipped: the chain failed the checks above' });
    const res = structural.get(f);
    if (res && res.kind === 'leaks') r.warnings.push({ code: 'LEAKED_CLUSTERS', message: res.message });
    else if (res && res.kind === 'failed') r.errors.push(res.message);
  }
  if (found) {
    // Content lines after the file's own, in the manifests' order; then what only a manifest names.
    for (const [r, c] of found.lines) {
      r.errors.push(...c.errors);
      r.warnings.push(...c.warnings);
    }
    files.push(...found.extra);
    warnings.push(...found.warnings);
  }
  return { ok: files.every((f) => f.errors.length === 0), files, warnings };
}

// ---- content: each layer against its backup's manifest ---------------------------------

/** Digests of one layer (lib/store/layer-read.ts), injectable for tests; `onData`: bytes hashed so far; `file`: the layer, already open. */
export type DigestFn = (abs: string, spec: DigestSpec, onData?: (bytes: number) => void, file?: BlockFile) => Promise<LayerDigest>;

/**
 * `extent <n>: digest mismatch` lines, by extent number; with parts (`layout`: the extent and
 * the layer's part size), the first part that differs and how many do.
 */
export function compareExtents(want: readonly ExtentDigest[], got: readonly ExtentDigest[], layout?: PartLayout): string[] {
  const w = new Map(want.map((e) => [e.index, e]));
  const g = new Map(got.map((e) => [e.index, e]));
  const out: string[] = [];
  for (const i of [...new Set([...w.keys(), ...g.keys()])].sort((a, b) => a - b)) {
    const a = w.get(i);
    const b = g.get(i);
    if (a?.digest === b?.digest) continue;
    const where =
      a === undefined
        ? ' (the manifest records nothing there)'
        : b === undefined
          ? ' (the layer holds nothing there now)'
          : partsWhere(a, b, i, layout);
    out.push(`extent ${i}: digest mismatch${where}`);
  }
  return out;
}

/** Which parts of extent `i` differ, when both sides record parts. */
function partsWhere(a: ExtentDigest, b: ExtentDigest, i: number, layout?: PartLayout): string {
  if (!layout || a.parts === undefined || b.parts === undefined) return '';
  const x = Buffer.from(a.parts, 'base64');
  const y = Buffer.from(b.parts, 'base64');
  const n = layout.digestBytes;
  const differ: number[] = [];
  for (let k = 0; k * n < Math.max(x.length, y.length); k++)
    if (!x.subarray(k * n, k * n + n).equals(y.subarray(k * n, k * n + n))) differ.push(k);
  if (differ.length === 0) return '';
  const from = i * layout.extentBytes + differ[0]! * layout.partBytes;
  const to = Math.min(from + layout.partBytes, layout.virtualSize);
  const total = Math.ceil(Math.max(x.length, y.length) / n);
  return ` (part ${differ[0]}, guest bytes ${from}-${to}${differ.length > 1 ? `, and ${differ.length - 1} more` : ''} of ${total} parts)`;
}

type ManifestRead = Awaited<ReturnType<typeof readManifestFile>>;

/** Each backup's manifest in `scope`, a few read at once, in scope order; each usable as soon as it is read. */
function readManifests(vm: VmBackups, content: ContentOptions): Map<string, Promise<ManifestRead>> {
  const go = limiter(MANIFESTS);
  const read = content.readManifest ?? readManifestFile;
  const out = new Map(content.scope.map((backup) => [backup, go(() => read(join(vm.instanceDir, backup)))]));
  for (const p of out.values()) p.catch(() => {}); // each awaited below; a failure before that must not go unhandled
  return out;
}

interface Lines {
  errors: string[];
  warnings: Warning[];
}

interface ContentResult {
  /** Lines for the files' reports, in the order they were found. */
  lines: Map<FileReport, Lines>;
  /** Reports of what only a manifest names (the manifest itself, a listed file that is missing). */
  extra: FileReport[];
  warnings: Warning[];
}

interface Job {
  f: BackupFile;
  d: ManifestDisk;
  r: Lines;
  spec: DigestSpec;
}

/** What one backup's manifest asks for. */
interface BackupPlan {
  extra: FileReport[];
  warnings: Warning[];
  jobs: Map<BackupFile, Job[]>;
}

interface ContentPlan {
  /** The jobs of `f` (one per manifest entry: one, unless a manifest lists a file twice), once its backup's manifest is read. */
  jobsOf(f: BackupFile): Promise<Job[]>;
  /** Every manifest planned: the content lines, once every job is done. */
  all: Promise<ContentResult>;
  /** Compare the layer with its entry (`file`: the layer, already open). */
  compare(j: Job, file?: BlockFile): Promise<void>;
  /** The layer failed the checks above: not re-read. */
  skip(j: Job): void;
}

/**
 * Content proof of the backups in `scope`: every disk file the manifest lists is
 * re-read and its per-extent digests compared; a file not listed, or listed and missing,
 * is a problem too. A backup without a manifest gets a NO_MANIFEST warning. A file's jobs
 * are known once its own backup's manifest is read (the re-read of the first layers does
 * not wait for the last manifests); the totals (`planned`, progress) once all are.
 */
function planContent(
  vm: VmBackups,
  reports: ReadonlyMap<BackupFile, FileReport>,
  read: Map<string, Promise<ManifestRead>>,
  opts: ContentOptions,
): ContentPlan {
  const between = opts.between ?? ((): void => {});
  const lines = new Map<FileReport, Lines>();
  const linesOf = (r: FileReport): Lines => {
    let l = lines.get(r);
    if (!l) lines.set(r, (l = { errors: [], warnings: [] }));
    return l;
  };
  let total = 0;
  let done = 0;
  /** Progress is told from the moment every manifest is planned (the bar starts at 0 of the total). */
  let told = false;
  const tell = (): void => {
    if (told) opts.progress?.(Math.min(done, total), total);
  };
  const instance = basename(vm.instanceDir);
  const planBackup = (backup: string, m: ManifestRead): BackupPlan => {
    const p: BackupPlan = { extra: [], warnings: [], jobs: new Map() };
    const reportOf = new Map<string, FileReport>();
    const report = (file: string): FileReport => {
      let r = reportOf.get(file);
      if (!r) {
        r = { file, backing: null, errors: [], warnings: [] };
        reportOf.set(file, r);
        p.extra.push(r);
      }
      return r;
    };
    if (m === null) {
      p.warnings.push({ code: 'NO_MANIFEST', message: `${backup}: no manifest: structural checks only` });
      return p;
    }
    if ('error' in m) {
      report(`${backup}/${MANIFEST_NAME}`).errors.push(m.error);
      return p;
    }
    if (m.path !== `${instance}/${backup}`)
      report(`${backup}/${MANIFEST_NAME}`).errors.push(`the manifest is of another backup (${m.path})`);
    const files = vm.files.filter((f) => f.backup === backup);
    for (const f of files) if (!m.disks.some((d) => d.file === f.name)) linesOf(reports.get(f)!).errors.push(`not listed in the manifest`);
    for (const d of m.disks) {
      between();
      const f = files.find((x) => x.name === d.file);
      if (!f) {
        report(`${backup}/${d.file}`).errors.push('listed in the manifest but missing');
        continue;
      }
      let js = p.jobs.get(f);
      if (!js) p.jobs.set(f, (js = []));
      js.push({ f, d, r: linesOf(reports.get(f)!), spec: m.digest });
      total += d.dataBytes;
    }
    return p;
  };
  // Each backup planned once, when its manifest is read (in whatever order the files ask).
  const plans = new Map<string, Promise<BackupPlan>>();
  for (const [backup, m] of read)
    plans.set(
      backup,
      m.then((x) => planBackup(backup, x)),
    );
  for (const p of plans.values()) p.catch(() => {}); // awaited below
  const all = Promise.all(opts.scope.map((b) => plans.get(b)!)).then((ps): ContentResult => {
    const out: ContentResult = { lines, extra: [], warnings: [] };
    // In the manifests' order, whatever order they were read in.
    for (const p of ps) {
      out.extra.push(...p.extra);
      out.warnings.push(...p.warnings);
    }
    opts.planned?.(
      total,
      ps.reduce((n, p) => n + [...p.jobs.values()].reduce((k, js) => k + js.length, 0), 0),
    );
    told = true;
    opts.progress?.(0, total);
    if (done > 0) tell();
    return out;
  });
  all.catch(() => {}); // awaited by the caller
  const onData = opts.progress
    ? (n: number): void => {
        done += n;
        tell();
      }
    : undefined;
  return {
    async jobsOf(f): Promise<Job[]> {
      const p = plans.get(f.backup);
      return p ? ((await p).jobs.get(f) ?? []) : [];
    },
    all,
    skip({ d, r }): void {
      r.warnings.push({ code: 'CHECK_SKIPPED', message: 'content not compared with the manifest: the layer failed the checks above' });
      total -= d.dataBytes;
      tell();
    },
    async compare({ f, d, r, spec }, file): Promise<void> {
      if (f.virtualSize !== null && f.virtualSize !== BigInt(d.virtualSize))
        r.errors.push(`virtual size ${f.virtualSize}, the manifest says ${d.virtualSize}`);
      if (f.backingName !== d.backing) r.errors.push(`backing ${f.backingName ?? 'none'}, the manifest says ${d.backing ?? 'none'}`);
      between();
      let got: LayerDigest;
      try {
        got = await opts.digest(f.abs, spec, onData, file);
      } catch (e) {
        if (e instanceof NasbackupError) throw e; // a stop (signal) from the cancellation point
        r.errors.push(`content unreadable: ${(e as Error).message.split(`${vm.instanceDir}/`).join('')}`);
        return;
      }
      r.errors.push(...compareExtents(d.extents, got.extents, partLayout(spec, d)));
    },
  };
}

/**
 * One open layer read by the structural check, then by the re-read: the small reads (header,
 * L1, L2 and refcount tables) are remembered, up to a budget, so the second reader gets the
 * same bytes without asking the OS again; data reads pass through. Read-only.
 */
class RememberedReads implements BlockFile {
  private readonly seen = new Map<string, Buffer>();
  private kept = 0;
  private sized: Promise<number> | null = null;
  constructor(private readonly inner: BlockFile) {}
  get path(): string {
    return this.inner.path;
  }
  async read(buf: Buffer, offset: number, length: number, position: number): Promise<number> {
    const key = `${position}:${length}`;
    const hit = this.seen.get(key);
    if (hit) return hit.copy(buf, offset);
    const n = await this.inner.read(buf, offset, length, position);
    if (length <= REMEMBER_READ_BYTES && this.kept + n <= REMEMBER_BYTES) {
      this.seen.set(key, Buffer.from(buf.subarray(offset, offset + n)));
      this.kept += n;
    }
    return n;
  }
  size(): Promise<number> {
    return (this.sized ??= this.inner.size());
  }
  write(): Promise<void> {
    return Promise.reject(new Error('read-only'));
  }
  datasync(): Promise<void> {
    return Promise.reject(new Error('read-only'));
  }
  close(): Promise<void> {
    return this.inner.close();
  }
}
const REMEMBER_READ_BYTES = 64 << 10;
const REMEMBER_BYTES = 1 << 20;

/** Runs the tasks given to it, at most `n` at once, in the order given. */
function limiter(n: number): <T>(task: () => Promise<T>) => Promise<T> {
  let running = 0;
  const waiting: Array<() => void> = [];
  return async <T>(task: () => Promise<T>): Promise<T> => {
    if (running >= n) await new Promise<void>((go) => waiting.push(go));
    else running++;
    try {
      return await task();
    } finally {
      const go = waiting.shift();
      if (go) go();
      else running--;
    }
  };
}
