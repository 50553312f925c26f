#!/usr/bin/env node
// A stand-in for `virsh -c qemu:///system …` (libvirt 9.0 output formats), for the
// failure-injection tests of -o backup. It is driven by a JSON state file whose path
// is in FAKE_VIRSH_STATE: the domains (state, disks, checkpoints, bitmaps per disk,
// guest agent, how a backup job behaves) and per-command failure injections. Every
// call is appended as a JSON line ({argv, exitCode, t: ms since the epoch, inputs:
// the XML files it was given}) to "$FAKE_VIRSH_STATE.calls", and whatever the call
// changes (checkpoints, bitmaps, domain state, the job) is written back to the state
// file. Calls are serialized on a lock beside the state file, as libvirtd serializes them.
//
// backup-begin really writes its targets, as libvirt would: a full target is
// `qemu-img convert -O qcow2 <source> <target>`; an incremental one is
// `qemu-img create -f qcow2 -b <live source> -F <fmt> <target>` (libvirt leaves the
// live disk as the backing name; the program must relink it), plus the disk's
// `dirty` ranges written with qemu-io. A failed or aborted job deletes its targets.
//
// State shape (all optional unless said otherwise; see test/fakes/virsh-state.ts):
//   { version: { compiled, library, api, hypervisor },
//     connectError: { stderr, exitCode },            // every call fails like a dead libvirtd
//     queryBlock: 'inserted' | 'top-level',          // where query-block puts dirty-bitmaps
//     domains: [ { name, id, uuid, state: 'running'|'paused'|'shut off'|'in shutdown',
//                  vcpus, memoryKiB, interfaces: [{ name, type, source, model, mac }],
//                  disks: [ { type, device, target, source, format,
//                             bitmaps: [name | { name, persistent, inconsistent, recording }],
//                             bitmapsInImage,   // bitmaps read from/written to the qcow2 source instead
//                             dirty: [{ pattern, offset, length }] } ],
//                  checkpoints: [ name | { name, creationTime, disks } ],
//                  agent: { connected, frozen, filesystems },
//                  job: { behaviour: 'completed'|'failed'|'never'|'vanish', runningPolls,
//                         errorMessage, pauseOnFailure, timeElapsedMs },
//                  runtime: { active, completed }   // kept by the fake
//     } ],
//     fail: { '<command>' | '<command>:<detail>':
//             { exitCode, stderr, stdout, apply, times, skip, delayMs } } }
// <detail> is the guest-agent/QMP command name for qemu-agent-command and
// qemu-monitor-command (e.g. "qemu-agent-command:guest-fsfreeze-thaw"), and
// "completed"/"active" for domjobinfo with/without --completed.
import { execFileSync } from 'node:child_process';
import {
  appendFileSync,
  chmodSync,
  closeSync,
  existsSync,
  mkdirSync,
  openSync,
  readFileSync,
  readSync,
  realpathSync,
  statfsSync,
  writeSync,
  renameSync,
  rmSync,
  statSync,
  unlinkSync,
  writeFileSync,
} from 'node:fs';
import { dirname } from 'node:path';
import { fileURLToPath } from 'node:url';

/** The state file, its content, and whether this call changed it. */
let STATE = '';
let state = {};
let dirty = false;

function load(path) {
  STATE = path;
  state = JSON.parse(readFileSync(path, 'utf8'));
  dirty = false;
}

class VirshError extends Error {
  constructor(stderr, exitCode = 1) {
    super(stderr);
    this.stderr = stderr;
    this.exitCode = exitCode;
  }
}
const fail = (msg) => {
  throw new VirshError(`error: ${msg}\n`);
};

// ---------------------------------------------------------------- formatting

/** virsh's vshTable: leading space, cells padded to the column width, 3-space gaps; the dash line is 2 longer than a full row. */
function table(header, rows) {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => String(r[i]).length)));
  const line = (cells) => ' ' + cells.map((c, i) => (i < cells.length - 1 ? String(c).padEnd(widths[i]) : String(c))).join('   ');
  const total = 1 + widths.reduce((a, b) => a + b, 0) + 3 * (widths.length - 1);
  return [line(header), '-'.repeat(total + 2), ...rows.map(line)].join('\n') + '\n';
}

/** vshPrettyCapacity + "%-.3lf %s". */
function capacity(bytes) {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB', 'EiB'];
  let v = bytes;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${v.toFixed(3)} ${units[i]}`;
}

const kv = (key, value) => `${key.padEnd(17)} ${value}\n`;
const kv12 = (key, value) => `${key.padEnd(17)} ${String(value).padEnd(12)}\n`;

function jobBlock(j, { anystats }) {
  let out = kv12('Job type:', j.type);
  if (j.type === 'None') return out;
  out += kv12('Operation:', 'Backup');
  // libvirt 9: a failed job's --completed statistics are only the first two lines without --anystats.
  if (j.type === 'Failed' && !anystats) return out;
  out += `${'Time elapsed:'.padEnd(17)} ${String(j.timeElapsedMs ?? 133).padEnd(12)} ms\n`;
  if (j.total > 0) {
    out += kv('File processed:', capacity(j.processed));
    out += kv('File remaining:', capacity(j.total - j.processed));
    out += kv('File total:', capacity(j.total));
  }
  if (j.errorMessage) out += kv('Error message:', j.errorMessage);
  return out;
}

const xmlAttr = (s) =>
  String(s).replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/'/g, '&apos;').replace(/"/g, '&quot;');
const xmlText = (s) => String(s).replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');

function unescapeXml(s) {
  return s.replace(/&(#x[0-9a-fA-F]+|#\d+|amp|lt|gt|quot|apos);/g, (_, e) => {
    if (e[0] === '#') return String.fromCodePoint(e[1] === 'x' ? parseInt(e.slice(2), 16) : parseInt(e.slice(1), 10));
    return { amp: '&', lt: '<', gt: '>', quot: '"', apos: "'" }[e];
  });
}

function attrs(s) {
  const out = {};
  for (const m of s.matchAll(/([A-Za-z_:][\w.:-]*)\s*=\s*("([^"]*)"|'([^']*)')/g)) out[m[1]] = unescapeXml(m[3] ?? m[4] ?? '');
  return out;
}

function readXml(file) {
  try {
    return readFileSync(file, 'utf8');
  } catch (e) {
    fail(`Failed to open file '${file}': ${e.code === 'ENOENT' ? 'No such file or directory' : e.message}`);
  }
}

const textOf = (xml, tag) => {
  const m = new RegExp(`<${tag}>([^<]*)</${tag}>`).exec(xml);
  return m ? unescapeXml(m[1]).trim() : null;
};

/** <disk …/> or <disk …>…</disk> elements: their attributes and inner text. */
function diskElements(xml) {
  const out = [];
  for (const m of xml.matchAll(/<disk\b([^>]*?)(\/>|>([\s\S]*?)<\/disk>)/g)) out.push({ attrs: attrs(m[1]), inner: m[3] ?? '' });
  return out;
}

// ---------------------------------------------------------------- state helpers

const domains = () => (state.domains ??= []);
const isActive = (d) => d.state !== 'shut off';

function domain(name) {
  const d = domains().find((x) => x.name === name);
  if (!d) fail(`failed to get domain '${name}'`);
  return d;
}

const checkpoints = (d) => (d.checkpoints ??= []).map((c) => (typeof c === 'string' ? { name: c } : c));
function setCheckpoints(d, list) {
  d.checkpoints = list;
  dirty = true;
}
/**
 * A disk with bitmapsInImage keeps its bitmaps in the qcow2 source itself, as QEMU
 * would load them: `auto` = recording, `in-use` (left by a crash) = inconsistent.
 */
function imageBitmaps(disk) {
  const info = JSON.parse(execFileSync('qemu-img', ['info', '--output=json', '-U', disk.source], { encoding: 'utf8' }));
  return (info['format-specific']?.data?.bitmaps ?? []).map((b) => {
    const inUse = b.flags.includes('in-use');
    return {
      name: b.name,
      recording: b.flags.includes('auto') && !inUse,
      persistent: true,
      busy: false,
      ...(inUse ? { inconsistent: true } : {}),
    };
  });
}
const bitmapsOf = (disk) =>
  disk.bitmapsInImage ? imageBitmaps(disk) : (disk.bitmaps ??= []).map((b) => (typeof b === 'string' ? { name: b } : b));
const hasBitmap = (disk, name) => bitmapsOf(disk).some((b) => b.name === name);
function addBitmap(disk, name) {
  if (disk.bitmapsInImage) return qemuImg(['bitmap', '--add', disk.source, name]);
  disk.bitmaps = [...bitmapsOf(disk), { name, recording: true, persistent: true, busy: false }];
  dirty = true;
}
function removeBitmap(disk, name) {
  if (disk.bitmapsInImage) return qemuImg(['bitmap', '--remove', disk.source, name]);
  disk.bitmaps = bitmapsOf(disk).filter((b) => b.name !== name);
  dirty = true;
}
const runtime = (d) => (d.runtime ??= { active: null, completed: null });

/** Move a started job along: called on every domjobinfo/domjobabort. */
function advanceJob(d) {
  const rt = runtime(d);
  const a = rt.active;
  if (!a) return;
  const behaviour = a.behaviour;
  if (behaviour === 'vanish') {
    rt.active = null;
    rt.completed = null;
    dirty = true;
    return;
  }
  a.seen = (a.seen ?? 0) + 1;
  dirty = true;
  if (a.pauseAfterPolls !== undefined && a.seen > a.pauseAfterPolls && !a.pausedMidJob) {
    // The guest's write failed in the push target (copy-before-write): the VM pauses, the job runs on.
    a.pausedMidJob = true;
    if (a.fillTargetFs) fillFilesystemOf(a.targets[0]);
    pauseOnIoError(d);
    dirty = true;
  }
  if (behaviour === 'never') return;
  if (a.polls < a.runningPolls) {
    a.polls++;
    a.processed = Math.min(a.total, Math.round((a.total * a.polls) / (a.runningPolls + 1)));
    dirty = true;
    return;
  }
  rt.active = null;
  if (behaviour === 'failed') {
    rt.completed = {
      type: 'Failed',
      timeElapsedMs: a.timeElapsedMs,
      processed: Math.max(0, a.total - 4 * 1048576),
      total: a.total,
      errorMessage: a.errorMessage ?? 'No space left on device',
    };
    removeTargets(a.targets); // libvirt deletes the partial target files of a failed push backup
    if (a.pauseOnFailure) pauseOnIoError(d); // e.g. an I/O error with werror=stop
  } else {
    rt.completed = { type: 'Completed', timeElapsedMs: a.timeElapsedMs, processed: a.total, total: a.total };
  }
  dirty = true;
}

function pauseOnIoError(d) {
  d.state = 'paused';
  d.stateReason = 'I/O error';
}

/** Grow `file` until its file system is full (as a push target on a full NAS does); only on a small one. */
function fillFilesystemOf(file) {
  const st = statfsSync(dirname(file));
  if (st.blocks * st.bsize > 256 * 1048576) throw new Error(`refusing to fill ${dirname(file)}: not a small test file system`);
  const chunk = Buffer.alloc(1048576, 0x5a);
  const fd = openSync(file, 'a');
  try {
    for (;;) writeSync(fd, chunk);
  } catch (e) {
    if (e.code !== 'ENOSPC') throw e;
  } finally {
    closeSync(fd);
  }
}

function removeTargets(targets) {
  for (const t of targets ?? []) rmSync(t, { force: true });
}

/**
 * A failure injection for this call, or null. An entry fails the call (exitCode,
 * default 1, with stderr) — after doing what the call does when `apply` is set (a
 * reply lost to a timeout) — or with exitCode 0 answers `stdout` instead; an entry
 * with only `delayMs` just slows the call down. `skip` lets that many calls pass
 * first, `times` limits how many calls it affects.
 */
function injected(cmd, detail) {
  const all = state.fail ?? {};
  const key = detail && all[`${cmd}:${detail}`] ? `${cmd}:${detail}` : all[cmd] ? cmd : null;
  if (!key) return null;
  const f = all[key];
  if (f.skip > 0) {
    f.skip--;
    dirty = true;
    return null;
  }
  if (f.times !== undefined) {
    if (f.times <= 0) return null;
    f.times--;
    dirty = true;
  }
  if (f.delayMs) Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, f.delayMs);
  if (f.exitCode === undefined && f.stderr === undefined && f.stdout === undefined) return null;
  if (f.exitCode === 0) return { ok: f.stdout ?? '' };
  return { error: new VirshError(f.stderr ?? 'error: injected failure\n', f.exitCode ?? 1), apply: f.apply === true };
}

// ---------------------------------------------------------------- commands

const positional = (args) => args.filter((a) => !a.startsWith('--'));
const flag = (args, f) => args.includes(f);
function option(args, name) {
  const i = args.indexOf(name);
  return i >= 0 ? args[i + 1] : undefined;
}

function versionText() {
  const v = state.version ?? {};
  return (
    `Compiled against library: libvirt ${v.compiled ?? '9.0.0'}\n` +
    `Using library: libvirt ${v.library ?? '9.0.0'}\n` +
    `Using API: QEMU ${v.api ?? '9.0.0'}\n` +
    `Running hypervisor: ${v.hypervisor ?? 'QEMU 7.2.0'}\n`
  );
}

function list(args) {
  const all = flag(args, '--all');
  const ds = domains()
    .filter((d) => all || isActive(d))
    .sort((a, b) => (isActive(a) ? a.id : Infinity) - (isActive(b) ? b.id : Infinity));
  if (flag(args, '--name')) return ds.map((d) => `${d.name}\n`).join('');
  return table(
    ['Id', 'Name', 'State'],
    ds.map((d) => [isActive(d) ? String(d.id) : '-', d.name, d.state]),
  );
}

function domblklist(args) {
  const d = domain(positional(args)[0]);
  const disks = d.disks ?? [];
  if (flag(args, '--details')) {
    return table(
      ['Type', 'Device', 'Target', 'Source'],
      disks.map((k) => [k.type ?? 'file', k.device ?? 'disk', k.target, k.source ?? '-']),
    );
  }
  return table(
    ['Target', 'Source'],
    disks.map((k) => [k.target, k.source ?? '-']),
  );
}

function dumpxml(args) {
  const d = domain(positional(args)[0]);
  const active = isActive(d);
  const disks = d.disks ?? [];
  let out = `<domain type='kvm'${active ? ` id='${d.id}'` : ''}>\n`;
  out += `  <name>${xmlText(d.name)}</name>\n  <uuid>${d.uuid}</uuid>\n`;
  if (d.description) out += `  <description>${xmlText(d.description)}</description>\n`;
  out += `  <memory unit='KiB'>${d.memoryKiB ?? 1048576}</memory>\n  <currentMemory unit='KiB'>${d.memoryKiB ?? 1048576}</currentMemory>\n`;
  out += `  <vcpu placement='static'>${d.vcpus ?? 1}</vcpu>\n`;
  out += `  <os>\n    <type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type>\n    <boot dev='cdrom'/>\n    <boot dev='hd'/>\n  </os>\n`;
  out += `  <clock offset='utc'/>\n  <on_poweroff>destroy</on_poweroff>\n  <on_reboot>restart</on_reboot>\n  <on_crash>destroy</on_crash>\n`;
  out += `  <devices>\n    <emulator>/usr/bin/qemu-system-x86_64</emulator>\n`;
  let index = disks.filter((k) => k.source && k.source !== '-').length + 1;
  let virtio = 0;
  let slot = 5;
  for (const k of disks) {
    const cdrom = (k.device ?? 'disk') === 'cdrom';
    out += `    <disk type='${k.type ?? 'file'}' device='${k.device ?? 'disk'}'>\n`;
    out += cdrom ? `      <driver name='qemu' type='raw'/>\n` : `      <driver name='qemu' type='${k.format ?? 'qcow2'}' cache='none'/>\n`;
    if (k.source && k.source !== '-') {
      out += `      <source file='${xmlAttr(k.source)}'${active ? ` index='${index--}'` : ''}/>\n`;
      if (active) out += `      <backingStore/>\n`;
    }
    if (cdrom) {
      out += `      <target dev='${k.target}' bus='ide'/>\n      <readonly/>\n`;
      if (active) out += `      <alias name='ide0-1-0'/>\n`;
      out += `      <address type='drive' controller='0' bus='1' target='0' unit='0'/>\n`;
    } else {
      const base = (k.source ?? '').split('/').at(-1) ?? '';
      out += `      <target dev='${k.target}' bus='virtio'/>\n`;
      out += `      <serial>${base.replace(/-/g, '').slice(0, 20)}</serial>\n`;
      if (active) out += `      <alias name='virtio-disk${virtio++}'/>\n`;
      out += `      <address type='pci' domain='0x0000' bus='0x00' slot='0x${(slot++).toString(16).padStart(2, '0')}' function='0x0'/>\n`;
    }
    out += `    </disk>\n`;
  }
  for (const [i, n] of (d.interfaces ?? []).entries()) {
    out += `    <interface type='${n.type}'>\n      <mac address='${n.mac}'/>\n      <source ${n.type === 'bridge' ? 'bridge' : 'network'}='${n.source}'/>\n`;
    if (active) out += `      <target dev='${n.name}'/>\n`;
    out += `      <model type='${n.model}'/>\n`;
    if (active) out += `      <alias name='net${i}'/>\n`;
    out += `      <address type='pci' domain='0x0000' bus='0x00' slot='0x${(3 + i).toString(16).padStart(2, '0')}' function='0x0'/>\n    </interface>\n`;
  }
  out += `  </devices>\n</domain>\n`;
  return out;
}

function dominfo(args) {
  const d = domain(positional(args)[0]);
  const active = isActive(d);
  let out = '';
  const line = (k, v) => (out += `${k.padEnd(15)} ${v}\n`);
  line('Id:', active ? d.id : '-');
  line('Name:', d.name);
  line('UUID:', d.uuid);
  line('OS Type:', 'hvm');
  line('State:', d.state);
  line('CPU(s):', d.vcpus ?? 1);
  if (active) line('CPU time:', '12.3s');
  line('Max memory:', `${d.memoryKiB ?? 1048576} KiB`);
  line('Used memory:', `${d.memoryKiB ?? 1048576} KiB`);
  line('Persistent:', d.persistent ? 'yes' : 'no');
  line('Autostart:', 'disable');
  line('Managed save:', 'no');
  line('Security model:', 'none');
  line('Security DOI:', '0');
  return out;
}

function domiflist(args) {
  const d = domain(positional(args)[0]);
  return table(
    ['Interface', 'Type', 'Source', 'Model', 'MAC'],
    (d.interfaces ?? []).map((n) => [n.name, n.type, n.source, n.model, n.mac]),
  );
}

/** libvirt's reason for the state (`domstate --reason`). */
function stateReason(d) {
  if (d.stateReason) return d.stateReason;
  return { running: 'booted', paused: 'user', 'shut off': 'destroyed' }[d.state] ?? 'unknown';
}

function domstate(args) {
  const d = domain(positional(args)[0]);
  return flag(args, '--reason') ? `${d.state} (${stateReason(d)})\n` : `${d.state}\n`;
}

function resume(args) {
  const d = domain(positional(args)[0]);
  if (!isActive(d))
    throw new VirshError(`error: Failed to resume domain '${d.name}'\nerror: Requested operation is not valid: domain is not running\n`);
  if (d.state === 'paused') {
    d.state = 'running';
    delete d.stateReason;
    dirty = true;
  }
  return `Domain '${d.name}' resumed\n`;
}

function suspend(args) {
  const d = domain(positional(args)[0]);
  if (!isActive(d))
    throw new VirshError(`error: Failed to suspend domain '${d.name}'\nerror: Requested operation is not valid: domain is not running\n`);
  d.state = 'paused';
  d.stateReason = 'user';
  dirty = true;
  return `Domain '${d.name}' suspended\n`;
}

function checkpointList(args) {
  const d = domain(positional(args)[0]);
  const cps = checkpoints(d);
  if (flag(args, '--name')) return cps.map((c) => `${c.name}\n`).join('');
  const when = (c) =>
    new Date((c.creationTime ?? 0) * 1000)
      .toISOString()
      .replace('T', ' ')
      .replace(/\.\d+Z$/, ' +0000');
  return table(
    ['Name', 'Creation Time'],
    cps.map((c) => [c.name, when(c)]),
  );
}

/** Registers a checkpoint: a new one adds its bitmap to every disk; --redefine only records it. */
function checkpointCreate(args) {
  const d = domain(positional(args)[0]);
  const file = option(args, '--xmlfile') ?? positional(args)[1];
  const redefine = flag(args, '--redefine');
  const xml = readXml(file);
  const name = textOf(xml, 'name');
  if (!name) fail('XML error: a checkpoint needs a name');
  const cps = checkpoints(d);
  const listed = diskElements(xml)
    .filter((e) => (e.attrs.checkpoint ?? 'bitmap') === 'bitmap')
    .map((e) => e.attrs.name);
  const targets = listed.length > 0 ? listed : (d.disks ?? []).filter((k) => (k.device ?? 'disk') === 'disk').map((k) => k.target);
  if (redefine) {
    const creationTime = textOf(xml, 'creationTime');
    if (creationTime === null) fail('internal error: missing creationTime from existing checkpoint');
    setCheckpoints(d, [...cps.filter((c) => c.name !== name), { name, creationTime: Number(creationTime), disks: targets }]);
    return `Domain checkpoint ${name} created from '${file}'\n`;
  }
  if (!isActive(d)) fail('Operation not supported: cannot create checkpoint for inactive domain');
  if (cps.some((c) => c.name === name)) fail(`invalid argument: domain moment ${name} already exists`);
  for (const t of targets) {
    const disk = (d.disks ?? []).find((k) => k.target === t);
    if (!disk) fail(`invalid argument: no disk named '${t}'`);
    if (hasBitmap(disk, name)) fail(`internal error: unable to execute QEMU command 'transaction': Bitmap already exists: ${name}`);
  }
  for (const t of targets)
    addBitmap(
      d.disks.find((k) => k.target === t),
      name,
    );
  setCheckpoints(d, [...cps, { name, creationTime: Math.floor(Date.now() / 1000), disks: targets }]);
  return `Domain checkpoint ${name} created from '${file}'\n`;
}

function checkpointDelete(args) {
  const [vm, name] = positional(args);
  const d = domain(vm);
  const cps = checkpoints(d);
  const cp = cps.find((c) => c.name === name);
  if (!cp) fail(`Domain checkpoint not found: no domain checkpoint with matching name '${name}'`);
  if (!flag(args, '--metadata')) for (const k of d.disks ?? []) if (hasBitmap(k, name)) removeBitmap(k, name);
  setCheckpoints(
    d,
    cps.filter((c) => c.name !== name),
  );
  return `Domain checkpoint ${name} deleted\n`;
}

function queryBlockReply(d) {
  const style = state.queryBlock ?? 'inserted';
  const entries = (d.disks ?? []).map((k, i) => {
    const cdrom = (k.device ?? 'disk') === 'cdrom';
    const e = {
      device: '',
      locked: cdrom,
      removable: cdrom,
      qdev: cdrom ? `ide0-1-0` : `/machine/peripheral/virtio-disk${i}/virtio-backend`,
      type: 'unknown',
    };
    if (cdrom && (!k.source || k.source === '-')) return { ...e, tray_open: false };
    const bitmaps = bitmapsOf(k).map((b) => ({
      name: b.name,
      recording: b.recording ?? true,
      persistent: b.persistent ?? true,
      busy: b.busy ?? false,
      granularity: 65536,
      count: b.count ?? 0,
      ...(b.inconsistent ? { inconsistent: true } : {}),
    }));
    const inserted = {
      'node-name': `libvirt-${i + 1}-format`,
      ro: cdrom,
      drv: k.format ?? 'qcow2',
      encrypted: false,
      file: k.source,
      backing_file_depth: 0,
      ...(existsSync(k.source) ? { image: imageOf(k) } : {}),
      detect_zeroes: 'off',
    };
    if (style === 'top-level') return { 'io-status': 'ok', ...e, 'dirty-bitmaps': bitmaps, inserted };
    return { 'io-status': 'ok', ...e, inserted: { ...inserted, 'dirty-bitmaps': bitmaps } };
  });
  return { return: entries, id: 'libvirt-42' };
}

/** query-block's `image`: virtual size and the file's host bytes (one image, no backing in the fake). */
function imageOf(k) {
  return {
    filename: k.source,
    format: k.format ?? 'qcow2',
    'virtual-size': virtualSize(k),
    'actual-size': statSync(k.source).blocks * 512,
  };
}

function monitorCommand(args) {
  const p = positional(args);
  const d = domain(p[0]);
  if (!isActive(d)) fail('Requested operation is not valid: domain is not running');
  let cmd;
  try {
    cmd = JSON.parse(p[p.length - 1]);
  } catch {
    fail('internal error: cannot parse json');
  }
  if (cmd.execute === 'query-block') return JSON.stringify(queryBlockReply(d)) + '\n';
  if (cmd.execute === 'query-block-jobs') {
    // One QEMU job per disk of a running push backup (libvirt names them backup-<target>-<node>).
    const a = runtime(d).active;
    // The disks are copied one after the other: the first job finishes first.
    let before = 0;
    const done = a ? Math.round(a.processed) : 0;
    const jobs = (a?.jobs ?? []).map((j) => ({
      'auto-finalize': true,
      'io-status': 'ok',
      device: j.device,
      'auto-dismiss': false,
      busy: false,
      len: j.len,
      offset: Math.min(j.len, Math.max(0, done - (before += j.len) + j.len)),
      status: 'running',
      paused: false,
      speed: j.speed,
      ready: false,
      type: 'backup',
    }));
    return JSON.stringify({ return: jobs, id: 'libvirt-44' }) + '\n';
  }
  if (cmd.execute === 'block-job-set-speed') {
    const job = (runtime(d).active?.jobs ?? []).find((j) => j.device === cmd.arguments?.device);
    if (!job) fail(`internal error: unable to execute QEMU command 'block-job-set-speed': Block job '${cmd.arguments?.device}' not found`);
    job.speed = cmd.arguments.speed;
    // Kept after the job ends, for the tests: every limit set, in order.
    (d.jobSpeeds ??= []).push({ device: job.device, speed: job.speed });
    dirty = true;
    return '{"return":{},"id":"libvirt-45"}\n';
  }
  if (cmd.execute === 'block-dirty-bitmap-remove') {
    const i = (d.disks ?? []).findIndex((_, n) => `libvirt-${n + 1}-format` === cmd.arguments?.node);
    if (i < 0 || !hasBitmap(d.disks[i], cmd.arguments?.name))
      fail(`internal error: unable to execute QEMU command 'block-dirty-bitmap-remove': Dirty bitmap '${cmd.arguments?.name}' not found`);
    removeBitmap(d.disks[i], cmd.arguments.name);
    return '{"return":{},"id":"libvirt-43"}\n';
  }
  fail(`internal error: unable to execute QEMU command '${cmd.execute}': The command ${cmd.execute} has not been found`);
}

function agentCommand(args) {
  const rest = [...args];
  const ti = rest.indexOf('--timeout');
  if (ti >= 0) rest.splice(ti, 2);
  const p = positional(rest);
  const d = domain(p[0]);
  if (!isActive(d)) fail('Requested operation is not valid: domain is not running');
  const agent = d.agent ?? { connected: false };
  if (!agent.connected) fail('Guest agent is not responding: QEMU guest agent is not connected');
  const cmd = JSON.parse(p[p.length - 1]);
  const n = agent.filesystems ?? 1;
  switch (cmd.execute) {
    case 'guest-fsfreeze-freeze':
      if (agent.frozen)
        fail(
          "internal error: unable to execute QEMU agent command 'guest-fsfreeze-freeze': Command guest-fsfreeze-freeze has been disabled: the agent is in frozen state",
        );
      d.agent = { ...agent, frozen: true };
      dirty = true;
      return `{"return":${n}}\n`;
    case 'guest-fsfreeze-thaw': {
      const was = agent.frozen === true;
      d.agent = { ...agent, frozen: false };
      dirty = true;
      return `{"return":${was ? n : 0}}\n`;
    }
    case 'guest-fsfreeze-status':
      return `{"return":"${agent.frozen ? 'frozen' : 'thawed'}"}\n`;
    case 'guest-ping':
      return '{"return":{}}\n';
    default:
      fail(`internal error: unable to execute QEMU agent command '${cmd.execute}': The command ${cmd.execute} has not been found.`);
  }
}

function qemuImg(args) {
  try {
    execFileSync('qemu-img', args, { stdio: ['ignore', 'ignore', 'pipe'] });
  } catch (e) {
    fail(`internal error: unable to execute QEMU command 'blockdev-add': ${String(e.stderr ?? e.message).trim()}`);
  }
}

/** Virtual size from the qcow2 header (bytes 24..31), or the file size of a raw image. */
function virtualSize(disk) {
  const buf = Buffer.alloc(32);
  const fd = openSync(disk.source, 'r');
  try {
    readSync(fd, buf, 0, 32, 0);
  } finally {
    closeSync(fd);
  }
  if (buf.length >= 32 && buf.readUInt32BE(0) === 0x514649fb) return Number(buf.readBigUInt64BE(24));
  return statSync(disk.source).size;
}

function backupBegin(args) {
  const vm = option(args, '--domain') ?? positional(args)[0];
  const d = domain(vm);
  if (!isActive(d)) fail('Requested operation is not valid: domain is not running');
  const rt = runtime(d);
  if (rt.active) fail('Requested operation is not valid: there can be only one backup job per domain');
  const bfile = option(args, '--backupxml');
  const cfile = option(args, '--checkpointxml');
  const bxml = bfile ? readXml(bfile) : '';
  const incremental = textOf(bxml, 'incremental');
  const elements = diskElements(bxml.replace(/<\/?disks>/g, ''));
  const targets = [];
  for (const el of elements) {
    if (el.attrs.backup === 'no') continue;
    const disk = (d.disks ?? []).find((k) => k.target === el.attrs.name);
    if (!disk) fail(`invalid argument: unable to find disk '${el.attrs.name}'`);
    if (!disk.source || disk.source === '-') fail(`unsupported configuration: disk '${disk.target}' has no media`);
    const t = /<target\b([^>]*)\/?>/.exec(el.inner);
    const file = t ? attrs(t[1]).file : undefined;
    if (!file) fail(`unsupported configuration: missing push mode target for disk '${disk.target}'`);
    if (incremental !== null) {
      if (!checkpoints(d).some((c) => c.name === incremental))
        fail(`Domain checkpoint not found: Checkpoint '${incremental}' for incremental backup of disk '${disk.target}' not found`);
      // libvirt 9 refuses a bitmap that is gone, inconsistent or disabled (seen in the e2e lab).
      const bm = bitmapsOf(disk).find((b) => b.name === incremental);
      if (!bm || bm.inconsistent || bm.recording === false)
        fail(`checkpoint inconsistent: missing or broken bitmap '${incremental}' for disk '${disk.target}'`);
    }
    targets.push({ disk, file });
  }
  let newCheckpoint = null;
  if (cfile) {
    const cxml = readXml(cfile);
    const name = textOf(cxml, 'name');
    if (!name) fail('XML error: a checkpoint needs a name');
    if (checkpoints(d).some((c) => c.name === name)) fail(`invalid argument: domain moment ${name} already exists`);
    const listed = diskElements(cxml)
      .filter((e) => (e.attrs.checkpoint ?? 'bitmap') === 'bitmap')
      .map((e) => e.attrs.name);
    for (const t of listed) {
      const disk = (d.disks ?? []).find((k) => k.target === t);
      if (!disk) fail(`invalid argument: no disk named '${t}'`);
      if (hasBitmap(disk, name)) fail(`internal error: unable to execute QEMU command 'transaction': Bitmap already exists: ${name}`);
    }
    newCheckpoint = { name, disks: listed };
  }
  for (const { file } of targets) {
    if (!existsSync(dirname(file))) fail(`failed to create image file '${file}': No such file or directory`);
  }
  let total = 0;
  const made = [];
  try {
    for (const { disk, file } of targets) {
      if (incremental !== null) {
        qemuImg(['create', '-q', '-f', 'qcow2', '-b', disk.source, '-F', disk.format ?? 'qcow2', file]);
        made.push(file);
        for (const w of disk.dirty ?? []) {
          execFileSync('qemu-io', ['-f', 'qcow2', '-c', `write -P ${w.pattern} ${w.offset} ${w.length}`, file], { stdio: 'ignore' });
          total += w.length;
        }
      } else {
        qemuImg(['convert', '-O', 'qcow2', disk.source, file]);
        made.push(file);
        total += virtualSize(disk);
      }
      chmodSync(file, 0o600);
    }
  } catch (e) {
    removeTargets(made);
    throw e;
  }
  if (newCheckpoint) {
    for (const t of newCheckpoint.disks)
      addBitmap(
        d.disks.find((k) => k.target === t),
        newCheckpoint.name,
      );
    setCheckpoints(d, [
      ...checkpoints(d),
      { name: newCheckpoint.name, creationTime: Math.floor(Date.now() / 1000), disks: newCheckpoint.disks },
    ]);
  }
  const job = d.job ?? {};
  rt.active = {
    behaviour: job.behaviour ?? 'completed',
    runningPolls: job.runningPolls ?? 0,
    polls: 0,
    processed: 0,
    total,
    timeElapsedMs: job.timeElapsedMs ?? 133,
    errorMessage: job.errorMessage,
    pauseOnFailure: job.pauseOnFailure === true,
    pauseAfterPolls: job.pauseAfterPolls,
    fillTargetFs: job.fillTargetFs === true,
    targets: targets.map((t) => t.file),
    jobs: targets.map(({ disk }, i) => ({ device: `backup-${disk.target}-libvirt-${i + 1}-format`, len: virtualSize(disk), speed: 0 })),
  };
  rt.completed = null;
  // A job with nothing left to run has ended by the time anyone polls (as small
  // backups do on real libvirt).
  if (rt.active.runningPolls === 0 && rt.active.behaviour !== 'never') advanceJob(d);
  dirty = true;
  return 'Backup started\n';
}

/** `blockjob <dom> <disk> --bandwidth <n> [--bytes]`: the rate limit of the disk's job (libvirt's own setting). */
function blockjob(args) {
  const [vm, target] = positional(args);
  const d = domain(vm);
  const bw = option(args, '--bandwidth');
  const job = (runtime(d).active?.jobs ?? []).find((j) => j.device.startsWith(`backup-${target}-`));
  if (!job) fail(`invalid argument: disk ${target} does not have an active block job`);
  if (bw === undefined) fail('only --bandwidth is implemented by the fake');
  job.speed = flag(args, '--bytes') ? Number(bw) : Number(bw) * 1048576;
  (d.jobSpeeds ??= []).push({ device: job.device, speed: job.speed });
  dirty = true;
  return '';
}

function domjobinfo(args) {
  const d = domain(positional(args)[0]);
  advanceJob(d);
  const rt = runtime(d);
  if (flag(args, '--completed')) {
    const c = rt.completed;
    if (!c) return jobBlock({ type: 'None' }, {});
    const out = jobBlock(c, { anystats: flag(args, '--anystats') });
    if (!flag(args, '--keep-completed')) {
      rt.completed = null;
      dirty = true;
    }
    return out;
  }
  if (rt.active) return jobBlock({ type: 'Unbounded', timeElapsedMs: 499, processed: rt.active.processed, total: rt.active.total }, {});
  return jobBlock({ type: 'None' }, {});
}

function domjobabort(args) {
  const d = domain(positional(args)[0]);
  advanceJob(d);
  const rt = runtime(d);
  if (!rt.active) fail('Requested operation is not valid: no job is active on the domain');
  const a = rt.active;
  rt.active = null;
  rt.completed = {
    type: 'Cancelled',
    timeElapsedMs: a.timeElapsedMs,
    processed: a.processed,
    total: a.total,
    errorMessage: 'operation aborted: job canceled by client',
  };
  removeTargets(a.targets);
  dirty = true;
  return '';
}

// ---------------------------------------------------------------- fast path

// Starting Node costs ~0.1 s per call, and a backup makes a dozen calls. The answers
// to the read-only queries depend on the state only, so after every change they are
// rendered into "$FAKE_VIRSH_STATE.fast/<sub-command and args>" and the `virsh` shim
// (test/fakes/virsh-state.ts) serves them with `cat`, logging the call the same way.
// Anything with a failure injection, or not rendered, comes here.
const FAST_SAFE = /^[A-Za-z0-9._ -]+$/;

function renderFast() {
  const dir = `${STATE}.fast`;
  const tmp = `${dir}.${process.pid}.tmp`;
  try {
    rmSync(dir, { recursive: true, force: true });
    if (!state.connectError) writeFast(dir, tmp);
  } catch {
    // Only a shortcut (e.g. concurrent calls rendering at once): the shim falls back to the fake.
    rmSync(tmp, { recursive: true, force: true });
  }
}

function writeFast(dir, tmp) {
  const injectedFor = (cmd) => Object.keys(state.fail ?? {}).some((k) => k === cmd || k.startsWith(`${cmd}:`));
  const queries = [['version'], ['list'], ['list', '--all']];
  for (const d of domains()) {
    const n = d.name;
    queries.push(
      ['domblklist', n, '--details'],
      ['domblklist', n],
      ['dumpxml', n],
      ['dominfo', n],
      ['domiflist', n],
      ['domstate', n],
      ['domstate', n, '--reason'],
      ['checkpoint-list', n, '--name'],
    );
    // Job queries change nothing while no job runs; reading completed statistics
    // without --keep-completed consumes them, so that one only when there are none.
    const rt = runtime(d);
    if (!rt.active) {
      queries.push(
        ['domjobinfo', n],
        ['domjobinfo', n, '--completed', '--keep-completed'],
        ['domjobinfo', n, '--completed', '--keep-completed', '--anystats'],
      );
      if (!rt.completed) queries.push(['domjobinfo', n, '--completed'], ['domjobinfo', n, '--completed', '--anystats']);
    }
  }
  mkdirSync(tmp, { recursive: true });
  for (const [cmd, ...args] of queries) {
    const key = [cmd, ...args].join(' ');
    if (injectedFor(cmd) || !FAST_SAFE.test(key)) continue;
    writeFileSync(`${tmp}/${key}`, dispatch(cmd, args) + '\n');
  }
  renameSync(tmp, dir);
}

// ---------------------------------------------------------------- main

function detailOf(cmd, args) {
  if (cmd === 'qemu-agent-command' || cmd === 'qemu-monitor-command') {
    try {
      return JSON.parse(args[args.length - 1]).execute;
    } catch {
      return null;
    }
  }
  if (cmd === 'domjobinfo') return flag(args, '--completed') ? 'completed' : 'active';
  return null;
}

function dispatch(cmd, args) {
  switch (cmd) {
    case 'version':
      return versionText();
    case 'list':
      return list(args);
    case 'domblklist':
      return domblklist(args);
    case 'dumpxml':
      return dumpxml(args);
    case 'dominfo':
      return dominfo(args);
    case 'domiflist':
      return domiflist(args);
    case 'domstate':
      return domstate(args);
    case 'resume':
      return resume(args);
    case 'suspend':
      return suspend(args);
    case 'checkpoint-list':
      return checkpointList(args);
    case 'checkpoint-create':
      return checkpointCreate(args);
    case 'checkpoint-delete':
      return checkpointDelete(args);
    case 'qemu-monitor-command':
      return monitorCommand(args);
    case 'qemu-agent-command':
      return agentCommand(args);
    case 'backup-begin':
      return backupBegin(args);
    case 'domjobinfo':
      return domjobinfo(args);
    case 'domjobabort':
      return domjobabort(args);
    case 'blockjob':
      return blockjob(args);
    default:
      fail(`unknown command: '${cmd}'`);
  }
}

/**
 * Render the fast answers for the state file at `path` (test/fakes/virsh-state.ts
 * calls this in-process whenever it writes the state, so even the first query of a
 * run needs no Node start).
 */
export function renderFastAnswers(path) {
  load(path);
  renderFast();
}

/** One command: its answer, or its failure as virsh prints it. */
function runOne(rest) {
  const [cmd = '', ...args] = rest;
  // The XML documents a call was given, logged with it (the program deletes them afterwards).
  const inputs = {};
  for (const o of ['--xmlfile', '--backupxml', '--checkpointxml']) {
    const f = option(args, o);
    if (f && existsSync(f)) inputs[o] = readFileSync(f, 'utf8');
  }
  try {
    if (state.connectError) throw new VirshError(state.connectError.stderr, state.connectError.exitCode ?? 1);
    const inj = injected(cmd, detailOf(cmd, args));
    if (inj?.error) {
      if (inj.apply) dispatch(cmd, args);
      throw inj.error;
    }
    return { stdout: (inj ? inj.ok : dispatch(cmd, args)) + '\n', stderr: '', exitCode: 0, inputs };
  } catch (e) {
    return {
      stdout: '\n',
      stderr: e instanceof VirshError ? e.stderr : `fake virsh crashed: ${e?.stack ?? e}\n`,
      exitCode: e instanceof VirshError ? e.exitCode : 70,
      inputs,
    };
  }
}

/** virsh's batch syntax: commands split on `;`, words on blanks, '…' and "…" quoting, \ escapes outside '…'. */
function splitBatch(text) {
  const cmds = [];
  let words = [];
  let word = null;
  let sq = false;
  let dq = false;
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (!sq && !dq && (c === ' ' || c === '\t' || c === '\n' || c === ';')) {
      if (word !== null) words.push(word);
      word = null;
      if (c === ';' && words.length) {
        cmds.push(words);
        words = [];
      }
      continue;
    }
    word ??= '';
    if (!dq && c === "'") sq = !sq;
    else if (!sq && c === '"') dq = !dq;
    else if (!sq && c === '\\') word += text[++i] ?? '';
    else word += c;
  }
  if (word !== null) words.push(word);
  if (words.length) cmds.push(words);
  return cmds;
}

/**
 * The state file's lock, held from load to write-back: libvirtd serializes the calls on a
 * domain, and so must the fake, or two calls that overlap (the program reads the completed
 * job's statistics while it deletes the old checkpoint) each write back what they loaded and
 * one change is lost. A lock left by a call that was killed (its pid gone) is taken over.
 */
function lockState(path) {
  const lock = `${path}.lock`;
  const until = Date.now() + 30_000;
  const pause = new Int32Array(new SharedArrayBuffer(4));
  for (;;) {
    try {
      const fd = openSync(lock, 'wx');
      writeSync(fd, String(process.pid));
      closeSync(fd);
      return () => unlinkSync(lock);
    } catch (e) {
      if (e.code !== 'EEXIST') throw e;
    }
    let holder;
    try {
      holder = Number(readFileSync(lock, 'utf8'));
    } catch {
      continue; // released meanwhile
    }
    let alive = true;
    try {
      if (holder > 0) process.kill(holder, 0);
    } catch (e) {
      alive = e.code !== 'ESRCH';
    }
    if (!alive) rmSync(lock, { force: true });
    else if (Date.now() > until) throw new Error(`fake virsh: ${lock} held by ${holder} for 30 s`);
    else Atomics.wait(pause, 0, 0, 2);
  }
}

/** One virsh call (or a batch of them): answer it, write back what changed, log it. */
function main(argv) {
  if (!process.env.FAKE_VIRSH_STATE) {
    process.stderr.write('fake virsh: FAKE_VIRSH_STATE is not set\n');
    process.exitCode = 2;
    return;
  }
  const unlock = lockState(process.env.FAKE_VIRSH_STATE);
  try {
    answer(argv);
  } finally {
    unlock();
  }
}

function answer(argv) {
  load(process.env.FAKE_VIRSH_STATE);
  let rest = [...argv];
  while (rest[0] === '-c' || rest[0] === '--connect') rest = rest.slice(2);
  const prefix = argv.slice(0, argv.length - rest.length);
  // Batch mode: one argument holding `cmd args ; cmd args` (virsh's own quoting), run in turn.
  const batch = rest.length === 1 && /\s/.test(rest[0]) ? splitBatch(rest[0]) : null;
  let stdout = '';
  let stderr = '';
  let exitCode = 0;
  const logged = [];
  for (const one of batch ?? [rest]) {
    const r = runOne(one);
    stdout += r.stdout;
    stderr += r.stderr;
    exitCode = r.exitCode;
    logged.push({ argv: [...prefix, ...one], exitCode: r.exitCode, inputs: r.inputs, ...(batch ? { batch: true } : {}) });
  }
  if (dirty) {
    const tmp = `${STATE}.${process.pid}.tmp`;
    writeFileSync(tmp, JSON.stringify(state, null, 2));
    renameSync(tmp, STATE);
  }
  if (dirty || !existsSync(`${STATE}.fast`)) renderFast();
  for (const l of logged) {
    const { inputs, ...call } = l;
    appendFileSync(`${STATE}.calls`, JSON.stringify({ ...call, t: Date.now(), ...(Object.keys(inputs).length ? { inputs } : {}) }) + '\n');
  }
  process.stderr.write(stderr);
  process.stdout.write(stdout);
  process.exitCode = exitCode;
}

// Run as a program (the `virsh` shim execs it); imported, it only provides renderFastAnswers.
if (process.argv[1] && realpathSync(process.argv[1]) === fileURLToPath(import.meta.url)) main(process.argv.slice(2));
