// Benchmark (not a test): the native in-chain safe rebase against `qemu-img rebase` on the
// same chain in one run, locally and over a throughput-bound NAS (samba + smbnetfs on
// 127.0.0.1, see e2e-lab.md), plus the physical floor (reading and writing the bytes that
// must move). Prints times, ratios and peak RSS.
//   npm run bench:rebase [-- --size 8G --delta 1G --nas-size 1G --nas-delta 96M --nas auto|off|only]
// The chain: full F (data over 2×delta) ← inc I (delta of 1 MiB writes every 2 MiB) ← child C
// (1 MiB every 64 MiB); C is rebased onto F (the "delete the middle incremental" repair).
import { execFileSync, spawn, spawnSync } from 'node:child_process'
import fs from 'node:fs'
import os from 'node:os'
import path from 'node:path'
import { fileURLToPath } from 'node:url'

const argv = process.argv.slice(2)
const opt = (name: string, dflt: string): string => {
  const i = argv.indexOf(`--${name}`)
  return i >= 0 && argv[i + 1] ? argv[i + 1]! : dflt
}
const bytes = (s: string): number => {
  const m = /^(\d+(?:\.\d+)?)([KMGT]?)$/i.exec(s)
  if (!m) throw new Error(`bad size ${s}`)
  return Math.round(Number(m[1]) * 1024 ** ' KMGT'.indexOf((m[2] || ' ').toUpperCase()))
}
const SIZE = bytes(opt('size', '8G'))
const DELTA = bytes(opt('delta', '1G'))
const NAS_SIZE = bytes(opt('nas-size', '1G'))
const NAS_DELTA = bytes(opt('nas-delta', '96M'))
const NAS_MODE = opt('nas', 'auto')
const ROOT = fileURLToPath(new URL('..', import.meta.url))
const DIST_REBASE = path.join(ROOT, 'dist/lib/qcow2/rebase.js')
const MiB = 1 << 20

const fmtB = (n: number): string => (n >= 1 << 30 ? `${(n / (1 << 30)).toFixed(2)} GiB` : `${(n / MiB).toFixed(1)} MiB`)

function dropCaches(): void {
  spawnSync('sync')
  try {
    fs.writeFileSync('/proc/sys/vm/drop_caches', '3')
  } catch {
    /* not root: warm-cache numbers */
  }
}

function qemuIo(file: string, cmds: string[]): void {
  for (let i = 0; i < cmds.length; i += 256) {
    const r = spawnSync('qemu-io', ['-f', 'qcow2', ...cmds.slice(i, i + 256).flatMap((c) => ['-c', c]), file], { encoding: 'utf8' })
    if (r.status !== 0) throw new Error(`qemu-io: ${r.stderr}`)
  }
}

/** Build F ← I ← C in `dir`. */
function buildChain(dir: string, size: number, delta: number): void {
  fs.mkdirSync(dir, { recursive: true })
  const F = path.join(dir, 'full.qcow2')
  const I = path.join(dir, 'inc1.qcow2')
  const C = path.join(dir, 'inc2.qcow2')
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', F, String(size)])
  const fw: string[] = []
  for (let o = 0; o < 2 * delta; o += 64 * MiB) fw.push(`write -P 1 ${o} ${Math.min(64 * MiB, 2 * delta - o)}`)
  qemuIo(F, fw)
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'full.qcow2', '-F', 'qcow2', I])
  const iw: string[] = []
  for (let o = 0; o < 2 * delta; o += 2 * MiB) iw.push(`write -P 2 ${o} ${MiB}`)
  qemuIo(I, iw)
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'inc1.qcow2', '-F', 'qcow2', C])
  const cw: string[] = []
  for (let o = 0; o < size; o += 64 * MiB) cw.push(`write -P 3 ${o} ${MiB}`)
  qemuIo(C, cw)
}

function copyChain(from: string, to: string): void {
  fs.rmSync(to, { recursive: true, force: true })
  fs.mkdirSync(to, { recursive: true })
  for (const f of ['full.qcow2', 'inc1.qcow2', 'inc2.qcow2']) execFileSync('cp', ['--sparse=always', path.join(from, f), path.join(to, f)])
}

interface Run {
  seconds: number
  rssKiB: number
  extra?: Record<string, unknown>
}

function timed(cmd: string, args: string[]): Promise<{ seconds: number; stdout: string; stderr: string; code: number | null }> {
  return new Promise((resolve) => {
    const t0 = process.hrtime.bigint()
    const c = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] })
    let stdout = ''
    let stderr = ''
    c.stdout.on('data', (d) => (stdout += d))
    c.stderr.on('data', (d) => (stderr += d))
    c.on('close', (code) => resolve({ seconds: Number(process.hrtime.bigint() - t0) / 1e9, stdout, stderr, code }))
  })
}

async function runQemuImg(dir: string): Promise<Run> {
  dropCaches()
  const r = await timed('/usr/bin/time', ['-f', '%M', 'qemu-img', 'rebase', '-b', 'full.qcow2', '-F', 'qcow2', path.join(dir, 'inc2.qcow2')])
  if (r.code !== 0) throw new Error(`qemu-img rebase failed: ${r.stderr}`)
  return { seconds: r.seconds, rssKiB: Number(r.stderr.trim().split('\n').at(-1)) }
}

async function runNative(dir: string): Promise<Run> {
  dropCaches()
  const script = `
    import { nativeRebase } from ${JSON.stringify(DIST_REBASE)};
    const r = await nativeRebase({ target: ${JSON.stringify(path.join(dir, 'inc2.qcow2'))}, newBacking: ${JSON.stringify(path.join(dir, 'full.qcow2'))}, newBackingName: 'full.qcow2' });
    console.log(JSON.stringify({ ...r, maxRSS: process.resourceUsage().maxRSS }));`
  const r = await timed(process.execPath, ['--input-type=module', '-e', script])
  if (r.code !== 0) throw new Error(`native rebase failed: ${r.stderr}`)
  const out = JSON.parse(r.stdout.trim().split('\n').at(-1)!) as { maxRSS: number; copiedBytes: number; batches: number }
  return { seconds: r.seconds, rssKiB: out.maxRSS, extra: out }
}

/** Read `n` bytes of the removed layer's data and write them to a new file, fdatasync: the floor. */
async function runFloor(dir: string, n: number): Promise<Run> {
  dropCaches()
  const script = `
    import fs from 'node:fs/promises';
    const src = await fs.open(${JSON.stringify(path.join(dir, 'inc1.qcow2'))}, 'r');
    const dst = await fs.open(${JSON.stringify(path.join(dir, 'floor.bin'))}, 'w');
    const size = (await src.stat()).size;
    const buf = Buffer.allocUnsafe(8 << 20);
    let done = 0, pos = Math.max(0, size - ${n});
    while (done < ${n}) {
      const { bytesRead } = await src.read(buf, 0, Math.min(buf.length, ${n} - done), pos + done);
      if (!bytesRead) break;
      await dst.write(buf, 0, bytesRead, done);
      done += bytesRead;
    }
    await dst.datasync(); await dst.close(); await src.close();
    console.log(JSON.stringify({ maxRSS: process.resourceUsage().maxRSS }));`
  const r = await timed(process.execPath, ['--input-type=module', '-e', script])
  if (r.code !== 0) throw new Error(`floor failed: ${r.stderr}`)
  fs.rmSync(path.join(dir, 'floor.bin'), { force: true })
  return { seconds: r.seconds, rssKiB: (JSON.parse(r.stdout.trim()) as { maxRSS: number }).maxRSS }
}

async function bench(label: string, pristine: string, workRoot: string): Promise<void> {
  const qdir = path.join(workRoot, 'qemu')
  const ndir = path.join(workRoot, 'native')
  copyChain(pristine, qdir)
  copyChain(pristine, ndir)
  const q = await runQemuImg(qdir)
  const n = await runNative(ndir)
  const moved = Number(n.extra?.copiedBytes ?? 0)
  const f = await runFloor(ndir, moved)
  const cmp = spawnSync('qemu-img', ['compare', path.join(qdir, 'inc2.qcow2'), path.join(ndir, 'inc2.qcow2')], { encoding: 'utf8' })
  const check = spawnSync('qemu-img', ['check', path.join(ndir, 'inc2.qcow2')], { encoding: 'utf8' })
  console.log(`\n== ${label}: ${fmtB(moved)} to move`)
  console.log(`  qemu-img rebase   ${q.seconds.toFixed(2)} s   peak RSS ${(q.rssKiB / 1024).toFixed(1)} MiB`)
  console.log(`  native rebase     ${n.seconds.toFixed(2)} s   peak RSS ${(n.rssKiB / 1024).toFixed(1)} MiB   (${n.extra?.batches} batch(es))`)
  console.log(`  physical floor    ${f.seconds.toFixed(2)} s   (read + write + fdatasync of the moved bytes)`)
  console.log(`  ratio native/qemu-img ${(n.seconds / q.seconds).toFixed(2)}x   native/floor ${(n.seconds / f.seconds).toFixed(2)}x`)
  console.log(`  results identical: ${cmp.status === 0 ? 'yes' : `NO (${cmp.stdout.trim()})`}; native qemu-img check: ${check.status === 0 ? 'clean' : `exit ${check.status}`}`)
  fs.rmSync(qdir, { recursive: true, force: true })
  fs.rmSync(ndir, { recursive: true, force: true })
}

interface Smb {
  dir: string
  share: string
  stop(): void
}

/** samba on 127.0.0.1 + smbnetfs (FUSE), as e2e-lab.md describes; null with a reason when impossible. */
async function startSmb(base: string): Promise<Smb | string> {
  for (const b of ['smbd', 'smbnetfs', 'smbpasswd', 'fusermount']) {
    if (spawnSync('sh', ['-c', `command -v ${b}`]).status !== 0) return `${b} is not installed (apt-get install samba smbnetfs)`
  }
  if (!fs.existsSync('/dev/fuse')) return '/dev/fuse is missing'
  const dir = path.join(base, 'smb')
  const share = path.join(dir, 'share')
  const mnt = path.join(dir, 'mnt')
  const home = path.join(dir, 'home')
  for (const d of [share, mnt, path.join(home, '.smb'), ...['pid', 'lock', 'state', 'cache', 'private', 'ncalrpc'].map((x) => path.join(dir, x))]) fs.mkdirSync(d, { recursive: true })
  const conf = path.join(dir, 'smb.conf')
  fs.writeFileSync(
    conf,
    `[global]\n interfaces = lo\n bind interfaces only = yes\n smb ports = 445\n disable netbios = yes\n pid directory = ${dir}/pid\n lock directory = ${dir}/lock\n state directory = ${dir}/state\n cache directory = ${dir}/cache\n private dir = ${dir}/private\n ncalrpc dir = ${dir}/ncalrpc\n log file = ${dir}/smbd.log\n[nas]\n path = ${share}\n read only = no\n force user = root\n`,
  )
  const pw = 'bench-' + Math.random().toString(36).slice(2, 10)
  const sp = spawnSync('smbpasswd', ['-c', conf, '-s', '-a', 'root'], { input: `${pw}\n${pw}\n`, encoding: 'utf8' })
  if (sp.status !== 0) return `smbpasswd failed: ${sp.stderr.trim()}`
  const sd = spawnSync('smbd', ['-D', '-s', conf], { encoding: 'utf8' })
  if (sd.status !== 0) return `smbd failed: ${sd.stderr.trim()}`
  const smbConf = path.join(home, '.smb', 'smbnetfs.conf')
  fs.writeFileSync(smbConf, `auth "127.0.0.1" "root" "${pw}"\nhost 127.0.0.1 visible=true\n`)
  fs.chmodSync(smbConf, 0o600)
  const stopSmbd = (): void => {
    try {
      const pid = Number(fs.readFileSync(path.join(dir, 'pid', 'smbd.pid'), 'utf8'))
      if (pid > 0) process.kill(pid, 'SIGTERM')
    } catch {
      /* gone */
    }
  }
  const fu = spawnSync('smbnetfs', [mnt], { env: { ...process.env, HOME: home }, encoding: 'utf8' })
  if (fu.status !== 0) {
    stopSmbd()
    return `smbnetfs failed: ${fu.stderr.trim()}`
  }
  const nas = path.join(mnt, '127.0.0.1', 'nas')
  for (let i = 0; i < 100 && !fs.existsSync(nas); i++) await new Promise((r) => setTimeout(r, 100))
  if (!fs.existsSync(nas)) {
    spawnSync('fusermount', ['-u', mnt])
    stopSmbd()
    return 'the share did not appear under the smbnetfs mount'
  }
  return {
    dir: nas,
    share,
    stop: () => {
      spawnSync('fusermount', ['-u', mnt])
      stopSmbd()
    },
  }
}

async function main(): Promise<void> {
  if (!fs.existsSync(DIST_REBASE)) throw new Error('run npm run build first (dist/lib/qcow2/rebase.js is missing)')
  const base = fs.mkdtempSync(path.join(os.tmpdir(), 'nasbackup-bench-rebase-'))
  console.log(`bench-rebase: ${os.cpus().length} CPUs, qemu-img ${execFileSync('qemu-img', ['--version'], { encoding: 'utf8' }).split('\n')[0]}`)
  try {
    if (NAS_MODE !== 'only') {
      const pristine = path.join(base, 'local-pristine')
      console.log(`building the local chain: ${fmtB(SIZE)} virtual, ${fmtB(DELTA)} in the middle layer…`)
      buildChain(pristine, SIZE, DELTA)
      await bench(`local disk, ${fmtB(SIZE)} virtual`, pristine, path.join(base, 'local'))
      fs.rmSync(pristine, { recursive: true, force: true })
    }
    if (NAS_MODE !== 'off') {
      const smb = await startSmb(base)
      if (typeof smb === 'string') console.log(`\n== slow NAS (samba + smbnetfs): skipped — ${smb}`)
      else {
        try {
          const pristine = path.join(base, 'nas-pristine')
          console.log(`\nbuilding the NAS chain: ${fmtB(NAS_SIZE)} virtual, ${fmtB(NAS_DELTA)} in the middle layer…`)
          buildChain(pristine, NAS_SIZE, NAS_DELTA)
          await bench(`slow NAS (samba + smbnetfs on 127.0.0.1), ${fmtB(NAS_SIZE)} virtual`, pristine, path.join(smb.dir, 'bench'))
        } finally {
          smb.stop()
        }
      }
    }
  } finally {
    fs.rmSync(base, { recursive: true, force: true })
  }
}

await main()
