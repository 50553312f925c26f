// Benchmark (not a test): the fixed cost of one `nasbackup` call (issue 18: start-up, module
// loading, virsh version, mount, lock, sync, unmount) and its peak RSS against the idle RSS
// (`--version`, measured in the same run). Each command runs as a whole process, --runs times
// after one warm-up, commands and programs interleaved (a change of machine load hits all alike):
//   version   nasbackup --version (the idle process: the RSS baseline)
//   help      nasbackup -h (the agent CLI's usage)
//   stats     -o stats on a bind-mounted folder (virsh version, mount, df, umount)
//   delete    -o delete of a small backup folder (+ the VM lock and a sync of the NAS)
//   verify    chain verify of a tiny chain (3 layers, 1 MiB each, with manifests)
//   sh        (with stats) a shell doing the same children as stats, the original's design
//             (a bash script): the floor of a process-per-step CLI on this machine
// --vs <program> runs a second build on the same commands (e.g. an older checkout's
// bin/nasbackup or the bundle dist/nasbackup.cjs) and prints paired ratios per command.
//   npm run bench:startup [-- --runs 10 --commands version,help,stats,delete,verify --vs dist/nasbackup.cjs]
//   --version-check all|off   (default all, like the agent; a stand-in virsh answers when libvirtd does not)
// Peak RSS comes from GNU time (/usr/bin/time -f %M); without it only times are printed.
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { newDigestSpec, type DigestSpec, type ManifestDisk } from '../lib/store/manifest.js';
import { chainManifest } from './lib/chain-manifest.js';
import { loadAverage, machineLine, median, medianSpread, pairedRatios, spread, times as x } from './lib/stats.js';

const arg = (name: string, dflt: string): string => {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? process.argv[i + 1]! : dflt;
};
const ROOT = fileURLToPath(new URL('..', import.meta.url));
const runs = Number(arg('runs', '10'));
const commands = arg('commands', 'version,help,stats,delete,verify').split(',');
const main = path.resolve(ROOT, arg('bin', 'bin/nasbackup'));
const vs = arg('vs', '') === '' ? null : path.resolve(ROOT, arg('vs', ''));
const versionCheck = arg('version-check', 'all');
const GNU_TIME = '/usr/bin/time';
const haveTime = fs.existsSync(GNU_TIME);
const VM = 'i-9-99-VM';
const VOL = '5f2c7e1a-0000-4000-8000-000000000001';
const FILE = `root.${VOL}.qcow2`;
const MiB = 1 << 20;

const ms = (v: number): string => `${v.toFixed(0)} ms`;
const mib = (kib: number): string => `${(kib / 1024).toFixed(1)} MiB`;

interface Sample {
  wallMs: number;
  rssKiB: number | null;
}

/** One whole process: wall time from here, peak RSS from GNU time (written to a file, not stderr). */
function measure(argv: string[], env: NodeJS.ProcessEnv, rssFile: string, expect: number): Sample {
  const [cmd, ...args] = haveTime ? [GNU_TIME, '-f', '%M', '-o', rssFile, ...argv] : argv;
  const t0 = process.hrtime.bigint();
  const r = spawnSync(cmd!, args, { env, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
  const wallMs = Number(process.hrtime.bigint() - t0) / 1e6;
  if (r.status !== expect) throw new Error(`${argv.join(' ')} exited ${r.status} (expected ${expect}):\n${r.stdout}${r.stderr}`);
  const rss = haveTime ? Number(fs.readFileSync(rssFile, 'utf8').trim().split('\n').at(-1)) : NaN;
  return { wallMs, rssKiB: Number.isFinite(rss) ? rss : null };
}

/** A tiny chain with manifests (the manifest writer of dist/, as bench-verify builds its chains). */
async function buildChain(nas: string, depth: number): Promise<void> {
  const { describeLayer, writeManifestFile } = (await import(path.join(ROOT, 'dist/lib/store/manifest-file.js'))) as {
    describeLayer: (abs: string, vol: string, spec: DigestSpec) => Promise<ManifestDisk>;
    writeManifestFile: (dir: string, m: unknown) => Promise<void>;
  };
  let prev: string | null = null;
  for (let i = 0; i < depth; i++) {
    const ts = `2025.01.01.00.00.${String(i).padStart(2, '0')}`;
    const f = path.join(nas, VM, ts, FILE);
    fs.mkdirSync(path.dirname(f), { recursive: true });
    const backing = prev === null ? [] : ['-b', `../${prev}/${FILE}`, '-F', 'qcow2'];
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', ...backing, f, '64M']);
    execFileSync('qemu-io', ['-f', 'qcow2', '-c', `write -P ${i + 1} ${i * MiB} ${MiB}`, f], { stdio: 'ignore' });
    const spec = newDigestSpec('xxh64');
    const disk = await describeLayer(f, VOL, spec);
    await writeManifestFile(path.dirname(f), chainManifest({ vm: VM, ts, parentTs: prev, index: i, spec, disk }));
    prev = ts;
  }
}

const SHIM_VERSION =
  'Compiled against library: libvirt 9.0.0\nUsing library: libvirt 9.0.0\nUsing API: QEMU 9.0.0\nRunning hypervisor: QEMU 7.2.0\n\n';

async function run(): Promise<void> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nasbackup-bench-startup-'));
  const nas = path.join(dir, 'nas');
  const chainNas = path.join(dir, 'chain-nas');
  const tmp = path.join(dir, 'tmp');
  const shims = path.join(dir, 'shims');
  for (const d of [nas, chainNas, tmp, shims]) fs.mkdirSync(d);
  try {
    // libvirtd may not run here: then a stand-in answers `virsh version` (said in the output).
    const realVirsh = spawnSync('virsh', ['version'], { stdio: 'ignore', timeout: 10_000 }).status === 0;
    if (!realVirsh) {
      fs.writeFileSync(path.join(shims, 'virsh'), `#!/bin/sh\nprintf '%s' '${SHIM_VERSION}'\n`, { mode: 0o755 });
    }
    const env: NodeJS.ProcessEnv = {
      ...process.env,
      PATH: `${shims}:${process.env.PATH}`,
      TMPDIR: tmp,
      NASBACKUP_LOG_FILE: path.join(dir, 'agent.log'),
      NASBACKUP_VERSION_CHECK: versionCheck,
    };
    if (commands.includes('verify')) await buildChain(chainNas, 3);
    const bind = (n: string): string[] => ['-t', 'none', '-s', n, '-m', 'bind'];
    const DEL = `${VM}/2025.02.02.00.00.00`;
    const seedDelete = (): void => {
      const d = path.join(nas, DEL);
      fs.mkdirSync(d, { recursive: true });
      for (const f of [FILE, 'domain-config.xml', 'dominfo.xml', 'domiflist.xml', 'domblklist.xml']) fs.writeFileSync(path.join(d, f), 'x');
    };
    const virshTimes = versionCheck === 'off' ? '' : 'virsh version >/dev/null; virsh version >/dev/null; virsh version >/dev/null; ';
    const SH_STATS = `${virshTimes}d=$(mktemp -d -t csbackup.XXXXX) && mount -t none "$1" "$d" -o bind && df -P "$d" >/dev/null && umount "$d" && rmdir "$d"`;
    interface Cmd {
      name: string;
      argv: (bin: string) => string[];
      expect: number;
      before?: () => void;
      shell?: boolean;
    }
    const all: Cmd[] = [
      { name: 'version', argv: (b) => [b, '--version'], expect: 0 },
      { name: 'help', argv: (b) => [b, '-h'], expect: 1 },
      { name: 'stats', argv: (b) => [b, '-o', 'stats', ...bind(nas)], expect: 0 },
      { name: 'delete', argv: (b) => [b, '-o', 'delete', ...bind(nas), '-p', DEL], expect: 0, before: seedDelete },
      { name: 'verify', argv: (b) => [b, 'chain', 'verify', ...bind(chainNas), '--vm', VM], expect: 0 },
    ];
    const chosen = all.filter((c) => c.name === 'version' || commands.includes(c.name));
    if (commands.includes('stats')) chosen.push({ name: 'sh', argv: () => ['sh', '-c', SH_STATS, 'sh', nas], expect: 0, shell: true });
    const bins = vs ? [main, vs] : [main];
    const rssFile = path.join(dir, 'rss');
    const samples = new Map<string, Sample[]>();
    const key = (c: Cmd, b: string): string => `${c.name}\0${c.shell ? 'sh' : b}`;
    console.log(
      `bench-startup: ${machineLine()}; ${runs} runs after a warm-up; ` +
        `version check ${versionCheck}${versionCheck === 'off' ? '' : realVirsh ? ' (real virsh)' : ' (a stand-in virsh: libvirtd does not answer)'}; ` +
        `peak RSS ${haveTime ? 'from GNU time' : 'not measured (no /usr/bin/time)'}`,
    );
    for (let r = 0; r <= runs; r++) {
      for (const c of chosen) {
        for (const b of c.shell ? [main] : bins) {
          c.before?.();
          const s = measure(c.argv(b), env, rssFile, c.expect);
          if (r === 0) continue; // warm-up
          const k = key(c, b);
          samples.set(k, [...(samples.get(k) ?? []), s]);
        }
      }
    }
    const label = (b: string): string => (path.relative(ROOT, b).startsWith('..') ? b : path.relative(ROOT, b));
    const idle = new Map(bins.map((b) => [b, median(samples.get(`version\0${b}`)!.map((s) => s.rssKiB ?? NaN))]));
    for (const c of chosen) {
      for (const b of c.shell ? ['sh'] : bins) {
        const ss = samples.get(c.shell ? `${c.name}\0sh` : key(c, b))!;
        const wall = ss.map((s) => s.wallMs);
        const rss = ss.map((s) => s.rssKiB ?? NaN);
        const who = c.shell ? 'sh stand-in (same children as stats)' : label(b);
        let line = `  ${c.name.padEnd(8)} ${who.padEnd(40)} wall median ${ms(median(wall)).padStart(7)} (${spread(wall, ms)})`;
        if (haveTime) {
          line += `  peak RSS ${mib(median(rss))}`;
          if (!c.shell && c.name !== 'version') line += ` (idle + ${mib(median(rss) - idle.get(b)!)}, max ${mib(Math.max(...rss))})`;
        }
        console.log(line);
      }
      if (vs && !c.shell) {
        const a = samples.get(key(c, main))!;
        const bb = samples.get(key(c, vs))!;
        const ratios = pairedRatios(
          a.map((s) => s.wallMs),
          bb.map((s) => s.wallMs),
        );
        console.log(`  ${''.padEnd(8)} ${'ratio wall, paired per run'.padEnd(40)} median ${medianSpread(ratios, x)}`);
      }
    }
    console.log(`load average at the end ${loadAverage()}`);
  } finally {
    // Nothing may stay mounted below the folder we remove.
    const mounts = fs.readFileSync('/proc/self/mountinfo', 'utf8');
    if (mounts.includes(dir)) console.error(`bench-startup: something is still mounted below ${dir}; left in place`);
    else fs.rmSync(dir, { recursive: true, force: true });
  }
}

await run();
