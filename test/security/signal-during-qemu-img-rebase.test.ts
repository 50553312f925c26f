// Issue 15.2: a signal during a rebase must never leave a half-rebased chain. qemu-img
// rebase is not crash-safe (killed after it switched the backing reference, the clusters
// it copied but still held in its cache are lost), so it is never stopped halfway; the
// native engine stops between batches, every stop leaving a valid image. Swept: SIGTERM
// at a series of points through the rebase, for both engines, plus the dangerous instant
// (the header already names the new backing) with SIGTERM/SIGINT/SIGHUP, to the process
// and to its whole process group. After every run the chain must read exactly as before,
// the run must say honestly what happened (success only if the rebase is done, and a
// rebase that got done is a success), and a rerun must finish the job.
import { execFileSync, spawnSync } from 'node:child_process';
import { closeSync, cpSync, existsSync, mkdirSync, openSync, readFileSync, readSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { bindNas, leftovers, makeSandbox, run, type RunOutcome, type Sandbox } from '../helpers/cli.js';
import { makeImage } from '../helpers/qemu.js';
import { removeTempDirs } from '../helpers/tmp.js';
import { childrenNamed, logHas, sleep, startGroup, waitFor } from './harness.js';

afterAll(removeTempDirs);

const M = 1 << 20;
const VM = 'i-2-15-VM';
const TS = ['2025.03.01.00.00.00', '2025.03.02.00.00.00', '2025.03.03.00.00.00'];
const file = (ts: string): string => `${VM}/${ts}/root.qcow2`;
const TARGET = file(TS[2]!);
const NEW_BACKING = file(TS[0]!);
const NEW_NAME = `../${TS[0]}/root.qcow2`;
const ARGS = (sb: Sandbox): string[] => ['-o', 'rebase', ...bindNas(sb), '--rebase-target', TARGET, '--rebase-new-backing', NEW_BACKING];

let sb: Sandbox;
let template: string;
let reference: string;

beforeAll(() => {
  sb = makeSandbox('sec-rebase');
  template = join(sb.root, 'template');
  // The middle backup holds most of the data: the rebase copies it into the top (long enough to be hit mid-way).
  makeImage(join(template, file(TS[0]!)), { size: 160 * M, writes: [{ pattern: 0x11, offset: 0, length: 8 * M }] });
  makeImage(join(template, file(TS[1]!)), {
    size: 160 * M,
    backing: `../${TS[0]}/root.qcow2`,
    writes: [{ pattern: 0x22, offset: 4 * M, length: 120 * M }],
  });
  makeImage(join(template, file(TS[2]!)), {
    size: 160 * M,
    backing: `../${TS[1]}/root.qcow2`,
    writes: [
      { pattern: 0x33, offset: 1 * M, length: 2 * M },
      { pattern: 0x34, offset: 150 * M, length: 64 * 1024 },
    ],
  });
  reference = join(sb.root, 'reference.raw');
  execFileSync('qemu-img', ['convert', '-O', 'raw', join(template, TARGET), reference]);
}, 120_000);

function reseed(): void {
  rmSync(join(sb.nas, VM), { recursive: true, force: true });
  mkdirSync(sb.nas, { recursive: true });
  cpSync(join(template, VM), join(sb.nas, VM), { recursive: true });
  rmSync(sb.logFile, { force: true });
}

function backingOf(rel: string): string {
  const info = JSON.parse(execFileSync('qemu-img', ['info', '-U', '--output=json', join(sb.nas, rel)], { encoding: 'utf8' })) as Record<
    string,
    string
  >;
  return info['backing-filename'] ?? '';
}

/** Guest-visible content of the top equals the chain's before the rebase (0), or not (1), or qemu-img failed (2). */
function compareWithReference(): number {
  return spawnSync('qemu-img', ['compare', '-q', '-U', '-f', 'qcow2', '-F', 'raw', join(sb.nas, TARGET), reference]).status ?? 2;
}

function checkTop(): number {
  return spawnSync('qemu-img', ['check', '-q', join(sb.nas, TARGET)]).status ?? 2;
}

/** Does the header already name the new backing (the rebase's switch has been written)? */
function headerSwitched(): boolean {
  const buf = Buffer.alloc(4096);
  let fd: number | undefined;
  try {
    fd = openSync(join(sb.nas, TARGET), 'r');
    readSync(fd, buf, 0, buf.length, 0);
    return buf.includes(NEW_NAME);
  } catch {
    return false;
  } finally {
    if (fd !== undefined) closeSync(fd);
  }
}

type Point = { kind: 'delay'; fraction: number } | { kind: 'switched' } | { kind: 'qemu-img started' };

interface Shot {
  outcome: RunOutcome;
  qemuImgRunning: boolean;
}

/** One run: start, wait for the point, send the signal (to the process or its group), collect. */
async function shoot(engine: string, point: Point, span: number, sig: NodeJS.Signals, group = false): Promise<Shot> {
  reseed();
  const { child, done } = startGroup(sb, ARGS(sb), { NASBACKUP_ENGINE: engine });
  const pid = child.pid!;
  let qemuImgRunning = false;
  let exited = false;
  void done.then(() => (exited = true));
  try {
    await waitFor(() => exited || logHas(sb.logFile, /Rebase: \S+ onto/), 30_000, 'rebase start');
    if (point.kind === 'delay') await sleep(point.fraction * span);
    else if (point.kind === 'switched') await waitFor(() => exited || headerSwitched(), 30_000, 'header switch');
    else await waitFor(() => exited || childrenNamed(pid, 'qemu-img').length > 0, 30_000, 'qemu-img start');
    if (!exited) {
      qemuImgRunning = childrenNamed(pid, 'qemu-img').length > 0;
      process.kill(group ? -pid : pid, sig);
    }
  } catch (e) {
    child.kill('SIGKILL');
    throw e;
  }
  return { outcome: await done, qemuImgRunning };
}

/** What must hold after any run, interrupted or not. */
function expectHonest(shot: Shot, engine: string, label: string): void {
  const { outcome: r } = shot;
  const ctx = `${engine} ${label}: ${JSON.stringify(r)}`;
  expect(r.signal, ctx).toBeNull(); // it ended itself, with a report
  expect([0, 1], ctx).toContain(r.code);
  expect([0, 3], ctx).toContain(checkTop()); // 3: leaked clusters only
  expect(compareWithReference(), ctx).toBe(0); // the chain reads exactly as before
  const done = backingOf(TARGET) === NEW_NAME;
  expect(r.code === 0, ctx).toBe(done); // success if and only if the rebase is done
  if (r.code === 0) expect(r.stdout, ctx).toBe('');
  else expect(r.stdout, ctx).toMatch(/^Interrupted/);
  // qemu-img is never stopped halfway: once it ran, the rebase finished and counts.
  if (shot.qemuImgRunning) expect(r.code, ctx).toBe(0);
  expect(leftovers(sb), ctx).toEqual({ dirs: [], mounts: [] });
}

async function rerunFinishes(engine: string, label: string): Promise<void> {
  const again = await run(sb, ARGS(sb), { NASBACKUP_ENGINE: engine });
  expect(again, `${engine} ${label} rerun`).toMatchObject({ code: 0, stdout: '' });
  expect(backingOf(TARGET)).toBe(NEW_NAME);
  expect(compareWithReference()).toBe(0);
  expect([0, 3]).toContain(checkTop());
}

describe('a signal during a rebase (sweep over both engines)', () => {
  it.each(['qemu-img', 'native'])(
    'engine %s: the chain stays intact and the report honest at every point',
    async (engine) => {
      // Uninterrupted reference: how long the rebase step takes here (the sweep spans it).
      reseed();
      const t0 = Date.now();
      const { done } = startGroup(sb, ARGS(sb), { NASBACKUP_ENGINE: engine });
      await waitFor(() => logHas(sb.logFile, /Rebase: \S+ onto/), 30_000, 'rebase start');
      const t1 = Date.now();
      const ref = await done;
      expect(ref, 'reference run').toMatchObject({ code: 0, stdout: '' });
      if (engine === 'native') expect(logHas(sb.logFile, /engine native: \S+ rebased/)).toBe(true);
      const span = Math.max(Date.now() - t1, 50);
      expect(t1 - t0).toBeGreaterThan(0);

      const points: Point[] = [0, 0.1, 0.2, 0.35, 0.5, 0.65, 0.8, 0.95, 1.1].map((fraction) => ({ kind: 'delay', fraction }));
      points.push({ kind: 'switched' });
      if (engine === 'qemu-img') points.push({ kind: 'qemu-img started' });
      let interrupted = 0;
      let shielded = 0;
      for (const point of points) {
        const label =
          point.kind === 'delay'
            ? `SIGTERM at ${Math.round(point.fraction * 100)}% of the rebase`
            : point.kind === 'switched'
              ? 'SIGTERM once the header names the new backing'
              : 'SIGTERM as soon as qemu-img runs';
        const shot = await shoot(engine, point, span, 'SIGTERM');
        expectHonest(shot, engine, label);
        if (shot.outcome.code !== 0) {
          interrupted++;
          await rerunFinishes(engine, label);
        }
        if (shot.qemuImgRunning) shielded++;
      }
      // The sweep did hit the rebase, not only before or after it: qemu-img was running
      // (and was let finish), or the native engine was stopped between its batches.
      console.log(`${engine}: ${points.length} points, ${interrupted} interrupted, ${shielded} during qemu-img`);
      if (engine === 'qemu-img') expect(shielded).toBeGreaterThan(0);
      else expect(interrupted).toBeGreaterThan(0);
    },
    600_000,
  );

  it.each([
    ['SIGTERM', true],
    ['SIGINT', true],
    ['SIGHUP', true],
    ['SIGINT', false],
    ['SIGHUP', false],
  ] as const)(
    'qemu-img engine, %s (to the whole process group: %s) once the header names the new backing: it finishes and reports success',
    async (sig, group) => {
      const shot = await shoot('qemu-img', { kind: 'switched' }, 0, sig, group);
      expectHonest(shot, 'qemu-img', `${sig} group=${group}`);
      expect(shot.outcome.code).toBe(0);
      expect(readFileSync(sb.logFile, 'utf8')).toMatch(new RegExp(`Received ${sig} during a step that must not be stopped halfway`));
    },
    120_000,
  );
});

describe('SIGKILL of nasbackup during a qemu-img rebase', () => {
  it('the rebase is not bound to our life: qemu-img finishes it and the chain reads as before', async () => {
    reseed();
    const { child, done } = startGroup(sb, ARGS(sb), { NASBACKUP_ENGINE: 'qemu-img' });
    const pid = child.pid!;
    await waitFor(() => childrenNamed(pid, 'qemu-img').length > 0, 30_000, 'qemu-img start');
    const [qemuImg] = childrenNamed(pid, 'qemu-img');
    process.kill(pid, 'SIGKILL'); // no handler can run: only the child's own binding decides
    const r = await done;
    expect(r.signal).toBe('SIGKILL');
    // qemu-img (re-parented) runs to the end of the rebase instead of dying halfway.
    await waitFor(
      () => !existsSync(`/proc/${qemuImg}`) || /^\S+ \(.*\) Z/.test(readFileSync(`/proc/${qemuImg}/stat`, 'utf8')),
      60_000,
      'qemu-img end',
    );
    expect(backingOf(TARGET)).toBe(NEW_NAME);
    expect(compareWithReference()).toBe(0);
    // What the killed run left (its mount, its lock) is the next run's to clean; the
    // rerun is then a no-op on the finished rebase.
    const again = await run(sb, ARGS(sb), { NASBACKUP_ENGINE: 'qemu-img' });
    expect(again).toMatchObject({ code: 0, stdout: '' });
    expect(compareWithReference()).toBe(0);
    // ...and cleans it: no mount and no mount folder of either run stays behind.
    expect(leftovers(sb)).toEqual({ dirs: [], mounts: [] });
  }, 120_000);
});
