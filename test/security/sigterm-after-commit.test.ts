// Issue 15.5: a terminating signal is answered honestly at every point of a run.
// * Before the commit point the run rolls back and says "Interrupted"; after it (the
//   backup folder got its final name, a rebase is on disk) the run finishes and reports
//   success: the agent must never record a failure for a complete backup.
// * While the program is still loading (the first few hundred ms) a signal used to kill
//   it outright (exit 143, empty stdout): the handlers are now installed before anything
//   else is loaded. Swept deterministically: an ESM loader hook sends the SIGTERM from
//   inside the load of each module on the way to the operation.
import { existsSync, mkdirSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { bindNas, leftovers, makeSandbox, run, writeShim, type Sandbox } from '../helpers/cli.js';
import { makeImage } from '../helpers/qemu.js';
import { removeTempDirs } from '../helpers/tmp.js';
import { snapshotTree } from '../helpers/tree.js';
import { logHas, startGroup, waitFor } from './harness.js';

afterAll(removeTempDirs);

const VM = 'i-2-16-VM';
const M = 1 << 20;

/** A stopped VM (the virsh stand-in lists no domain) with one qcow2 disk. */
function stoppedVm(tag: string): { sb: Sandbox; disk: string; args: (ts: string) => string[] } {
  const sb = makeSandbox(tag);
  const disk = join(sb.root, 'vol-a1b2.qcow2');
  makeImage(disk, { size: 64 * M, writes: [{ pattern: 0x5a, offset: 0, length: 24 * M }] });
  mkdirSync(join(sb.nas, VM), { recursive: true });
  // Real qemu-img; its post-commit step (the bitmap for the next incremental) made slow,
  // so a signal can land on it for certain.
  writeShim(sb, 'qemu-img', `[ "$1" = bitmap ] && { echo $$ > "$0.bitmap.pid"; sleep 1; }\nexec /usr/bin/qemu-img "$@"`);
  const args = (ts: string): string[] => [
    '-o',
    'backup',
    ...bindNas(sb),
    '-v',
    VM,
    '-p',
    `${VM}/${ts}`,
    '-d',
    disk,
    '-M',
    'full',
    '--bitmap-new',
    `backup-${ts.replace(/\./g, '')}`,
  ];
  return { sb, disk, args };
}

describe('SIGTERM during a stopped-VM backup, swept over its commit point', () => {
  it('before the rename: rolled back and reported; after it: finished and reported as a success', async () => {
    const { sb, args } = stoppedVm('sec-commit');
    const ref = await run(sb, args('2025.04.01.00.00.00'));
    expect(ref.code, ref.stdout).toBe(0);
    expect(ref.stdout).toMatch(/^BITMAP_CREATED=backup-20250401000000\n\d+\n$/);

    const points = [
      { name: 'the work folder exists (copy under way)', before: true, ready: (final: string) => existsSync(`${final}.partial`) },
      { name: 'the folder has its final name', before: false, ready: (final: string) => existsSync(final) },
      {
        name: 'the bitmap for the next incremental is being added',
        before: false,
        ready: () => existsSync(`${sb.shims}/qemu-img.bitmap.pid`),
      },
    ];
    for (const [i, p] of points.entries()) {
      const ts = `2025.04.0${i + 2}.00.00.00`;
      const final = join(sb.nas, VM, ts);
      rmSync(`${sb.shims}/qemu-img.bitmap.pid`, { force: true });
      const { child, done } = startGroup(sb, args(ts));
      let exited = false;
      void done.then(() => (exited = true));
      await waitFor(() => exited || p.ready(final), 30_000, p.name);
      expect(exited, `${p.name}: the run ended before the point was reached`).toBe(false);
      child.kill('SIGTERM');
      const r = await done;
      const ctx = `${p.name}: ${JSON.stringify(r)}`;
      expect(r.signal, ctx).toBeNull();
      if (p.before) {
        expect(r.code, ctx).toBe(1);
        expect(r.stdout, ctx).toMatch(/^Interrupted/);
        expect(existsSync(final), ctx).toBe(false);
        expect(existsSync(`${final}.partial`), ctx).toBe(false);
      } else {
        expect(r.code, ctx).toBe(0);
        expect(r.stdout, ctx).toBe(ref.stdout.replace('20250401000000', ts.replace(/\./g, '')));
        expect(readdirSync(final), ctx).toEqual(readdirSync(join(sb.nas, VM, '2025.04.01.00.00.00')));
        expect(logHas(sb.logFile, /Received SIGTERM (after the commit point|during a step that must not be stopped halfway)/), ctx).toBe(
          true,
        );
      }
      expect(existsSync(join(sb.nas, VM, '.nasbackup.lock')), ctx).toBe(false);
      expect(leftovers(sb), ctx).toEqual({ dirs: [], mounts: [] });
    }
  }, 180_000);
});

describe('SIGTERM after a native rebase is on disk', () => {
  it('the run finishes (flush included) and reports success', async () => {
    const sb = makeSandbox('sec-commit-rebase');
    const f = (ts: string): string => `${VM}/${ts}/root.qcow2`;
    makeImage(join(sb.nas, f('2025.05.01.00.00.00')), { size: 16 * M, writes: [{ pattern: 1, offset: 0, length: 4 * M }] });
    makeImage(join(sb.nas, f('2025.05.02.00.00.00')), {
      size: 16 * M,
      backing: '../2025.05.01.00.00.00/root.qcow2',
      writes: [{ pattern: 2, offset: 2 * M, length: 4 * M }],
    });
    makeImage(join(sb.nas, f('2025.05.03.00.00.00')), {
      size: 16 * M,
      backing: '../2025.05.02.00.00.00/root.qcow2',
      writes: [{ pattern: 3, offset: 8 * M, length: 1 * M }],
    });
    // The flush after the rebase made slow (it still runs to completion).
    writeShim(sb, 'sync', `echo $$ > "$0.pid"; sleep 1; exec /usr/bin/sync`);
    const { child, done } = startGroup(
      sb,
      ['-o', 'rebase', ...bindNas(sb), '--rebase-target', f('2025.05.03.00.00.00'), '--rebase-new-backing', f('2025.05.01.00.00.00')],
      { NASBACKUP_ENGINE: 'native' },
    );
    let exited = false;
    void done.then(() => (exited = true));
    await waitFor(() => exited || existsSync(`${sb.shims}/sync.pid`), 30_000, 'flush after the rebase');
    expect(exited).toBe(false);
    child.kill('SIGTERM');
    const r = await done;
    expect(r).toMatchObject({ code: 0, signal: null, stdout: '' });
    expect(logHas(sb.logFile, /exec: sync -f \S+ -> exit 0/)).toBe(true); // syncfs of the NAS, not a global sync
    expect(leftovers(sb)).toEqual({ dirs: [], mounts: [] });
  }, 60_000);
});

/** Loader hook (its own thread) that sends SIGTERM to the process while a given module loads. */
const HOOKS = `
let pattern = '';
let fired = false;
export function initialize(data) { pattern = data.pattern; }
export async function load(url, context, next) {
  if (!fired && pattern && url.includes(pattern)) {
    fired = true;
    process.kill(process.pid, 'SIGTERM');
    await new Promise((r) => setTimeout(r, 100)); // the signal lands while this module is loading
  }
  return next(url, context);
}
`;
const PRELOAD = `
import { register } from 'node:module';
register(new URL('./hooks.mjs', import.meta.url), { data: { pattern: process.env.NB_SIGTERM_ON_LOAD ?? '' } });
`;

describe('SIGTERM while the program is still loading', () => {
  // Every module on the way from bin/nasbackup to the running operation (after the first one, which installs the handlers).
  const points = [
    'dist/lib/cli/entry.js',
    'dist/lib/agent-output.js',
    'dist/lib/cli/main.js',
    'dist/lib/config.js',
    '/yargs-parser/',
    'dist/lib/cli/lifecycle.js',
    'dist/lib/nas/session.js',
    'dist/lib/ops/stats.js',
    'dist/lib/nas/watch.js',
  ];

  it.each(points)(
    'during the load of %s: a clean "Interrupted by SIGTERM", exit 1, nothing touched',
    async (point) => {
      const sb = makeSandbox('sec-startup');
      writeFileSync(join(sb.root, 'hooks.mjs'), HOOKS);
      writeFileSync(join(sb.root, 'preload.mjs'), PRELOAD);
      mkdirSync(join(sb.nas, VM, '2025.06.01.00.00.00'), { recursive: true });
      const snap = snapshotTree(sb.nas);
      const { done } = startGroup(sb, ['-o', 'stats', ...bindNas(sb)], {
        NODE_OPTIONS: `--import=${join(sb.root, 'preload.mjs')}`,
        NB_SIGTERM_ON_LOAD: point,
      });
      const r = await done;
      expect(r, JSON.stringify(r)).toMatchObject({ code: 1, signal: null });
      // Before the operation: by the signal; in its first steps (the last points): what it interrupted.
      expect(r.stdout).toMatch(/^Interrupted (by SIGTERM|while mounting none store)\n/);
      expect(snapshotTree(sb.nas)).toEqual(snap);
      expect(leftovers(sb)).toEqual({ dirs: [], mounts: [] });
    },
    60_000,
  );
});
