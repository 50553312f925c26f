// Replay of one fixture: reset and seed the sandbox, start the fake host, run
// bin/nasbackup with the fixture's argv, and collect everything the comparison needs.
import { spawn } from 'node:child_process';
import { cpSync, existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  CWD,
  GOLDEN_ROOT,
  NAS,
  PRIMARY,
  RUN,
  SCRIPT_NAME,
  TMP,
  resolvePaths,
  type Entry,
  type Fixture,
  type Leftovers,
} from './fixture.js';
import { FakeHost, type OurCall } from './fakes/host.js';
import { ShimServer } from './fakes/server.js';
import type { ArgvRule } from './normalize.js';
import { clearLeftovers, leftovers, mountsUnder, resetSandbox, seed } from './sandbox.js';
import { snapshotTree } from './snapshot.js';

export const BIN = fileURLToPath(new URL('../../bin/nasbackup', import.meta.url));
export const LOG_FILE = join(RUN, 'agent.log');
/** The log's first line before the run: it must still be there afterwards (append only). */
export const LOG_SENTINEL = 'golden-replay: log content from before the run';

/** NASBACKUP_GOLDEN_KEEP=1: keep the sandbox and each scenario's stdout, log and calls in runs/<name>/. */
export const KEEP = process.env.NASBACKUP_GOLDEN_KEEP === '1';
export const RUNS = join(GOLDEN_ROOT, 'runs');

/** A run may take this long before it counts as hung (the original's timeouts are not replayed). */
const HANG_SECONDS = 30;

export interface Outcome {
  exitCode: number | null;
  signal: string | null;
  timedOut: boolean;
  stdout: string;
  stderr: string;
  /** The log file after the run, sentinel line included. */
  log: string;
  calls: OurCall[];
  nasAfter: Entry[];
  primaryAfter: Entry[];
  checkpoints: Record<string, string[]>;
  shimMounts: Array<{ source: string; target: string; type: string; options: string }>;
  leftovers: Leftovers;
  ms: number;
  /** Where the time went: seeding, the program run, the snapshots. */
  phases: { seed: number; run: number; snapshot: number };
}

/** The program's environment: the fixture's, with our shims, sandbox TMPDIR and fast job polling. */
function programEnv(fx: Fixture, shims: string): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(fx.environment)) {
    if (v === null || ['umask', 'cwd', 'stdin', 'TMPDIR'].includes(k)) continue;
    env[k] = v;
  }
  env.PATH = (env.PATH ?? '<SHIMS>:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin').replace('<SHIMS>', shims);
  return {
    ...env,
    TMPDIR: TMP,
    NASBACKUP_LOG_FILE: LOG_FILE,
    NASBACKUP_SCRIPT_NAME: SCRIPT_NAME,
    NASBACKUP_JOB_POLL_INITIAL: '0.01',
    NASBACKUP_JOB_POLL_MAX: '0.05',
    NASBACKUP_JOB_TIMEOUT: '1',
    NASBACKUP_UMOUNT_RETRY_DELAY: '0.05',
  };
}

export async function replay(fx: Fixture, argvRules: readonly ArgvRule[]): Promise<Outcome> {
  const t0 = Date.now();
  await resetSandbox();
  await seed(fx);
  const t1 = Date.now();
  writeFileSync(LOG_FILE, `${LOG_SENTINEL}\n`);
  const host = new FakeHost(fx, argvRules);
  const server = new ShimServer(host, RUN, join(RUN, 'calls.jsonl'));
  const shims = await server.start();

  const child = spawn(process.execPath, [BIN, ...resolvePaths(fx.argv)], {
    cwd: CWD,
    env: programEnv(fx, shims),
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stdout = '';
  let stderr = '';
  child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
  child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    child.kill('SIGKILL');
  }, HANG_SECONDS * 1000);
  const [exitCode, signal] = await new Promise<[number | null, string | null]>((res) => child.on('close', (c, s) => res([c, s])));
  clearTimeout(timer);
  await server.stop();
  const t2 = Date.now();

  const stillMounted = new Set(mountsUnder(TMP));
  const out: Outcome = {
    exitCode: timedOut ? null : exitCode,
    signal,
    timedOut,
    stdout,
    stderr,
    log: existsSync(LOG_FILE) ? readFileSync(LOG_FILE, 'utf8') : '',
    calls: host.calls,
    nasAfter: [],
    primaryAfter: [],
    checkpoints: host.checkpoints(),
    shimMounts: host.shimMounts((t) => stillMounted.has(t)),
    leftovers: leftovers(),
    ms: 0,
    phases: { seed: t1 - t0, run: t2 - t1, snapshot: 0 },
  };
  // The fixtures' nasAfter was taken after the recorder unmounted leftovers.
  await clearLeftovers();
  [out.nasAfter, out.primaryAfter] = await Promise.all([snapshotTree(NAS), snapshotTree(PRIMARY)]);
  if (KEEP) {
    const dir = join(RUNS, fx.name);
    rmSync(dir, { recursive: true, force: true });
    mkdirSync(dir, { recursive: true });
    for (const f of ['agent.log', 'calls.jsonl']) if (existsSync(join(RUN, f))) cpSync(join(RUN, f), join(dir, f));
    writeFileSync(join(dir, 'stdout'), stdout);
    writeFileSync(join(dir, 'stderr'), stderr);
    writeFileSync(join(dir, 'exit'), `${out.exitCode ?? 'timeout'}\n`);
  }
  out.ms = Date.now() - t0;
  out.phases.snapshot = Date.now() - t2;
  return out;
}
