// Issue 15.9 (log part): a log that cannot be written must never block or fail an
// operation. A log under /proc made Node's recursive mkdir spin forever (40 % CPU, and
// SIGTERM never handled: the loop is synchronous); a FIFO without a reader blocked on
// open. Each case: -o stats still answers exactly as with a good log, by itself, at once
// (a 30 s guard kills a hung run and fails the test), and the bad log path is left as it was.
import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync, lstatSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { bindNas, leftovers, makeSandbox, run, type RunOutcome, type Sandbox } from '../helpers/cli.js';
import { removeTempDirs } from '../helpers/tmp.js';
import { startGroup } from './harness.js';

const mounted: string[] = [];
afterAll(() => {
  for (const m of mounted.reverse()) execFileSync('umount', [m]);
  removeTempDirs();
});

let sb: Sandbox;
/** What -o stats prints (mount point, then used and available bytes, which vary). */
const STATS = /^\S+\/csbackup\.\w{5}\n\d+ \d+\n$/;

beforeAll(async () => {
  sb = makeSandbox('sec-log');
  mkdirSync(join(sb.nas, 'i-2-18-VM', '2025.08.01.00.00.00'), { recursive: true });
  const good = await run(sb, ['-o', 'stats', ...bindNas(sb)]);
  expect(good.code).toBe(0);
  expect(good.stdout).toMatch(STATS);
});

/** Run with this log path; a run still going after 30 s is killed (and fails the test). */
async function runWithLog(logFile: string): Promise<RunOutcome & { hung: boolean }> {
  const { child, done } = startGroup(sb, ['-o', 'stats', ...bindNas(sb)], { NASBACKUP_LOG_FILE: logFile });
  let hung = false;
  const guard = setTimeout(() => {
    hung = true;
    process.kill(-child.pid!, 'SIGKILL');
  }, 30_000);
  const r = await done;
  clearTimeout(guard);
  return { ...r, hung };
}

function expectUnaffected(r: RunOutcome & { hung: boolean }): void {
  expect(r.hung, 'the run hung on its log').toBe(false);
  expect(r).toMatchObject({ code: 0, signal: null });
  expect(r.stdout).toMatch(STATS);
  expect(leftovers(sb)).toEqual({ dirs: [], mounts: [] });
}

function mountTmpfs(dir: string, options: string): void {
  mkdirSync(dir, { recursive: true });
  execFileSync('mount', ['-t', 'tmpfs', '-o', options, 'nbtest-log', dir]);
  mounted.push(dir);
}

describe('a log that cannot be written', () => {
  it('under /proc (a recursive mkdir there never ends): the operation runs as usual', async () => {
    expectUnaffected(await runWithLog('/proc/nope/x.log'));
    expect(existsSync('/proc/nope')).toBe(false);
  }, 60_000);

  it('a FIFO nobody reads: not waited for, nothing written into it', async () => {
    const fifo = join(sb.root, 'agent.fifo');
    execFileSync('mkfifo', [fifo]);
    expectUnaffected(await runWithLog(fifo));
    expect(lstatSync(fifo).isFIFO()).toBe(true);
  }, 60_000);

  it('a FIFO that someone reads: still not written (a reader that stops reading would block us)', async () => {
    const fifo = join(sb.root, 'agent-read.fifo');
    execFileSync('mkfifo', [fifo]);
    const { spawn } = await import('node:child_process');
    const reader = spawn('cat', [fifo], { stdio: ['ignore', 'pipe', 'ignore'] });
    let got = '';
    reader.stdout.on('data', (d: Buffer) => (got += d.toString()));
    const closed = new Promise((r) => reader.on('close', r));
    try {
      expectUnaffected(await runWithLog(fifo));
    } finally {
      reader.kill('SIGKILL');
      await closed;
    }
    expect(got).toBe('');
  }, 60_000);

  it('on a read-only filesystem, on a full one, below a file, and a folder as the log: the operation runs as usual', async () => {
    const ro = join(sb.root, 'ro');
    mountTmpfs(ro, 'size=1m,ro');
    const full = join(sb.root, 'full');
    mountTmpfs(full, 'size=64k');
    // Fill it up (dd stops with ENOSPC).
    spawnSync('dd', ['if=/dev/zero', `of=${join(full, 'filler')}`, 'bs=4k', 'count=64', 'status=none'], { stdio: 'ignore' });
    expect(() => writeFileSync(join(full, 'probe'), 'x'.repeat(8192))).toThrow(/ENOSPC/);
    writeFileSync(join(sb.root, 'plain-file'), 'x');
    mkdirSync(join(sb.root, 'a-folder.log'));
    for (const log of [
      join(ro, 'agent.log'),
      join(ro, 'new', 'agent.log'),
      join(full, 'agent.log'),
      join(sb.root, 'plain-file', 'agent.log'),
      join(sb.root, 'a-folder.log'),
    ]) {
      expectUnaffected(await runWithLog(log));
    }
    expect(readFileSync(join(sb.root, 'plain-file'), 'utf8')).toBe('x');
  }, 120_000);
});
