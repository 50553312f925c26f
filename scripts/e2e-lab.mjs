#!/usr/bin/env node
// End-to-end lab for nasbackup: real libvirt + QEMU (TCG) with a tiny
// agent-equipped guest, on a Debian 12 host without systemd.
// See docs/e2e-lab.md for the background of every step here.
//
//   node scripts/e2e-lab.mjs setup    install packages, configure qemu.conf, build guest assets
//   node scripts/e2e-lab.mjs start    start virtlogd/libvirtd unless libvirt already answers
//   node scripts/e2e-lab.mjs stop     destroy nbe2e-* domains, stop the daemons this lab started
//   node scripts/e2e-lab.mjs status   show what is running
//
// Every subcommand is idempotent.
import { $ } from 'zx';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

$.verbose = false;
$.quiet = true; // only our own progress lines; failures carry the command output

const CACHE_DIR = process.env.NASBACKUP_E2E_CACHE || '/var/cache/nasbackup-e2e/guest';
const STATE_DIR = '/run/nasbackup-e2e';
const QEMU_CONF = '/etc/libvirt/qemu.conf';
const VIRSH_URI = 'qemu:///system';
const DOMAIN_PREFIX = 'nbe2e-';
// Bump when the guest layout or /init changes, so cached assets get rebuilt.
const GUEST_FORMAT = 1;

const PACKAGES = [
  'libvirt-daemon-system',
  'libvirt-clients',
  'libvirt-daemon-driver-qemu',
  'qemu-system-x86',
  'qemu-utils',
  'e2fsprogs',
  'cpio', // builds the guest initramfs; not in the Debian base image
];

// insmod order matters: each module must come after the ones it uses.
// A module missing from the package is built into the kernel.
const GUEST_MODULES = [
  'virtio_ring',
  'virtio',
  'virtio_pci_modern_dev',
  'virtio_pci_legacy_dev',
  'virtio_pci',
  'virtio_blk',
  'virtio_console',
];

const QEMU_CONF_BEGIN = '# BEGIN nasbackup-e2e (managed by scripts/e2e-lab.mjs)';
const QEMU_CONF_END = '# END nasbackup-e2e';
// Why each line: docs/e2e-lab.md §3. namespaces = [] is what
// makes NAS mounts made after domain start visible to QEMU.
const QEMU_CONF_BLOCK = `${QEMU_CONF_BEGIN}
user = "root"
group = "root"
security_driver = "none"
dynamic_ownership = 0
remember_owner = 0
cgroup_controllers = [ ]
namespaces = [ ]
${QEMU_CONF_END}
`;

// Daemons this lab may start: pidfile written by the daemon, expected comm.
const DAEMONS = {
  virtlogd: { pidfile: '/run/virtlogd.pid', comm: 'virtlogd' },
  libvirtd: { pidfile: '/run/libvirtd.pid', comm: 'libvirtd' },
};

const t0 = Date.now();
const log = (msg) => console.log(`[e2e-lab +${((Date.now() - t0) / 1000).toFixed(1)}s] ${msg}`);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// ---------------------------------------------------------------- helpers

async function waitFor(what, deadlineMs, probe, intervalMs = 200) {
  const end = Date.now() + deadlineMs;
  for (;;) {
    const v = await probe();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out after ${deadlineMs / 1000}s waiting for ${what}`);
    await sleep(intervalMs);
  }
}

function readText(p) {
  try {
    return fs.readFileSync(p, 'utf8');
  } catch {
    return undefined;
  }
}

/** Process identity: pid + start time, so a recycled PID is never mistaken for ours. */
function procInfo(pid) {
  const comm = readText(`/proc/${pid}/comm`)?.trim();
  const stat = readText(`/proc/${pid}/stat`);
  if (!comm || !stat) return undefined;
  // Field 22 (starttime) counted after the parenthesised comm, which may contain spaces.
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return { pid, comm, start: fields[19] };
}

function pidFromFile(p) {
  const pid = Number.parseInt(readText(p) ?? '', 10);
  return Number.isInteger(pid) && pid > 0 ? pid : undefined;
}

/** The live daemon according to its own pidfile, if its comm matches. */
function liveDaemon(name) {
  const { pidfile, comm } = DAEMONS[name];
  const pid = pidFromFile(pidfile);
  const info = pid && procInfo(pid);
  return info && info.comm === comm ? info : undefined;
}

const recordPath = (name) => path.join(STATE_DIR, `${name}.pid`);

/** A daemon we started and that is still the same process. */
function ourDaemon(name) {
  const rec = readText(recordPath(name));
  if (!rec) return undefined;
  const [pid, start] = rec.trim().split(/\s+/);
  const info = procInfo(Number(pid));
  if (info && info.comm === DAEMONS[name].comm && info.start === start) return info;
  fs.rmSync(recordPath(name), { force: true }); // stale record
  return undefined;
}

async function virshAnswers(timeout = '10s') {
  const r = await $`virsh -c ${VIRSH_URI} version`.nothrow().quiet().timeout(timeout);
  return r.exitCode === 0;
}

// ------------------------------------------------------------------ setup

let aptUpdated = false;
const aptEnv = { ...process.env, DEBIAN_FRONTEND: 'noninteractive' };

async function aptUpdate() {
  if (aptUpdated) return;
  log('apt-get update');
  await $({ env: aptEnv })`apt-get update -q`.timeout('5m');
  aptUpdated = true;
}

async function isInstalled(pkg) {
  const r = await $`dpkg-query -W -f=${'${Status}'} ${pkg}`.nothrow();
  return / ok installed$/.test(r.stdout.trim());
}

async function installPackages() {
  const missing = [];
  for (const p of PACKAGES) if (!(await isInstalled(p))) missing.push(p);
  if (missing.length === 0) {
    log('packages: all present');
    return;
  }
  // Keep postinst scripts from starting services; only remove a file we created.
  const policy = '/usr/sbin/policy-rc.d';
  const ownPolicy = !fs.existsSync(policy);
  if (ownPolicy) fs.writeFileSync(policy, '#!/bin/sh\nexit 101\n', { mode: 0o755 });
  try {
    await aptUpdate();
    log(`apt-get install ${missing.join(' ')}`);
    const t = Date.now();
    await $({ env: aptEnv })`apt-get install -y -q --no-install-recommends ${missing}`.timeout('15m');
    log(`packages installed in ${((Date.now() - t) / 1000).toFixed(1)}s`);
  } finally {
    if (ownPolicy) fs.rmSync(policy, { force: true });
  }
}

function configureQemu() {
  const conf = readText(QEMU_CONF);
  if (conf === undefined) throw new Error(`${QEMU_CONF} missing after install`);
  if (conf.includes(QEMU_CONF_BEGIN)) {
    log('qemu.conf: lab block present');
    return;
  }
  fs.appendFileSync(QEMU_CONF, (conf.endsWith('\n') ? '\n' : '\n\n') + QEMU_CONF_BLOCK);
  log('qemu.conf: lab block appended');
  if (liveDaemon('libvirtd')) log('WARNING: libvirtd is already running; restart it to apply qemu.conf');
}

async function resolveKernelPackage() {
  for (const meta of ['linux-image-cloud-amd64', 'linux-image-amd64']) {
    const r = await $`apt-cache depends ${meta}`.nothrow();
    const m = r.stdout.match(/Depends:\s+(linux-image-\d[^\s<>]*)/);
    if (m) return m[1];
  }
  throw new Error('cannot resolve a kernel package via apt-cache depends');
}

function findFile(root, basename) {
  for (const rel of fs.readdirSync(root, { recursive: true })) {
    if (path.basename(rel) === basename) return path.join(root, rel);
  }
  return undefined;
}

function guestInit() {
  // Runs as PID 1 in the guest (busybox sh). Every wait is bounded; failures
  // are printed to the console log, which the host-side helpers show on error.
  return `#!/bin/busybox sh
# nasbackup e2e guest init (generated by scripts/e2e-lab.mjs)
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/null >/dev/console 2>&1
say() { echo "E2E-GUEST: $*"; }

for m in $(cat /lib/modules/load.order); do
  insmod /lib/modules/$m.ko || say "insmod $m failed"
done

# Block device nodes appear asynchronously after virtio_blk probes (max 10 s).
for s in /sys/block/vd*; do
  [ -e "$s" ] || continue
  n=0
  while [ ! -b /dev/\${s##*/} ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
done

# Data disks: mount any ext4 so fsfreeze has a filesystem to freeze.
for d in /dev/vd[b-z]; do
  [ -b "$d" ] || continue
  mkdir -p /mnt/\${d#/dev/}
  if mount -t ext4 "$d" /mnt/\${d#/dev/} 2>/dev/null; then say "mounted $d"; fi
done

# Guest agent on the org.qemu.guest_agent.0 port (max 20 s to appear),
# unless the host asked for an agent-less guest.
port=
if ! grep -q nbe2e.noagent /proc/cmdline; then
  n=0
  while [ -z "$port" ] && [ $n -lt 200 ]; do
    for f in /sys/class/virtio-ports/*/name; do
      [ -f "$f" ] || continue
      if [ "$(cat "$f")" = org.qemu.guest_agent.0 ]; then p=\${f%/name}; port=/dev/\${p##*/}; fi
    done
    [ -n "$port" ] || { sleep 0.1; n=$((n+1)); }
  done
  # -t /run is essential: without a state dir the agent never connects.
  if [ -n "$port" ] && qemu-ga -d -m virtio-serial -p "$port" -t /run -f /run/qemu-ga.pid -l /run/qemu-ga.log; then
    say "agent on $port"
  else
    say "no agent port found"
  fi
fi

echo E2E-GUEST-READY
while :; do sleep 3600; done
`;
}

async function buildGuest() {
  const manifestPath = path.join(CACHE_DIR, 'manifest.json');
  const manifest = JSON.parse(readText(manifestPath) ?? 'null');
  if (
    manifest?.format === GUEST_FORMAT &&
    fs.existsSync(path.join(CACHE_DIR, 'vmlinuz')) &&
    fs.existsSync(path.join(CACHE_DIR, 'initrd.gz'))
  ) {
    log(`guest assets: cached in ${CACHE_DIR} (${manifest.kernelPackage})`);
    return;
  }
  const started = Date.now();
  // apt-cache needs package lists; a fresh machine may have none.
  let kernelPackage = await resolveKernelPackage().catch(() => undefined);
  if (!kernelPackage) {
    await aptUpdate();
    kernelPackage = await resolveKernelPackage();
  }
  log(`guest assets: building from ${kernelPackage}, busybox-static, qemu-guest-agent`);

  const work = fs.mkdtempSync(path.join(os.tmpdir(), 'nbe2e-guest-'));
  try {
    const x = path.join(work, 'x');
    const root = path.join(work, 'root');
    // The sandbox option avoids the _apt user failing to write into a private dir.
    await $({ cwd: work })`apt-get -q -o APT::Sandbox::User=root download ${kernelPackage} busybox-static qemu-guest-agent`.timeout('5m');
    for (const deb of fs.readdirSync(work).filter((f) => f.endsWith('.deb'))) {
      await $`dpkg-deb -x ${path.join(work, deb)} ${x}`;
    }

    const kver = fs.readdirSync(path.join(x, 'lib/modules'))[0];
    const vmlinuz = path.join(x, 'boot', `vmlinuz-${kver}`);
    if (!kver || !fs.existsSync(vmlinuz)) throw new Error('kernel image not found in package');

    for (const d of ['bin', 'sbin', 'usr/sbin', 'lib/modules', 'proc', 'sys', 'dev', 'run', 'tmp', 'mnt']) {
      fs.mkdirSync(path.join(root, d), { recursive: true });
    }
    const busybox = [path.join(x, 'bin/busybox'), path.join(x, 'usr/bin/busybox')].find((p) => fs.existsSync(p));
    if (!busybox) throw new Error('busybox not found in busybox-static');
    fs.copyFileSync(busybox, path.join(root, 'bin/busybox'));
    fs.chmodSync(path.join(root, 'bin/busybox'), 0o755);

    // qemu-ga plus every shared library it loads, at the same paths.
    const qga = path.join(x, 'usr/sbin/qemu-ga');
    fs.copyFileSync(qga, path.join(root, 'usr/sbin/qemu-ga'));
    fs.chmodSync(path.join(root, 'usr/sbin/qemu-ga'), 0o755);
    const ldd = (await $`ldd ${qga}`).stdout;
    if (/not found/.test(ldd)) throw new Error(`qemu-ga has unresolved libraries on this host:\n${ldd}`);
    for (const lib of ldd.matchAll(/(\/\S+)\s+\(0x/g)) {
      const dst = path.join(root, lib[1]);
      fs.mkdirSync(path.dirname(dst), { recursive: true });
      fs.copyFileSync(lib[1], dst); // follows symlinks: the guest gets real files
    }

    const modRoot = path.join(x, 'lib/modules', kver);
    const loaded = [];
    for (const m of GUEST_MODULES) {
      const ko = findFile(modRoot, `${m}.ko`);
      if (!ko) continue; // built in
      fs.copyFileSync(ko, path.join(root, 'lib/modules', `${m}.ko`));
      loaded.push(m);
    }
    fs.writeFileSync(path.join(root, 'lib/modules/load.order'), loaded.join('\n') + '\n');

    fs.writeFileSync(path.join(root, 'init'), guestInit(), { mode: 0o755 });
    // qemu-ga's guest-shutdown runs /sbin/shutdown; make it a clean poweroff.
    fs.writeFileSync(path.join(root, 'sbin/shutdown'), '#!/bin/sh\nsync\nexec /bin/busybox poweroff -f\n', {
      mode: 0o755,
    });

    const initrd = path.join(work, 'initrd.gz');
    await $({ cwd: root })`find . -print0 | cpio --null -o -H newc --quiet | gzip -6 > ${initrd}`;

    // Publish atomically: files first, manifest last (it marks the cache complete).
    fs.mkdirSync(CACHE_DIR, { recursive: true });
    for (const [src, name] of [
      [vmlinuz, 'vmlinuz'],
      [initrd, 'initrd.gz'],
    ]) {
      fs.copyFileSync(src, path.join(CACHE_DIR, `${name}.tmp`));
      fs.renameSync(path.join(CACHE_DIR, `${name}.tmp`), path.join(CACHE_DIR, name));
    }
    const info = { format: GUEST_FORMAT, kernelPackage, kernelVersion: kver, modules: loaded, built: new Date().toISOString() };
    fs.writeFileSync(manifestPath, JSON.stringify(info, null, 2) + '\n');
    const size = (fs.statSync(path.join(CACHE_DIR, 'initrd.gz')).size / 1048576).toFixed(1);
    log(`guest assets: built in ${((Date.now() - started) / 1000).toFixed(1)}s (initrd ${size} MiB, modules: ${loaded.join(' ')})`);
  } finally {
    fs.rmSync(work, { recursive: true, force: true });
  }
}

async function setup() {
  if (process.getuid?.() !== 0) throw new Error('setup must run as root');
  await installPackages();
  configureQemu();
  await buildGuest();
  log('setup done');
}

// ------------------------------------------------------------------ start

async function startDaemon(name, args) {
  const { pidfile } = DAEMONS[name];
  // -d forks into the background; ignore stdio so we never wait on its pipes.
  await $({ stdio: 'ignore' })`${name} ${args}`.timeout('30s');
  const info = await waitFor(`${name} pidfile`, 15_000, () => liveDaemon(name));
  fs.mkdirSync(STATE_DIR, { recursive: true });
  fs.writeFileSync(recordPath(name), `${info.pid} ${info.start}\n`);
  log(`${name} started (pid ${info.pid}, pidfile ${pidfile})`);
}

async function start() {
  // libvirtd hands QEMU's stdio to virtlogd, so that one must run too.
  const vl = liveDaemon('virtlogd');
  if (vl) log(`virtlogd already running (pid ${vl.pid}${ourDaemon('virtlogd') ? ', ours' : ''})`);
  else await startDaemon('virtlogd', ['-d']);

  if (await virshAnswers()) {
    const ld = liveDaemon('libvirtd');
    log(`libvirtd already answering${ld ? ` (pid ${ld.pid}${ourDaemon('libvirtd') ? ', ours' : ''})` : ''}`);
    return;
  }
  const stuck = liveDaemon('libvirtd');
  if (stuck) throw new Error(`libvirtd pid ${stuck.pid} is running but virsh does not answer`);
  await startDaemon('libvirtd', ['-d']);
  // The first call after a fresh install probes capabilities (~4 s).
  await waitFor('virsh to answer', 60_000, () => virshAnswers('15s'), 250);
  log('libvirt answers on qemu:///system');
}

// ------------------------------------------------------------------- stop

async function labDomains() {
  const r = await $`virsh -c ${VIRSH_URI} list --all --name`.nothrow().timeout('30s');
  if (r.exitCode !== 0) return undefined;
  return r.stdout
    .split('\n')
    .map((s) => s.trim())
    .filter((s) => s.startsWith(DOMAIN_PREFIX));
}

async function destroyLabDomains() {
  const doms = await labDomains();
  if (doms === undefined) {
    // libvirtd is gone: fall back to libvirt's QEMU pidfiles for lab domains.
    const runDir = '/run/libvirt/qemu';
    const names = fs.existsSync(runDir) ? fs.readdirSync(runDir) : [];
    for (const f of names) {
      if (!f.startsWith(DOMAIN_PREFIX) || !f.endsWith('.pid')) continue;
      const pid = pidFromFile(path.join(runDir, f));
      const info = pid && procInfo(pid);
      if (info && info.comm.startsWith('qemu-system')) {
        await killAndWait(info, `orphaned QEMU ${f}`);
      }
    }
    return;
  }
  for (const d of doms) {
    await $`virsh -c ${VIRSH_URI} destroy ${d}`.nothrow().timeout('60s');
    // Persistent leftovers (if a test defined one) go too, with their checkpoint records.
    await $`virsh -c ${VIRSH_URI} undefine ${d} --checkpoints-metadata`.nothrow().timeout('30s');
    log(`domain ${d} destroyed`);
  }
  if (doms.length === 0) log('no nbe2e-* domains');
}

async function killAndWait(info, label) {
  process.kill(info.pid, 'SIGTERM');
  const gone = () => procInfo(info.pid)?.start !== info.start;
  try {
    await waitFor(`${label} to exit`, 15_000, gone, 100);
  } catch {
    log(`${label} ignored SIGTERM; sending SIGKILL`);
    if (!gone()) process.kill(info.pid, 'SIGKILL');
    await waitFor(`${label} to die`, 5_000, gone, 100);
  }
  log(`${label} stopped (pid ${info.pid})`);
}

async function stop() {
  await destroyLabDomains().catch((e) => log(`WARNING: domain cleanup: ${e.message}`));
  // libvirtd first: it talks to virtlogd while shutting down.
  for (const name of ['libvirtd', 'virtlogd']) {
    const info = ourDaemon(name);
    if (info) {
      await killAndWait(info, name);
    } else {
      const other = liveDaemon(name);
      log(other ? `${name} pid ${other.pid} was not started by this lab; left running` : `${name} not running`);
    }
    fs.rmSync(recordPath(name), { force: true });
  }
  fs.rmSync(STATE_DIR, { recursive: true, force: true });
}

// ----------------------------------------------------------------- status

async function status() {
  for (const name of Object.keys(DAEMONS)) {
    const live = liveDaemon(name);
    const ours = ourDaemon(name);
    console.log(`${name.padEnd(9)} ${live ? `running pid ${live.pid}${ours ? ' (started by lab)' : ' (not ours)'}` : 'not running'}`);
  }
  const answers = await virshAnswers('5s');
  console.log(`virsh     ${answers ? 'answers on ' + VIRSH_URI : 'does not answer'}`);
  if (answers) {
    const doms = await labDomains();
    console.log(`domains   ${doms?.length ? doms.join(' ') : '(no nbe2e-* domains)'}`);
  }
  const manifest = JSON.parse(readText(path.join(CACHE_DIR, 'manifest.json')) ?? 'null');
  console.log(`guest     ${manifest ? `${CACHE_DIR} (${manifest.kernelVersion}, built ${manifest.built})` : 'not built'}`);
  console.log(`qemu.conf ${readText(QEMU_CONF)?.includes(QEMU_CONF_BEGIN) ? 'lab block present' : 'lab block absent'}`);
}

// ------------------------------------------------------------------- main

const commands = { setup, start, stop, status };
const cmd = process.argv[2];
if (!cmd || !(cmd in commands)) {
  console.error(`usage: e2e-lab.mjs ${Object.keys(commands).join('|')}`);
  process.exit(2);
}
try {
  await commands[cmd]();
} catch (e) {
  console.error(`[e2e-lab] ${cmd} failed: ${e.stderr?.trim() || e.message}`);
  process.exit(1);
}
