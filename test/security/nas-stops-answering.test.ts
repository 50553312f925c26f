// Issue 15 item 8: a NAS that stops answering. The "NAS export" is a real FUSE
// passthrough filesystem (python3-fusepy); the run bind-mounts it as usual, and its
// `mount` stops the FUSE server (SIGSTOP) right after the real mount succeeded, so every
// call on the NAS from then on blocks in the kernel. Each operation must give up within
// its deadline with NAS_UNRESPONSIVE, kill its children, and leave no mount behind
// (lazy unmount; exit 20 only when even that fails).
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { bindNas, leftovers, logText, makeSandbox, start, writeShim, type Sandbox } from '../helpers/cli.js';
import { removeTempDirs, tempDir } from '../helpers/tmp.js';
import { seedChain, rootFile, TS as CHAIN_TS } from '../helpers/chain.js';
import { backupArgv, FAST_POLL, rootDiskAsRaw, scenario, VM, TS } from '../backup/scenario.js';
import { detachMountsBelow, fuseNas, killAll, pidsMentioning, pidsWithArgv, waitFor, within, type FuseNas } from './faults.js';

const servers: FuseNas[] = [];
const sandboxes: string[] = [];
const sleeps: string[][] = [];
afterEach(async () => {
  for (const s of sleeps.splice(0)) killAll(pidsWithArgv(s));
  for (const f of servers.splice(0)) await f.close();
  for (const d of sandboxes.splice(0)) detachMountsBelow(d);
});
afterAll(removeTempDirs);

const REAL_MOUNT = execFileSync('sh', ['-c', 'command -v mount'], { encoding: 'utf8' }).trim();
const NAS_DEADLINE = { NASBACKUP_NAS_TIMEOUT: '2', NASBACKUP_NAS_PROBE_INTERVAL: '0.3' };
const UNRESPONSIVE = String.raw`The NAS did not answer within 2 s \(none \S+ at \S+/csbackup\.\w{5}\); the operation was abandoned\n`;

/** Serve sb.nas through FUSE (its content in a backing folder); `mount` stops the server once it mounted. */
async function stoppingNas(sb: Sandbox, seed: (backing: string) => void = () => {}, stopOnMount = true): Promise<FuseNas> {
  sandboxes.push(sb.tmp);
  const backing = join(sb.root, 'backing');
  mkdirSync(backing);
  seed(backing);
  const f = await fuseNas(tempDir('fuse-server'), backing, sb.nas);
  servers.push(f);
  if (stopOnMount) writeShim(sb, 'mount', `${REAL_MOUNT} "$@" || exit $?\nkill -STOP ${f.server.pid}`);
  return f;
}

async function expectAbandoned(sb: Sandbox, argv: string[], env: NodeJS.ProcessEnv = {}, leftLock = false): Promise<string> {
  const t0 = Date.now();
  const r = await within(start(sb, argv, { ...NAS_DEADLINE, ...env }), 60_000);
  expect(r).not.toBe('hung');
  if (r === 'hung') return '';
  if (leftLock) {
    // The lock it held stays on the NAS (named; exit 20): the next run takes it over, its pid being dead.
    expect(r.code).toBe(20);
    expect(r.stdout).toMatch(
      new RegExp(`^${UNRESPONSIVE}Could not remove the lock \\S+/\\.nasbackup\\.lock \\(the NAS did not answer\\)\\n`),
    );
  } else {
    expect(r.code).toBe(1);
    expect(r.stdout).toMatch(new RegExp(`^${UNRESPONSIVE}$`));
  }
  // Probe interval + deadline + a lazy unmount; far below the 60 s watchdog.
  expect(Date.now() - t0).toBeLessThan(30_000);
  // Nothing of the run is left (sb.nas itself is the FUSE export, not ours).
  expect(leftovers(sb)).toEqual({ dirs: [], mounts: [sb.nas] });
  expect(logText(sb)).toMatch(/ERROR \[NAS_UNRESPONSIVE\]/);
  return r.stdout;
}

describe('a NAS that stops answering', () => {
  it('stats: df blocks on the NAS; the run gives up, kills df and unmounts (by force, else lazily)', async () => {
    const sb = makeSandbox('sec-nas-stats');
    await stoppingNas(sb);
    await expectAbandoned(sb, ['-o', 'stats', ...bindNas(sb)]);
    expect(logText(sb)).toMatch(/did not answer; (unmounted by force|detached with a lazy unmount)/);
  }, 90_000);

  it('delete: the lock and the walk block on the NAS; nothing is removed, the next run after recovery finishes it', async () => {
    const sb = makeSandbox('sec-nas-delete');
    const f = await stoppingNas(sb, (b) => {
      mkdirSync(join(b, VM, TS), { recursive: true });
      writeFileSync(join(b, VM, TS, 'root.qcow2'), 'x');
    });
    await expectAbandoned(sb, ['-o', 'delete', ...bindNas(sb), '-p', `${VM}/${TS}`]);
    const backing = join(sb.root, 'backing');
    expect(readdirSync(join(backing, VM, TS))).toEqual(['root.qcow2']);
    // The NAS server comes back (the forced unmount ended its old session): a lock the
    // abandoned run may have left is broken (its pid is dead), and the delete completes.
    await f.close();
    servers.push(await fuseNas(tempDir('fuse-server'), backing, sb.nas));
    writeShim(sb, 'mount', `exec ${REAL_MOUNT} "$@"`);
    const again = await within(start(sb, ['-o', 'delete', ...bindNas(sb), '-p', `${VM}/${TS}`], NAS_DEADLINE), 60_000);
    expect(again).not.toBe('hung');
    if (again === 'hung') return;
    expect(again.code).toBe(0);
    expect(readdirSync(join(sb.nas, VM))).toEqual([]);
  }, 90_000);

  it('backup of a stopped VM: the copy blocks writing to the NAS; qemu-img is killed, the run gives up', async () => {
    const s = scenario('sec-nas-backup', { state: 'shut off' });
    rootDiskAsRaw(s); // a raw source is copied by qemu-img convert, the child this test is about
    const f = await stoppingNas(s.sb, undefined, false);
    // This time the NAS stops answering when the copy starts (the lock and folder are made).
    const started = join(s.sb.root, 'convert-started');
    const qemuImg = writeShim(
      s.sb,
      'qemu-img-stopping',
      `case "$1" in convert) : > ${started}; kill -STOP ${f.server.pid};; esac\nexec qemu-img "$@"`,
    );
    await expectAbandoned(s.sb, backupArgv(s, { disks: s.rootDisk }), { ...FAST_POLL, NASBACKUP_QEMU_IMG: qemuImg }, true);
    // The copy had started, and no qemu-img of ours is left writing (killed with its process group).
    // (Its exec line may not be logged: the run does not wait for an abandoned call.)
    expect(existsSync(started)).toBe(true);
    expect(await waitFor(() => pidsMentioning(s.sb.root).filter((p) => p !== f.server.pid).length === 0, 3000)).toBe(true);
  }, 90_000);

  it('rebase: reading the chain blocks; the run gives up', async () => {
    const sb = makeSandbox('sec-nas-rebase');
    await stoppingNas(sb, (b) => seedChain(b));
    await expectAbandoned(sb, [
      '-o',
      'rebase',
      ...bindNas(sb),
      '--rebase-target',
      rootFile(CHAIN_TS[2]),
      '--rebase-new-backing',
      rootFile(CHAIN_TS[0]),
    ]);
  }, 90_000);

  it('the agent log on the NAS: a log line blocks the main thread; the watch (another process) still ends the run', async () => {
    const sb = makeSandbox('sec-nas-log');
    await stoppingNas(sb);
    const t0 = Date.now();
    // The log file on the NAS export itself (the same filesystem the run mounts).
    const r = await within(
      start(sb, ['-o', 'stats', ...bindNas(sb)], { ...NAS_DEADLINE, NASBACKUP_LOG_FILE: join(sb.nas, 'agent.log') }),
      60_000,
    );
    expect(r).not.toBe('hung');
    if (r === 'hung') return;
    expect(r.code).toBe(1);
    expect(r.stdout).toMatch(new RegExp(`^${UNRESPONSIVE}$`));
    expect(Date.now() - t0).toBeLessThan(30_000);
    expect(leftovers(sb).dirs).toEqual([]);
    expect(leftovers(sb).mounts.filter((m) => m !== sb.nas)).toEqual([]);
    // What the log got before the NAS stopped answering is on the NAS.
    expect(readFileSync(join(sb.root, 'backing', 'agent.log'), 'utf8')).toMatch(/Environment Sanity Checks successfully passed/);
  }, 90_000);

  it('calls that even a forced unmount cannot return: the answer is printed, and the exit guard ends the process', async () => {
    const sb = makeSandbox('sec-nas-stuck');
    const f = await stoppingNas(sb, (b) => mkdirSync(join(b, VM, TS), { recursive: true }));
    // No unmount works and the NAS never answers again: the delete's calls stay stuck in our threads.
    writeShim(sb, 'umount', `echo "umount: $*: target is busy." >&2; exit 32`);
    const run = start(sb, ['-o', 'delete', ...bindNas(sb), '-p', `${VM}/${TS}`], NAS_DEADLINE);
    let stdout = '';
    run.child.stdout!.on('data', (d: Buffer) => (stdout += d.toString()));
    let ended = false;
    void run.done.then(() => (ended = true));
    const answer = new RegExp(`^${UNRESPONSIVE}Failed to unmount \\S+/csbackup\\.\\w{5}: umount: -l -c \\S+: target is busy\\.\\n`);
    expect(await waitFor(() => answer.test(stdout), 40_000)).toBe(true);
    // Exit 20, or the guard's SIGKILL when a thread is still stuck in the kernel at exit. A FUSE
    // request the server had already taken is waited out even by SIGKILL, so a SIGKILL pending on
    // a process that cannot end yet counts too (it ends the moment the server answers).
    const pid = run.child.pid!;
    const killPending = (): boolean => {
      try {
        const st = readFileSync(`/proc/${pid}/status`, 'utf8');
        const mask = (name: string): bigint => BigInt('0x' + (new RegExp(`^${name}:\\s*(\\w+)`, 'm').exec(st)?.[1] ?? '0'));
        return ((mask('SigPnd') | mask('ShdPnd')) & 0x100n) !== 0n; // SIGKILL is signal 9: bit 8
      } catch {
        return false;
      }
    };
    expect(await waitFor(() => ended || killPending(), 30_000)).toBe(true);
    f.cont();
    const r = await run.done;
    expect(r.code === 20 || r.signal === 'SIGKILL').toBe(true);
  }, 120_000);

  it('cleanup that cannot even unmount lazily: exit 20, and it says so', async () => {
    const sb = makeSandbox('sec-nas-umount');
    const f = await stoppingNas(sb);
    // The NAS answers again only once we gave up on it, and the mount stays busy.
    writeShim(sb, 'umount', `kill -CONT ${f.server.pid}\necho "umount: $*: target is busy." >&2; exit 32`);
    const r = await within(start(sb, ['-o', 'stats', ...bindNas(sb)], NAS_DEADLINE), 60_000);
    expect(r).not.toBe('hung');
    if (r === 'hung') return;
    expect(r.code).toBe(20);
    expect(r.stdout).toMatch(
      new RegExp(`^${UNRESPONSIVE}Failed to unmount \\S+/csbackup\\.\\w{5}: umount: -l -c \\S+: target is busy\\.\\n`),
    );
    const left = leftovers(sb);
    expect(left.mounts.filter((m) => m !== sb.nas)).toHaveLength(1);
    for (const m of left.mounts) if (m !== sb.nas) execFileSync('umount', ['-l', m]);
    for (const d of left.dirs) execFileSync('rm', ['-d', join(sb.tmp, d)]);
  }, 90_000);
});
