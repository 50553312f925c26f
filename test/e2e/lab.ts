// Host-side helpers for end-to-end tests against real libvirt/QEMU.
// The lab itself (packages, daemons, guest kernel/initramfs) is managed by
// scripts/e2e-lab.mjs; see docs/e2e-lab.md for the background.
import { execa } from 'execa';
import { execFileSync, spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const REPO_ROOT = fileURLToPath(new URL('../..', import.meta.url));
export const LAB_SCRIPT = path.join(REPO_ROOT, 'scripts', 'e2e-lab.mjs');
/** The program under test (it runs dist/: `npm run test:e2e` builds first). */
export const NASBACKUP_BIN = path.join(REPO_ROOT, 'bin', 'nasbackup');
export const GUEST_CACHE = process.env.NASBACKUP_E2E_CACHE || '/var/cache/nasbackup-e2e/guest';
export const VIRSH_URI = 'qemu:///system';
export const DOMAIN_PREFIX = 'nbe2e-';
export const READY_MARKER = 'E2E-GUEST-READY';
/** 'qemu' = TCG. Set NASBACKUP_E2E_DOMAIN_TYPE=kvm only where /dev/kvm really works. */
export const DOMAIN_TYPE = process.env.NASBACKUP_E2E_DOMAIN_TYPE || 'qemu';

export interface RunResult {
  stdout: string;
  stderr: string;
  exitCode: number;
}

export interface RunOptions {
  /** Kill the command after this many ms (default 60 s). */
  timeoutMs?: number;
  /** Throw on a non-zero exit instead of returning it. */
  check?: boolean;
  cwd?: string;
  input?: string;
}

/** Run a command without a shell; never hangs past its timeout. */
export async function run(file: string, args: string[], opts: RunOptions = {}): Promise<RunResult> {
  const r = await execa(file, args, {
    reject: false,
    timeout: opts.timeoutMs ?? 60_000,
    cwd: opts.cwd,
    input: opts.input,
    stripFinalNewline: false,
  });
  const res: RunResult = {
    stdout: String(r.stdout ?? ''),
    stderr: String(r.stderr ?? ''),
    exitCode: r.exitCode ?? (r.timedOut ? 124 : 1),
  };
  if (opts.check && res.exitCode !== 0) {
    const why = r.timedOut ? `timed out after ${opts.timeoutMs ?? 60_000} ms` : `exit ${res.exitCode}`;
    throw new Error(`${file} ${args.join(' ')}: ${why}\n${res.stderr || res.stdout}`);
  }
  return res;
}

/** virsh against the system URI. */
export function virsh(args: string[], opts: RunOptions = {}): Promise<RunResult> {
  return run('virsh', ['-c', VIRSH_URI, ...args], opts);
}

export const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/** Poll until probe returns a truthy value; throws with `what` after deadlineMs. */
export async function waitFor<T>(
  what: string,
  deadlineMs: number,
  probe: () => Promise<T | undefined | false> | T | undefined | false,
  intervalMs = 200,
): Promise<T> {
  const end = Date.now() + deadlineMs;
  for (;;) {
    const v = await probe();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out after ${deadlineMs} ms waiting for ${what}`);
    await sleep(intervalMs);
  }
}

let labReady: Promise<void> | undefined;

/** Install/configure the lab and start libvirt: once per process. */
export function ensureLab(): Promise<void> {
  labReady ??= (async () => {
    for (const cmd of ['setup', 'start']) {
      // Cold setup installs packages (~20-70 s); warm setup is well under a second.
      const r = await run(process.execPath, [LAB_SCRIPT, cmd], { timeoutMs: 900_000, cwd: REPO_ROOT });
      if (r.exitCode !== 0) throw new Error(`e2e-lab ${cmd} failed (exit ${r.exitCode}):\n${r.stdout}${r.stderr}`);
    }
  })();
  // A failed attempt must not poison later calls.
  labReady.catch(() => (labReady = undefined));
  return labReady;
}

/** Create an empty qcow2 image. */
export async function createQcow2(file: string, sizeBytes: number): Promise<void> {
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', file, String(sizeBytes)], { check: true });
}

/**
 * Create a qcow2 image holding an ext4 filesystem (the guest mounts ext4 from
 * vdb..vdz, giving fsfreeze something to freeze). Built as a raw image and
 * converted, so no nbd module is needed. Inode tables and journal are
 * initialised up front so the guest kernel does no background writes.
 */
export async function mkfsExt4(file: string, sizeBytes: number, label = 'nbe2e'): Promise<void> {
  const raw = `${file}.raw.tmp`;
  try {
    fs.closeSync(fs.openSync(raw, 'w'));
    fs.truncateSync(raw, sizeBytes);
    await run('mkfs.ext4', ['-q', '-F', '-L', label, '-E', 'lazy_itable_init=0,lazy_journal_init=0', raw], {
      check: true,
    });
    await run('qemu-img', ['convert', '-q', '-f', 'raw', '-O', 'qcow2', raw, file], { check: true });
  } finally {
    fs.rmSync(raw, { force: true });
  }
}

export interface GuestOptions {
  /** Domain name; must start with nbe2e- so `e2e-lab.mjs stop` can clean it up. */
  name: string;
  /** qcow2 images: the first is vda, then vdb, vdc, ... */
  disks: string[];
  /**
   * Default true. false keeps the agent channel (as on a VM without the agent
   * installed) but the guest never starts qemu-ga, so agent calls fail with
   * "QEMU guest agent is not connected".
   */
  withAgent?: boolean;
  /** Directory for the domain XML and the console log. */
  dir: string;
  /** Disk cache mode (default 'none', as CloudStack; needs O_DIRECT, so not on tmpfs). */
  cache?: 'none' | 'writeback' | 'writethrough' | 'directsync' | 'unsafe';
  /** Deadline for boot + agent (default 120 s; TCG boot is ~6 s on an idle host). */
  bootTimeoutMs?: number;
}

export interface Guest {
  name: string;
  consoleLog: string;
  xmlPath: string;
  /** ms from `virsh create` to the ready marker / to the first guest-ping answer. */
  timings: { readyMs: number; agentMs?: number };
  /** Destroy the transient domain; safe to call twice. */
  destroy(): Promise<void>;
}

const xmlEscape = (s: string) =>
  s.replace(/[<>&'"]/g, (c) => ({ '<': '&lt;', '>': '&gt;', '&': '&amp;', "'": '&apos;', '"': '&quot;' })[c]!);

/** vda, vdb, ... vdz */
export const diskTarget = (i: number) => `vd${String.fromCharCode(97 + i)}`;

export function domainXml(opts: GuestOptions, consoleLog: string): string {
  const cmdline = ['console=ttyS0', 'rdinit=/init', 'panic=-1', 'quiet'];
  if (opts.withAgent === false) cmdline.push('nbe2e.noagent');
  const disks = opts.disks.map(
    (d, i) => `    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='${opts.cache ?? 'none'}'/>
      <source file='${xmlEscape(path.resolve(d))}'/>
      <target dev='${diskTarget(i)}' bus='virtio'/>
    </disk>`,
  );
  return `<domain type='${DOMAIN_TYPE}'>
  <name>${xmlEscape(opts.name)}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>${xmlEscape(path.join(GUEST_CACHE, 'vmlinuz'))}</kernel>
    <initrd>${xmlEscape(path.join(GUEST_CACHE, 'initrd.gz'))}</initrd>
    <cmdline>${cmdline.join(' ')}</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
${disks.join('\n')}
    <channel type='unix'>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <serial type='file'>
      <source path='${xmlEscape(consoleLog)}'/>
      <target port='0'/>
    </serial>
    <video><model type='none'/></video>
    <memballoon model='none'/>
  </devices>
</domain>
`;
}

/** Send one guest-agent command; returns the parsed JSON reply or throws with virsh's error. */
export async function agentCommand(name: string, execute: string, args?: object): Promise<unknown> {
  const cmd = JSON.stringify(args ? { execute, arguments: args } : { execute });
  const r = await virsh(['qemu-agent-command', name, cmd, '--timeout', '10'], { timeoutMs: 30_000 });
  if (r.exitCode !== 0) throw new Error(`${execute} on ${name}: ${r.stderr.trim() || r.stdout.trim()}`);
  return JSON.parse(r.stdout);
}

async function domainExists(name: string): Promise<boolean> {
  return (await virsh(['domstate', name], { timeoutMs: 15_000 })).exitCode === 0;
}

function tail(file: string, lines = 30): string {
  try {
    return fs.readFileSync(file, 'utf8').split('\n').slice(-lines).join('\n');
  } catch {
    return '(no console log)';
  }
}

/** Start a transient TCG domain from the lab guest and wait until it is usable. */
export async function startGuest(opts: GuestOptions): Promise<Guest> {
  if (!/^nbe2e-[A-Za-z0-9_.-]+$/.test(opts.name)) throw new Error(`guest name must match nbe2e-*: ${opts.name}`);
  if (opts.disks.length < 1 || opts.disks.length > 26) throw new Error('need 1..26 disks');
  const deadline = Date.now() + (opts.bootTimeoutMs ?? 120_000);
  const left = () => Math.max(0, deadline - Date.now());
  const consoleLog = path.join(opts.dir, `${opts.name}.console.log`);
  const xmlPath = path.join(opts.dir, `${opts.name}.xml`);
  fs.rmSync(consoleLog, { force: true });
  fs.writeFileSync(xmlPath, domainXml(opts, consoleLog));

  const destroy = async () => {
    const r = await virsh(['destroy', opts.name], { timeoutMs: 60_000 });
    if (r.exitCode !== 0 && !/failed to get domain|not found|not running/i.test(r.stderr)) {
      throw new Error(`virsh destroy ${opts.name}: ${r.stderr.trim()}`);
    }
  };

  const t0 = Date.now();
  await virsh(['create', xmlPath], { check: true, timeoutMs: 60_000 });
  try {
    let polls = 0;
    await waitFor(`${READY_MARKER} on ${opts.name}'s console`, left(), async () => {
      if (fs.existsSync(consoleLog) && fs.readFileSync(consoleLog, 'utf8').includes(READY_MARKER)) return true;
      // A guest that panicked is destroyed (on_crash/on_reboot): fail fast.
      if (++polls % 5 === 0 && !(await domainExists(opts.name))) throw new Error(`${opts.name} vanished while booting`);
      return false;
    });
    const readyMs = Date.now() - t0;
    let agentMs: number | undefined;
    if (opts.withAgent !== false) {
      await waitFor(`guest-ping on ${opts.name}`, left(), async () => {
        try {
          await agentCommand(opts.name, 'guest-ping');
          return true;
        } catch {
          return false;
        }
      });
      agentMs = Date.now() - t0;
    }
    return { name: opts.name, consoleLog, xmlPath, timings: { readyMs, agentMs }, destroy };
  } catch (e) {
    await destroy().catch(() => {});
    throw new Error(`${(e as Error).message}\n--- console (${consoleLog}) ---\n${tail(consoleLog)}`, { cause: e });
  }
}

/** The device alias libvirt gave the disk with this target (virtio-disk0 for vda, ...). */
export async function diskAlias(name: string, target: string): Promise<string> {
  const xml = (await virsh(['dumpxml', name], { check: true })).stdout;
  for (const disk of xml.match(/<disk[\s\S]*?<\/disk>/g) ?? []) {
    if (new RegExp(`<target dev='${target}'`).test(disk)) {
      const alias = disk.match(/<alias name='([^']+)'/)?.[1];
      if (alias) return alias;
    }
  }
  throw new Error(`no disk ${target} with an alias on ${name}`);
}

export interface GuestWrite {
  target: string;
  /** Byte value 0..255 written with qemu-io's -P. */
  pattern: number;
  offset: number;
  length: number;
}

/** QEMU's per-domain log; virtlogd appends qemu-io's reports to it. */
export const qemuLogPath = (name: string) => `/var/log/libvirt/qemu/${name}.log`;

const fileSize = (p: string) => {
  try {
    return fs.statSync(p).size;
  } catch {
    return 0;
  }
};

/**
 * Write a byte pattern into a running guest's disk from the host, through
 * QEMU's own block layer (so dirty bitmaps see it). The device must be named
 * by its QOM path: the short alias has no block backend, and the node name
 * conflicts with the guest's write permission.
 *
 * HMP replies with nothing even when the write fails (e.g. past the end of
 * the disk): qemu-io reports to QEMU's stdout, which lands in the domain log.
 * So the outcome is read from there.
 */
export async function guestWrite(name: string, w: GuestWrite): Promise<void> {
  if (!Number.isInteger(w.pattern) || w.pattern < 0 || w.pattern > 255) throw new Error(`bad pattern ${w.pattern}`);
  for (const n of [w.offset, w.length]) if (!Number.isSafeInteger(n) || n < 0) throw new Error(`bad offset/length ${n}`);
  const alias = await diskAlias(name, w.target);
  const io = `write -P 0x${w.pattern.toString(16).padStart(2, '0')} ${w.offset} ${w.length}`;
  const hmp = `qemu-io -d /machine/peripheral/${alias}/virtio-backend "${io}"`;
  const logFile = qemuLogPath(name);
  const before = fileSize(logFile);
  const r = await virsh(['qemu-monitor-command', name, '--hmp', hmp], { check: true });
  if (r.stdout.trim()) throw new Error(`qemu-io on ${name}/${w.target}: ${r.stdout.trim()}`);

  const ok = `wrote ${w.length}/${w.length} bytes at offset ${w.offset}`;
  const report = await waitFor(
    `qemu-io report in ${logFile}`,
    10_000,
    () => {
      const fd = fs.openSync(logFile, 'r');
      try {
        const buf = Buffer.alloc(Math.max(0, fileSize(logFile) - before));
        fs.readSync(fd, buf, 0, buf.length, before);
        const text = buf.toString('utf8');
        return text.includes(ok) || /(write|qemu-io).*(failed|error)/i.test(text) ? text : undefined;
      } finally {
        fs.closeSync(fd);
      }
    },
    50,
  );
  if (!report.includes(ok)) throw new Error(`qemu-io "${io}" on ${name}/${w.target} failed:\n${report.trim()}`);
}

/** What a bin/nasbackup run gave: the agent reads only stdout and the exit code. */
export interface Outcome {
  code: number | null;
  stdout: string;
  stderr: string;
}

/**
 * One e2e file's host side, all below its own folder (mkdtemp): `tmp` (the program's TMPDIR,
 * where it mounts the NAS), the agent log, `pool` (guest disks), `inspect` (where a test
 * mounts a NAS image to look at it between runs).
 */
export interface Sandbox {
  dir: string;
  tmp: string;
  logFile: string;
  pool: string;
  inspect: string;
  /** bin/nasbackup with these arguments (no shell), TMPDIR and the log file set, plus `env`. */
  cli(args: string[], env?: NodeJS.ProcessEnv): Promise<Outcome>;
  /** Look at a NAS image, mounted read-only on `inspect` (never while the program has it mounted). */
  withNas<T>(img: string, fn: (root: string) => T): T;
  /** Whether the program left something in its TMPDIR or mounted below `below` (default: TMPDIR). */
  leftovers(below?: string): { tmp: string[]; mounted: boolean };
  /** Unmount whatever is still mounted below the folder (a failed test's), then remove it. */
  remove(): void;
}

/** The folders of one e2e file (`prefix`: its mkdtemp prefix in the system temp folder). */
export function sandbox(prefix: string): Sandbox {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  const sb = {
    dir,
    tmp: path.join(dir, 'tmp'),
    logFile: path.join(dir, 'agent.log'),
    pool: path.join(dir, 'pool'),
    inspect: path.join(dir, 'inspect'),
  };
  for (const d of [sb.tmp, sb.pool, sb.inspect]) fs.mkdirSync(d);
  return {
    ...sb,
    cli: (args, env = {}) =>
      new Promise((resolve, reject) => {
        const c = spawn(NASBACKUP_BIN, args, {
          env: { ...process.env, TMPDIR: sb.tmp, NASBACKUP_LOG_FILE: sb.logFile, ...env },
          stdio: ['ignore', 'pipe', 'pipe'],
        });
        let stdout = '';
        let stderr = '';
        c.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
        c.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
        c.on('error', reject);
        c.on('close', (code) => resolve({ code, stdout, stderr }));
      }),
    withNas(img, fn) {
      execFileSync('mount', ['-o', 'loop,ro', img, sb.inspect]);
      try {
        return fn(sb.inspect);
      } finally {
        execFileSync('umount', [sb.inspect]);
      }
    },
    leftovers: (below = sb.tmp) => ({ tmp: fs.readdirSync(sb.tmp), mounted: mountsBelow(below).length > 0 }),
    remove() {
      for (const m of mountsBelow(dir).reverse()) execFileSync('umount', ['-l', m], { stdio: 'ignore' });
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** Mount points below `dir` (or `dir` itself), outermost first. */
export function mountsBelow(dir: string): string[] {
  return fs
    .readFileSync('/proc/self/mountinfo', 'utf8')
    .split('\n')
    .map((l) => l.split(' ')[4] ?? '')
    .filter((m) => m === dir || m.startsWith(`${dir}/`));
}

/** A NAS: an ext4 image of `size` (truncate's units), mounted by the program with `-m loop`. */
export function makeNasImage(file: string, size: string, { rootReserve = true } = {}): string {
  execFileSync('truncate', ['-s', size, file]);
  execFileSync('mkfs.ext4', ['-q', '-F', ...(rootReserve ? [] : ['-m', '0']), file]);
  return file;
}

/** The NAS arguments for an image made by makeNasImage. */
export const loopNas = (img: string): string[] => ['-t', 'ext4', '-s', img, '-m', 'loop'];

/** The names of a domain's checkpoints. */
export async function checkpointNames(vm: string): Promise<string[]> {
  const r = await virsh(['checkpoint-list', vm, '--name'], { check: true });
  return r.stdout
    .split('\n')
    .map((s) => s.trim())
    .filter(Boolean);
}
