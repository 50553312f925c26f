// Chain safety: the one pre-flight check of every operation that opens a backup chain (rebase
// with any engine, chain delete, chain verify, an incremental's parents), run with our own
// reader before anything else — qemu-img included — opens a layer. Each layer must be a regular
// file inside the VM's folder (checked on the real path before it is opened, so nothing outside
// is ever read), the chain must not loop, and each layer must be sound: no external data file,
// no corrupt bit, a readable header, and L1/L2/refcount tables inside the file. A dirty layer is
// reported, not refused (its refcounts may be stale; qemu-img repairs that on open).
import { readdir, realpath, stat } from 'node:fs/promises';
import type { Stats } from 'node:fs';
import { basename, dirname, isAbsolute, join, resolve } from 'node:path';
import { NasbackupError, type ErrorCode, type Warning } from '../errors.js';
import { isWithin } from '../paths.js';
import {
  isFollowableBackingName,
  MAX_CHAIN_DEPTH,
  resolveBackingName,
  Qcow2Error,
  UNSUPPORTED_CODES,
  type Qcow2ErrorCode,
  hasExternalDataFile,
  INCOMPAT_CORRUPT,
  INCOMPAT_DIRTY,
  readHeader,
  type Qcow2Header,
  scanMetadata,
  checkImage,
  describeCheck,
  type BlockFile,
} from '../qcow2/index.js';

/** unsafe: must never be read or handed on; corrupt: damaged; broken: a layer is missing. */
export type ProblemKind = 'unsafe' | 'corrupt' | 'broken';

export interface ChainProblem {
  kind: ProblemKind;
  /** The layer the problem is in (for a bad backing reference: the layer that holds it). */
  layer: string;
  message: string;
  /** The problem is the layer's backing reference (absolute, outside, not a file name, …). */
  reference: boolean;
}

export interface ChainInspection {
  /** Layers checked, top first (up to the problem). */
  layers: string[];
  problem: ChainProblem | null;
  warnings: Warning[];
}

export interface InspectOptions {
  /**
   * Metadata scans done or running, by dev:ino (shared across the chains of one VM walked at
   * once: a layer is scanned once however many walks reach it).
   */
  scanned?: Map<string, Promise<Qcow2Error | null>>;
  /**
   * Layers (by real path) whose chain was already walked to its end without a problem in this
   * run, with the warnings from that layer down: a walk that reaches one stops there (a VM's
   * chains share their lower layers; without this, verifying n layers walks n²/2). Only clean
   * walks are remembered: a problem is always found by a walk of its own.
   */
  cleanBelow?: Map<string, Warning[]>;
  /**
   * What each layer path was found to be (real path, type, header), shared by the walks of
   * one run: a layer many chains pass through is looked at once (see prefetchLayer()).
   */
  looks?: Map<string, Promise<Look>>;
  /** The VM folder's real path, when the caller resolved it already. */
  realDir?: string;
}

/** One layer as a walk first sees it; what is not looked at (outside, not a file) is left out. */
export interface Look {
  real: string | null;
  st?: Stats;
  header?: Qcow2Header | Qcow2Error;
}

async function lookAt(path: string, realDir: string): Promise<Look> {
  let real: string;
  try {
    real = await realpath(path);
  } catch {
    return { real: null };
  }
  // Nothing outside the VM folder is read, and nothing that could block (a FIFO).
  if (!isWithin(realDir, real, { strict: true })) return { real };
  const st = await stat(real);
  if (!st.isFile()) return { real, st };
  try {
    return { real, st, header: await readHeader(real) };
  } catch (e) {
    if (!(e instanceof Qcow2Error)) throw e;
    return { real, st, header: e };
  }
}

function look(path: string, realDir: string, opts: InspectOptions): Promise<Look> {
  let l = opts.looks?.get(path);
  if (!l) {
    l = lookAt(path, realDir);
    opts.looks?.set(path, l);
  }
  return l;
}

function scan(real: string, key: string, opts: InspectOptions): Promise<Qcow2Error | null> {
  let s = opts.scanned?.get(key);
  if (s === undefined) {
    s = scanMetadata(real).then(
      () => null,
      (e: unknown) => {
        if (!(e instanceof Qcow2Error)) throw e;
        return e;
      },
    );
    opts.scanned?.set(key, s);
  }
  return s;
}

/**
 * Look at the layer `path` and scan its metadata ahead of the walks that will reach it (the
 * same reads a walk makes, no more: nothing outside the VM folder, nothing of a layer the
 * walk would refuse before scanning). With `opts.looks` and `opts.scanned` shared.
 */
export async function prefetchLayer(path: string, realDir: string, opts: InspectOptions): Promise<void> {
  const l = await look(resolve(path), realDir, opts);
  const h = l.header;
  if (!l.st || !h || h instanceof Qcow2Error) return;
  if (hasExternalDataFile(h) || (h.incompatibleFeatures & INCOMPAT_CORRUPT) !== 0n) return;
  await scan(l.real!, `${l.st.dev}:${l.st.ino}`, opts);
}

const UNSAFE_CODES: ReadonlySet<Qcow2ErrorCode> = new Set<Qcow2ErrorCode>([
  'QCOW2_EXTERNAL_DATA_FILE',
  'QCOW2_NOT_A_FILE',
  'QCOW2_CHAIN_CYCLE',
  'QCOW2_CHAIN_UNFOLLOWABLE',
  'QCOW2_CHAIN_TOO_DEEP',
  'QCOW2_BACKING_NAME',
]);

function kindOf(code: Qcow2ErrorCode): ProblemKind {
  if (code === 'QCOW2_CHAIN_MISSING') return 'broken';
  return UNSAFE_CODES.has(code) ? 'unsafe' : 'corrupt';
}

function fileType(st: {
  isDirectory(): boolean;
  isFIFO(): boolean;
  isSocket(): boolean;
  isCharacterDevice(): boolean;
  isBlockDevice(): boolean;
}): string {
  if (st.isDirectory()) return 'a folder';
  if (st.isFIFO()) return 'a FIFO';
  if (st.isSocket()) return 'a socket';
  if (st.isCharacterDevice() || st.isBlockDevice()) return 'a device';
  return 'not a regular file';
}

/**
 * Metadata scans running ahead of the walk: a layer's scan starts once its header passed, and
 * the walk follows its backing reference meanwhile (a deep chain's scans overlap instead of
 * waiting on each other's reads). Their verdicts are taken in walk order, so a walk reports
 * the same first problem as one that awaited each scan before going on.
 */
const SCANS_AHEAD = 4;

/**
 * Layers looked at ahead of the walk, by guess: a backup's parent is, in every chain this
 * program writes, the same file name in an older backup folder, most often the one just
 * before. So while the walk reads one header (to learn its backing), the headers of that file
 * name in the next few older folders are read too; a walk that goes there finds them read.
 * A wrong guess costs a few small reads inside the VM folder (look() reads nothing else, and
 * no header of anything but a regular file).
 */
const LOOKS_AHEAD = 8;

function guessAhead(
  instanceDir: string,
  realDir: string,
  opts: InspectOptions & { looks: Map<string, Promise<Look>> },
): { ahead: (path: string) => void; settle: () => Promise<void> } {
  const inst = resolve(instanceDir);
  let folders: Promise<string[]> | null = null;
  const pending: Promise<unknown>[] = [];
  return {
    ahead(path) {
      if (dirname(dirname(path)) !== inst) return;
      const folder = basename(dirname(path));
      const name = basename(path);
      folders ??= readdir(inst).then(
        (names) => names.filter((n) => !n.startsWith('.')).sort(),
        () => [],
      );
      pending.push(
        folders.then((all) => {
          for (const f of all.filter((x) => x < folder).slice(-LOOKS_AHEAD)) {
            const p = join(inst, f, name);
            if (!opts.looks.has(p)) pending.push(look(p, realDir, opts).catch(() => {})); // the walk awaits it if it goes there
          }
        }),
      );
    },
    async settle() {
      while (pending.length > 0) await Promise.allSettled(pending.splice(0));
    },
  };
}

/** Walk and check the chain of `top`; never throws for what it finds (see `problem`). */
export async function inspectChain(top: string, instanceDir: string, inspect: InspectOptions = {}): Promise<ChainInspection> {
  // The looks are remembered (the guesses fill them), shared when the caller gave its own.
  const opts = { ...inspect, looks: inspect.looks ?? new Map<string, Promise<Look>>() };
  const realDir = opts.realDir ?? (await realpath(instanceDir).catch(() => resolve(instanceDir)));
  const guesses = guessAhead(instanceDir, realDir, opts);
  const scans: Scan[] = [];
  try {
    return await walkChain(top, realDir, guesses.ahead, scans, opts);
  } finally {
    // Nothing of ours is left reading the NAS once the walk returns (it may be unmounted next):
    // neither a guess nor a scan the walk stopped waiting for (those judged are settled already).
    await Promise.allSettled(scans.map((x) => x.scan));
    await guesses.settle();
  }
}

/** A layer's metadata scan started by the walk and not yet judged. */
interface Scan {
  /** The layer's index in the walk. */
  k: number;
  path: string;
  real: string;
  scan: Promise<Qcow2Error | null>;
}

async function walkChain(
  top: string,
  realDir: string,
  ahead: (path: string) => void,
  /** Scans started and not yet judged, in walk order (the caller settles what is left). */
  scans: Scan[],
  opts: InspectOptions & { looks: Map<string, Promise<Look>> },
): Promise<ChainInspection> {
  const layers: string[] = [];
  /** Per walked layer (not one another walk found clean), its real path and its warnings in order (dirty, then metadata not checked). */
  const walked: Array<{ real: string; warnings: Warning[] }> = [];
  /** The warnings of the layers below the one another walk found clean. */
  let below: Warning[] = [];
  const warnings = (): Warning[] => [...walked.flatMap((w) => w.warnings), ...below];
  const done = (p: Omit<ChainProblem, 'reference'> & { reference?: boolean }): ChainInspection => ({
    layers,
    problem: { reference: false, ...p },
    warnings: warnings(),
  });
  const seen = new Set<string>();
  let path = resolve(top);
  let referrer: string | null = null;
  /** The oldest running scan's verdict: a problem ends the walk at that layer. */
  const judgeOne = async (): Promise<ChainInspection | null> => {
    const { k, path: at, real, scan: running } = scans.shift()!;
    const e = await running;
    if (!e) return null;
    // A valid feature our reader does not handle (encryption, …): not scanned, not refused.
    if (UNSUPPORTED_CODES.has(e.code)) {
      walked[k]!.warnings.push({ code: 'METADATA_NOT_CHECKED', message: `${at}: metadata not checked (${stripPath(e.message, real)})` });
      return null;
    }
    // The walk stops here, as if it had waited for this scan before going on.
    layers.length = k + 1;
    walked.length = k + 1;
    below = [];
    return done({ kind: kindOf(e.code), layer: at, message: `${at}: ${stripPath(e.message, real)}` });
  };
  /** Every running scan judged; the first problem among them, if any, comes before the walk's. */
  const judgeAll = async (): Promise<ChainInspection | null> => {
    while (scans.length > 0) {
      const r = await judgeOne();
      if (r) return r;
    }
    return null;
  };
  /** A problem the walk found: the scans of the layers above it are judged first. */
  const stop = async (p: Omit<ChainProblem, 'reference'> & { reference?: boolean }): Promise<ChainInspection> =>
    (await judgeAll()) ?? done(p);
  const clean = async (): Promise<ChainInspection> => {
    const scanned = await judgeAll();
    if (scanned) return scanned;
    walked.forEach((w, k) => opts.cleanBelow?.set(w.real, [...walked.slice(k).flatMap((x) => x.warnings), ...below]));
    return { layers, problem: null, warnings: warnings() };
  };
  for (;;) {
    const via = referrer ? `backing file ${path} of ${referrer}` : path;
    // Where the layer really is, before anything opens it.
    const looking = look(path, realDir, opts);
    ahead(path);
    const l = await looking;
    const real = l.real;
    if (real === null)
      return stop({ kind: 'broken', layer: referrer ?? path, message: `${via} does not exist`, reference: referrer !== null });
    if (!l.st)
      return stop({
        kind: 'unsafe',
        layer: referrer ?? path,
        message: `${via} is outside the VM folder (${real})`,
        reference: referrer !== null,
      });
    const st = l.st;
    if (!st.isFile())
      return stop({
        kind: 'unsafe',
        layer: referrer ?? path,
        message: `${via} is ${fileType(st)}, not a regular file`,
        reference: referrer !== null,
      });
    const cleanFromHere = opts.cleanBelow?.get(real);
    if (cleanFromHere) {
      layers.push(path);
      below = [...cleanFromHere];
      return clean();
    }
    const key = `${st.dev}:${st.ino}`;
    if (seen.has(key)) {
      const self = referrer !== null && layers.at(-1) === referrer && (await realpath(referrer).catch(() => '')) === real;
      return stop({
        kind: 'unsafe',
        layer: referrer ?? path,
        message: self ? `${path} is its own backing file` : `the backing chain loops at ${path}`,
        reference: true,
      });
    }
    seen.add(key);
    layers.push(path);
    const mine: Warning[] = [];
    walked.push({ real, warnings: mine });
    const h = l.header!;
    if (h instanceof Qcow2Error) return stop({ kind: kindOf(h.code), layer: path, message: `${path}: ${stripPath(h.message, real)}` });
    if (hasExternalDataFile(h))
      return stop({ kind: 'unsafe', layer: path, message: `${path} has an external data file (its data lives in another file)` });
    if ((h.incompatibleFeatures & INCOMPAT_CORRUPT) !== 0n)
      return stop({ kind: 'corrupt', layer: path, message: `${path} is marked corrupt (QEMU found damage in it)` });
    if ((h.incompatibleFeatures & INCOMPAT_DIRTY) !== 0n)
      mine.push({
        code: 'IMAGE_DIRTY',
        message: `${path} is marked dirty (not closed cleanly; refcounts may be stale, \`qemu-img check -r all\` repairs them)`,
      });
    // Its scan runs while the walk goes on; a few at most, so memory stays flat with depth.
    if (scans.length >= SCANS_AHEAD) {
      const r = await judgeOne();
      if (r) return r;
    }
    const running = scan(real, key, opts);
    running.catch(() => {}); // judged in turn; one the walk no longer waits for (it stopped above) must not go unhandled
    scans.push({ k: layers.length - 1, path, real, scan: running });
    const name = h.backingFile;
    if (name === null) return clean();
    const ref = (message: string): Promise<ChainInspection> => stop({ kind: 'unsafe', layer: path, message, reference: true });
    if (layers.length >= MAX_CHAIN_DEPTH) return ref(`the backing chain of ${top} is deeper than ${MAX_CHAIN_DEPTH}`);
    if (!isFollowableBackingName(name)) return ref(`${path} has a backing reference that is not a file name: ${name}`);
    if (isAbsolute(name)) return ref(`${path} has an absolute backing name (${name}); chains on the NAS must be relative`);
    if (h.backingFormat !== null && h.backingFormat !== 'qcow2') return ref(`${path} has backing format ${h.backingFormat}, not qcow2`);
    referrer = path;
    path = resolveBackingName(path, name);
  }
}

/** Qcow2 messages start with the file's path; the problem names it already. */
function stripPath(message: string, path: string): string {
  return message.startsWith(`${path}: `) ? message.slice(path.length + 2) : message;
}

const CODES: Record<ProblemKind, ErrorCode> = { unsafe: 'CHAIN_UNSAFE', corrupt: 'CHAIN_CORRUPT', broken: 'CHAIN_BROKEN' };

/** The refusal for a problem: one line naming what and why, and where to look next. */
export function chainRefusal(p: ChainProblem, what: string, vm: string): NasbackupError {
  const why = p.kind === 'corrupt' ? 'is damaged' : p.kind === 'unsafe' ? 'is unsafe to open' : 'is incomplete';
  return new NasbackupError(CODES[p.kind], `${what} ${why}, refusing: ${p.message} (see \`nasbackup chain verify --vm ${vm}\`)`);
}

/**
 * The pre-flight check: throws CHAIN_UNSAFE, CHAIN_CORRUPT or CHAIN_BROKEN (nothing opened
 * outside the VM folder, nothing written). Returns the warnings (a dirty layer). With
 * `missingOk`, a missing layer is left to the caller (whose own message names it).
 */
export async function assertChainSafe(
  top: string,
  instanceDir: string,
  what: string,
  vm: string,
  opts: { missingOk?: boolean } = {},
): Promise<Warning[]> {
  const r = await inspectChain(top, instanceDir);
  if (r.problem && !(opts.missingOk && r.problem.kind === 'broken')) throw chainRefusal(r.problem, what, vm);
  return r.warnings;
}

/** A native-engine error that must stop every engine (damage or an unsafe input), or null. */
export function refusalForQcow2(e: Qcow2Error, what: string, vm: string): NasbackupError | null {
  if (UNSUPPORTED_CODES.has(e.code) || e.code === 'QCOW2_IO' || e.code === 'QCOW2_CRASH_INJECTED' || e.code === 'QCOW2_RANGE') return null;
  return chainRefusal({ kind: kindOf(e.code), layer: e.path ?? '', message: e.message, reference: false }, what, vm);
}

// ---- the structural check ---------------------------------------------------------------

/** The verdict of one file's structural check (refcounts against every reference, entries, header bits). */
export type StructuralCheck =
  | { kind: 'clean'; by: 'native' | 'qemu-img' }
  | { kind: 'leaks'; by: 'native' | 'qemu-img'; message: string }
  | { kind: 'failed'; by: 'native' | 'qemu-img'; message: string };

/** `qemu-img check`, for the images the native check cannot answer for (encrypted ones). */
export type QemuImgCheck = () => Promise<
  { kind: 'clean' } | { kind: 'leaks' } | { kind: 'failed'; exitCode: number | null; message: string }
>;

/**
 * The native check (lib/qcow2/check.ts, qemu-img check's counting); qemu-img only when the native
 * check cannot answer (a valid feature it does not handle: encryption). Never call it on a chain
 * inspectChain() refused. `file`: the image, already open (left open).
 */
export async function structuralCheck(path: string, fallback?: QemuImgCheck, file?: BlockFile): Promise<StructuralCheck> {
  let r;
  try {
    r = await checkImage(path, { maxMessages: 3, ...(file ? { file } : {}) });
  } catch (e) {
    if (!(e instanceof Qcow2Error) || !UNSUPPORTED_CODES.has(e.code) || !fallback) throw e;
    const q = await fallback();
    if (q.kind === 'clean') return { kind: 'clean', by: 'qemu-img' };
    if (q.kind === 'leaks') return { kind: 'leaks', by: 'qemu-img', message: 'qemu-img check: leaked clusters (harmless, space only)' };
    return { kind: 'failed', by: 'qemu-img', message: `qemu-img check failed (exit ${q.exitCode}): ${q.message}` };
  }
  if (r.verdict === 'clean') return { kind: 'clean', by: 'native' };
  if (r.verdict === 'leaks')
    return { kind: 'leaks', by: 'native', message: `structural check: ${r.leaks} leaked cluster(s) (harmless, space only)` };
  const first = r.fatal === null && r.messages.length ? `; first: ${r.messages[0]}` : '';
  return { kind: 'failed', by: 'native', message: `structural check failed: ${describeCheck(r)}${first}` };
}
