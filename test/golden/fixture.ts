// The golden fixtures (schema nasbackup-golden/1, see test/golden/fixtures/README.md):
// types, loading, and the fixed sandbox paths a replay uses.
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

/** Fixed sandbox, as the fixtures recommend: virsh table widths depend on these path lengths. */
export const GOLDEN_ROOT = '/tmp/nasbackup-golden';
export const NAS = `${GOLDEN_ROOT}/nas`;
export const PRIMARY = `${GOLDEN_ROOT}/primary`;
/** TMPDIR of the program: its mount points are `${TMP}/csbackup.XXXXX`. */
export const TMP = `${GOLDEN_ROOT}/tmp`;
export const CWD = `${GOLDEN_ROOT}/cwd`;
/** Shims, the program's log, captured call outputs, scratch files. */
export const RUN = `${GOLDEN_ROOT}/run`;
/** What the program is told its own path is ($0 of the original, `<SCRIPT>` in fixtures). */
export const SCRIPT_NAME = '/usr/share/cloudstack-common/scripts/vm/hypervisor/kvm/nasbackup.sh';

export const PROJECT_FIXTURES = fileURLToPath(new URL('./fixtures', import.meta.url));
/** Fixtures we wrote ourselves, in the recorded shape, for kinds the recordings lack (see its README). */
export const EXTRA_FIXTURES = fileURLToPath(new URL('./extra-fixtures', import.meta.url));

export interface Annotation {
  line: number;
  count: number;
  kind: string;
  rule?: string;
  literal?: string;
  seq?: number;
  cmd?: string;
  stream?: 'stdout' | 'stderr';
  of?: string;
  components?: Array<{ path: string; bytes: number }>;
  entry?: string;
  fromCall?: number;
}

export interface TextBlock {
  text: string;
  lines: string[];
  endsWithNewline: boolean;
  annotations: Annotation[];
}

export interface Effect {
  op: string;
  [k: string]: unknown;
}

export interface RecordedCall {
  seq: number;
  cmd: string;
  kind: string;
  argv: string[];
  stdout: string;
  stderr: string;
  exitCode: number;
  effects?: Effect[];
}

export interface Write {
  pattern: string;
  offset: number;
  length: number;
}

export interface HostDisk {
  type: string;
  device: string;
  target: string;
  source: string;
  virtualSize?: number;
  writes?: Write[];
  dirty?: Write[];
  bitmaps?: string[];
  seed?: boolean;
}

export interface HostInterface {
  name: string;
  type: string;
  source: string;
  model: string;
  mac: string;
}

export type JobStep = 'None' | 'Completed' | 'Failed' | { error: string };

export interface HostDomain {
  name: string;
  id: number;
  uuid: string;
  state: string;
  vcpus: number;
  memoryKiB: number;
  disks: HostDisk[];
  interfaces: HostInterface[];
  checkpoints: string[];
  job?: { sequence: JobStep[]; timeElapsedMs?: number; errorMessage?: string };
  agent?: Record<string, { return?: unknown; error?: string }>;
  backupBegin?: { error: string };
  checkpointCreate?: Array<{ error?: string; ok?: boolean }>;
}

export interface HostVersion {
  compiledAgainst: string;
  library: string;
  api: string;
  hypervisor: string;
}

export interface Host {
  virsh: { version: HostVersion; connectError?: { stderr: string; exitCode: number } };
  domains: HostDomain[];
  nas: {
    exports: Record<string, string>;
    df: { blocks1k: number; used1k: number };
    mountFailure?: { stderr: string; exitCode: number };
  };
}

export type NasStep =
  | { op: 'qcow2'; path: string; virtualSize: number; backing?: { file: string; format: string }; writes?: Write[] }
  | { op: 'file'; path: string; content: string }
  | { op: 'dir'; path: string }
  | { op: 'remove'; path: string }
  | { op: 'poke'; path: string; offset: number; hex: string };

/** One snapshot entry (tree facts). Extra keys are compared only when present on both sides. */
export interface Entry {
  path: string;
  type: 'dir' | 'file' | 'qcow2' | 'link' | 'other';
  mode: string;
  size?: number;
  sha256?: string;
  text?: string;
  sha256OfNormalizedText?: boolean;
  target?: string;
  format?: string;
  virtualSize?: number;
  backingFilename?: string | null;
  backingFilenameFormat?: string | null;
  bitmaps?: string[];
  corrupt?: boolean;
  backingChain?: string[];
  contentSha256?: string | null;
  contentError?: string;
  topLayerData?: Array<[number, number]>;
  check?: { exitCode: number; checkErrors?: number; corruptions?: number; leaks?: number; error?: string };
  infoError?: string;
  backingChainError?: string;
}

export interface Leftovers {
  mounts: string[];
  tempDirs: string[];
  detail: Record<string, { mounted: boolean; entries: string[] }>;
}

export interface Fixture {
  schema: string;
  name: string;
  group: 'rebase' | 'delete' | 'stats' | 'backup-running' | 'backup-stopped' | 'general';
  description: string;
  argv: string[];
  timeoutSeconds: number;
  keepCallsOnTimeout?: number;
  environment: Record<string, string | null>;
  host: Host;
  nas: { root: string; steps: NasStep[] };
  nasBefore: Entry[];
  primaryBefore: Entry[];
  expect: {
    exitCode: number | null;
    signal: string | null;
    timedOut: boolean;
    stdout: TextBlock;
    stderr: TextBlock;
    log: TextBlock;
    calls: RecordedCall[];
    callsTruncated: boolean;
    nasAfter: Entry[];
    primaryAfter: Entry[];
    hostAfter: {
      checkpoints: Record<string, string[]>;
      shimMounts: Array<{ source: string; target: string; type: string; options: string }>;
    };
    leftovers: Leftovers;
  };
}

/** Fixtures from one folder, sorted by name. */
export function loadFixtureDir(dir: string): Fixture[] {
  return readdirSync(dir)
    .filter((f) => f.endsWith('.json'))
    .sort()
    .map((f) => {
      const fx = JSON.parse(readFileSync(join(dir, f), 'utf8')) as Fixture;
      if (fx.schema !== 'nasbackup-golden/1') throw new Error(`${f}: unsupported schema ${fx.schema}`);
      return fx;
    });
}

/**
 * The fixtures a run replays: NASBACKUP_GOLDEN_DIR alone when set, otherwise the
 * recorded ones and our extra ones. `dirs` overrides both.
 */
export function loadFixtures(...dirs: string[]): Fixture[] {
  const from = dirs.length
    ? dirs
    : process.env.NASBACKUP_GOLDEN_DIR
      ? [process.env.NASBACKUP_GOLDEN_DIR]
      : [PROJECT_FIXTURES, EXTRA_FIXTURES];
  return from.flatMap(loadFixtureDir);
}

/** `<NAS>`/`<PRIMARY>` → sandbox paths (argv, host and nas keep them unresolved). */
export function resolvePaths<T>(value: T): T {
  return JSON.parse(JSON.stringify(value).replaceAll('<NAS>', NAS).replaceAll('<PRIMARY>', PRIMARY)) as T;
}

/** Short and long spellings of the original's flags (a flag is looked up by either). */
const ALIASES: ReadonlyArray<[string, string]> = [
  ['-o', '--operation'],
  ['-v', '--vm'],
  ['-t', '--type'],
  ['-s', '--storage'],
  ['-m', '--mount'],
  ['-p', '--path'],
  ['-q', '--quiesce'],
  ['-d', '--diskpaths'],
  ['-M', '--mode'],
  ['-h', '--help'],
  ['-c', '--compress'],
  ['-b', '--bandwidth'],
  ['-e', '--encrypt'],
  ['-w', '--mount-timeout'],
];

/** Flags the original script takes a value for (each consumes the next argv element). */
export const ORIGINAL_VALUE_FLAGS = new Set([
  ...ALIASES.slice(0, 9).flat(),
  '--bitmap-new',
  '--bitmap-parent',
  '--parent-paths',
  '--rebase-target',
  '--rebase-new-backing',
]);

/** Every value flag a fixture argv may hold: the original's and the later upstream ones. */
const VALUE_FLAGS = new Set([
  ...ORIGINAL_VALUE_FLAGS,
  '--parent-path',
  '-b',
  '--bandwidth',
  '-e',
  '--encrypt',
  '-w',
  '--mount-timeout',
  '--quiesce-timeout',
]);

const spellings = (flag: string): string[] => ALIASES.find((a) => a.includes(flag)) ?? [flag];

/**
 * Value of a flag in the fixture argv (`-p`, `--bitmap-new`, …; short or long spelling),
 * or undefined when absent. Read like the original's loop: every value flag consumes the
 * next element, and a flag given twice keeps its last value.
 */
export function argValue(argv: readonly string[], ...flags: string[]): string | undefined {
  const want = new Set(flags.flatMap(spellings));
  let v: string | undefined;
  for (let i = 0; i < argv.length; i++) {
    if (!VALUE_FLAGS.has(argv[i]!)) continue;
    if (want.has(argv[i]!) && i + 1 < argv.length) v = argv[i + 1];
    i++;
  }
  return v;
}

/** Whether a flag (either spelling) is present at all, as a flag. */
export function hasFlag(argv: readonly string[], flag: string): boolean {
  const want = new Set(spellings(flag));
  for (let i = 0; i < argv.length; i++) {
    if (want.has(argv[i]!)) return true;
    if (VALUE_FLAGS.has(argv[i]!)) i++;
  }
  return false;
}

/** The backed-up VM's domain in `host` (the one named by -v). */
export function targetDomain(fx: Fixture): HostDomain | undefined {
  const vm = argValue(fx.argv, '-v', '--vm');
  return fx.host.domains.find((d) => d.name === vm);
}
