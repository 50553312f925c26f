import { existsSync, mkdirSync, readFileSync, rmSync, utimesSync, writeFileSync } from 'node:fs';
import { hostname } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { LOCK_NAME, VmLock } from '../../lib/nas/lock.js';
import { memoryLogger } from '../../lib/log.js';
import { removeTempDirs, tempDir } from '../helpers/tmp.js';

afterAll(removeTempDirs);

const opts = (over: Partial<Parameters<typeof VmLock.acquire>[1]> = {}) => ({
  operation: 'test',
  waitMs: 300,
  staleAfterMs: 60_000,
  breakLock: false,
  logger: memoryLogger(),
  ...over,
});

const codeOf = (p: Promise<unknown>) =>
  p.then(
    () => 'ok',
    (e: { code: string }) => e.code,
  );

describe('per-VM lock', () => {
  it('is a file holding host, pid and operation, removed on release', async () => {
    const dir = join(tempDir('lock'), 'i-1-2-VM');
    const l = await VmLock.acquire(dir, opts({ operation: 'backup' }));
    const info = JSON.parse(readFileSync(join(dir, LOCK_NAME), 'utf8'));
    expect(info).toMatchObject({ host: hostname(), pid: process.pid, operation: 'backup' });
    await l.release();
    expect(existsSync(join(dir, LOCK_NAME))).toBe(false);
  });

  it("after release, stillHeld() names only our own lock: the next run's lock at the same path is not ours to report", async () => {
    const dir = tempDir('lock-next');
    const path = join(dir, LOCK_NAME);
    const l = await VmLock.acquire(dir, opts());
    expect(await l.stillHeld()).toBe(true); // not released (as when the unlink failed)
    await l.release();
    expect(await l.stillHeld()).toBe(false);
    // The run that waited for this VM takes the lock the moment ours went (regression: reported as our leftover, exit 20).
    const next = { host: hostname(), pid: process.pid + 1, pidStart: '1', startedAt: new Date().toISOString(), operation: 'chain delete' };
    writeFileSync(path, JSON.stringify(next) + '\n');
    expect(await l.stillHeld()).toBe(false);
    writeFileSync(path, ''); // being written by the next holder
    expect(await l.stillHeld()).toBe(false);
    // Ours, still there after release (a NAS that refused the unlink), and a lock that cannot be read back: reported.
    const again = await VmLock.acquire(join(dir, 'other'), opts());
    const mine = readFileSync(join(dir, 'other', LOCK_NAME), 'utf8');
    writeFileSync(path, mine);
    expect(await l.stillHeld()).toBe(true);
    await again.release();
    rmSync(path);
    mkdirSync(path); // EISDIR: cannot tell
    expect(await l.stillHeld()).toBe(true);
  });

  it('removes the instance folder it created when nothing else was put there', async () => {
    const dir = join(tempDir('lock'), 'i-1-2-VM');
    const l = await VmLock.acquire(dir, opts());
    await l.release();
    expect(existsSync(dir)).toBe(false);
    mkdirSync(dir);
    const l2 = await VmLock.acquire(dir, opts());
    await l2.release();
    expect(existsSync(dir)).toBe(true); // it was there before: never removed
  });

  it('a live holder makes a second taker wait, then fail with LOCKED', async () => {
    const dir = tempDir('lock');
    const l = await VmLock.acquire(dir, opts());
    const t0 = Date.now();
    expect(await codeOf(VmLock.acquire(dir, opts({ waitMs: 400 })))).toBe('LOCKED');
    expect(Date.now() - t0).toBeGreaterThanOrEqual(300);
    await l.release();
  });

  it('the second taker gets it once the first releases', async () => {
    const dir = tempDir('lock');
    const l = await VmLock.acquire(dir, opts());
    setTimeout(() => void l.release(), 150);
    const l2 = await VmLock.acquire(dir, opts({ waitMs: 5000 }));
    await l2.release();
  });

  it('breaks the lock of a dead process on this host', async () => {
    const dir = tempDir('lock');
    writeFileSync(
      join(dir, LOCK_NAME),
      JSON.stringify({ host: hostname(), pid: 2 ** 22 + 7, pidStart: '1', startedAt: 'x', operation: 'backup' }),
    );
    const log = memoryLogger();
    const l = await VmLock.acquire(dir, opts({ logger: log }));
    expect(log.lines.join('\n')).toMatch(/Breaking lock .*is gone/);
    await l.release();
  });

  it('respects another host’s lock until it is older than any operation may run', async () => {
    const dir = tempDir('lock');
    const p = join(dir, LOCK_NAME);
    writeFileSync(p, JSON.stringify({ host: 'other-host', pid: 1, pidStart: null, startedAt: 'x', operation: 'delete' }));
    expect(await codeOf(VmLock.acquire(dir, opts()))).toBe('LOCKED');
    const old = (Date.now() - 120_000) / 1000;
    utimesSync(p, old, old);
    const l = await VmLock.acquire(dir, opts());
    await l.release();
  });

  it('the operator override breaks a live lock', async () => {
    const dir = tempDir('lock');
    writeFileSync(
      join(dir, LOCK_NAME),
      JSON.stringify({ host: 'other-host', pid: 1, pidStart: null, startedAt: 'x', operation: 'delete' }),
    );
    const l = await VmLock.acquire(dir, opts({ breakLock: true }));
    await l.release();
  });

  it('an unreadable lock is respected while fresh, broken when old', async () => {
    const dir = tempDir('lock');
    const p = join(dir, LOCK_NAME);
    writeFileSync(p, '{"host": "half-writ');
    expect(await codeOf(VmLock.acquire(dir, opts()))).toBe('LOCKED');
    const old = (Date.now() - 3600_000) / 1000;
    utimesSync(p, old, old);
    const l = await VmLock.acquire(dir, opts());
    await l.release();
  });
});
