#!/usr/bin/env node
// The main job on an embedded default: a local folder bind-mounted as the NAS.
// Builds a two-disk backup chain (full <- inc1 <- inc2) with real qemu-img, repairs
// the chain for every disk with `nasbackup -o rebase`, deletes the middle backup with
// `nasbackup -o delete`, checks that every remaining point in time reads exactly as
// before, and prints the NAS stats. Run as root (it mounts). `--keep` keeps the folder.
// `--bundle` runs the same flow with the single-file build (dist/nasbackup.cjs, from
// `npm run bundle`), copied alone into the demo folder: no node_modules, no dist/lib.
import { $, fs, path, os } from 'zx';
import { createHash } from 'node:crypto';

$.verbose = false;
$.quiet = true;
const root = path.resolve(path.dirname(new URL(import.meta.url).pathname), '..');
const keep = process.argv.includes('--keep');
const useBundle = process.argv.includes('--bundle');

const fail = (msg) => {
  console.error(`demo: ${msg}`);
  process.exit(1);
};
if (process.getuid?.() !== 0) fail('run as root: the demo bind-mounts a folder as the NAS');
if ((await $`command -v qemu-img`.nothrow()).exitCode !== 0) fail('qemu-img is missing: apt-get install qemu-utils');

const work = await fs.mkdtemp(path.join(os.tmpdir(), 'nasbackup-demo-'));
// The program: bin/nasbackup (dist/ + node_modules), or the bundle alone in a folder of its own.
let program = [path.join(root, 'bin', 'nasbackup')];
if (useBundle) {
  const built = path.join(root, 'dist', 'nasbackup.cjs');
  if (!(await fs.pathExists(built))) fail('dist/nasbackup.cjs is missing: npm run bundle');
  const alone = path.join(work, 'program', 'nasbackup.cjs');
  await fs.mkdirp(path.dirname(alone));
  await fs.copy(built, alone);
  program = [process.execPath, alone];
}
const nas = path.join(work, 'nas');
const env = { ...process.env, NASBACKUP_LOG_FILE: path.join(work, 'agent.log') };
if ((await $`virsh version`.nothrow().timeout('20s')).exitCode !== 0) {
  console.log('note: libvirt is not running here; the QEMU/libvirt version check is skipped (NASBACKUP_VERSION_CHECK=off)');
  env.NASBACKUP_VERSION_CHECK = 'off';
}

const vm = 'i-2-10-VM';
const ts = ['2025.01.01.00.00.00', '2025.01.02.00.00.00', '2025.01.03.00.00.00'];
const disks = [
  { prefix: 'root', vol: 'b3f4c2a0-6d1e-4f7a-9c2b-1e5d8a7f3c01' },
  { prefix: 'datadisk', vol: '5e6f7a8b-9c0d-4e1f-a2b3-c4d5e6f7a8b9' },
];
const file = (t, d) => `${vm}/${t}/${d.prefix}.${d.vol}.qcow2`;
const nasArgs = ['-t', 'none', '-s', nas, '-m', 'bind'];

async function nasbackup(args) {
  const r = await $({ env, nothrow: true })`${program} ${args}`;
  return { code: r.exitCode, stdout: r.stdout };
}

async function contentHash(p) {
  const raw = path.join(work, 'flat.raw');
  await $`qemu-img convert -O raw ${p} ${raw}`;
  const h = createHash('sha256')
    .update(await fs.readFile(raw))
    .digest('hex');
  await fs.rm(raw);
  return h;
}

try {
  console.log(`NAS folder: ${nas}`);
  console.log(`program: ${program.join(' ')} (${(await $({ env })`${program} --version`).stdout.trim()})`);
  // 1. A chain per disk: full, then two incrementals with relative backing names.
  const writes = [['0x11 0 1M', '0x44 4M 256k'], ['0x22 1M 512k'], ['0x33 2M 128k']];
  for (const [i, t] of ts.entries()) {
    for (const [k, d] of disks.entries()) {
      const f = path.join(nas, file(t, d));
      await fs.mkdirp(path.dirname(f));
      if (i === 0) await $`qemu-img create -q -f qcow2 ${f} 16M`;
      else await $`qemu-img create -q -f qcow2 -b ${'../' + ts[i - 1] + '/' + path.basename(f)} -F qcow2 ${f}`;
      for (const w of writes[i]) {
        const [pat, off, len] = w.split(' ');
        await $`qemu-io -f qcow2 -c ${`write -P ${Number(pat) + k} ${off} ${len}`} ${f}`;
      }
    }
    for (const side of ['domain-config.xml', 'dominfo.xml', 'domiflist.xml', 'domblklist.xml']) {
      await fs.writeFile(path.join(nas, vm, t, side), `<!-- ${side} -->\n`);
    }
  }
  console.log(`built ${ts.length} backups x ${disks.length} disks: full <- inc1 <- inc2`);

  const before = {};
  for (const t of [ts[0], ts[2]]) for (const d of disks) before[file(t, d)] = await contentHash(path.join(nas, file(t, d)));

  // 2. Repair every disk of inc2 so it no longer needs inc1, then delete inc1.
  const t0 = Date.now();
  for (const d of disks) {
    const r = await nasbackup(['-o', 'rebase', ...nasArgs, '--rebase-target', file(ts[2], d), '--rebase-new-backing', file(ts[0], d)]);
    if (r.code !== 0) fail(`rebase of ${file(ts[2], d)} failed (exit ${r.code}):\n${r.stdout}`);
    console.log(`rebased ${file(ts[2], d)} onto ${file(ts[0], d)}`);
  }
  const del = await nasbackup(['-o', 'delete', ...nasArgs, '-p', `${vm}/${ts[1]}`]);
  if (del.code !== 0) fail(`delete failed (exit ${del.code}):\n${del.stdout}`);
  console.log(`deleted ${vm}/${ts[1]} (${del.stdout.trim().split('\n').length} entries removed)`);
  const elapsed = Date.now() - t0;

  // 3. Every remaining point in time reads exactly as before, chains are clean and relative.
  let ok = true;
  for (const [f, h] of Object.entries(before)) {
    const abs = path.join(nas, f);
    const same = (await contentHash(abs)) === h;
    const check = (await $`qemu-img check ${abs}`.nothrow()).exitCode === 0;
    const info = JSON.parse((await $`qemu-img info --output=json ${abs}`).stdout);
    const backing = info['backing-filename'] ?? '(none)';
    const relativeOk = backing === '(none)' || !backing.startsWith('/');
    ok &&= same && check && relativeOk;
    console.log(
      `${same && check && relativeOk ? 'OK  ' : 'FAIL'} ${f}: content ${same ? 'identical' : 'CHANGED'}, check ${check ? 'clean' : 'FAILED'}, backing ${backing}`,
    );
  }
  if (await fs.pathExists(path.join(nas, vm, ts[1]))) ok = false;

  const stats = await nasbackup(['-o', 'stats', ...nasArgs]);
  if (stats.code !== 0) fail(`stats failed:\n${stats.stdout}`);
  const [, totals] = stats.stdout.trim().split('\n');
  console.log(`stats: ${totals} (1K blocks total, used)`);
  console.log(ok ? `demo passed: chain repaired and middle backup deleted in ${elapsed} ms` : 'demo FAILED');
  process.exitCode = ok ? 0 : 1;
} finally {
  if (keep) console.log(`kept ${work}`);
  else await fs.rm(work, { recursive: true, force: true });
}
