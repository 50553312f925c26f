// Benchmark (not a test): `nasbackup restore` of the newest point of a chain (full + incrementals,
// each backup with its manifest, so ours proves every extent it restores from while it reads it) against
// `qemu-img convert` of the same point, and the floor: the chain's allocated bytes read once
// with large sequential reads. Same chain, same run, variants interleaved round by round (each
// round starting one later); the page cache is dropped (sync; drop_caches) before every timed
// run, the output removed after.
// Medians with min–max and paired ratios. Every output is compared with qemu-img's flatten once.
// Ours includes the process start, the NAS mount, the lock, the chain pre-flight, the digests
// and the fsync before the rename; `qemu-img convert` (default cache mode) never flushes, nor does
// ours with --no-sync: each is compared with the fastest convert that promises what it does.
// The same layers without manifests are restored too, flushed and --no-sync: nothing to prove, so
// only what the guest sees is read, the work convert does (what the proof costs, beside it).
//   npm run bench:restore [-- --size-mib 4096 --layers 5 --full-mib 2048 --inc-mib 256 --runs 5]
//   (--sparse-gib 100 sizes the sparse chain measured for peak RSS, 0 skips it;
//   --bin <path> the program timed (default dist/nasbackup.cjs: the single file that ships to KVM
//   hosts, which `npm run bench:restore` builds; bin/nasbackup is the development entry, whose
//   many ES modules load ~40 ms slower: its --no-sync restore is timed in the same rounds too);
//   --baseline /other/checkout (built) adds that build's restore (the same program path) to every round;
//   --keep keeps the chain and prints where; --no-drop-caches runs warm; --digest sha256 for the older manifests)
//   a short run: -- --size-mib 512 --full-mib 128 --inc-mib 32 --runs 3
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { describeLayer, writeManifestFile } from '../lib/store/manifest-file.js';
import { newDigestSpec } from '../lib/store/manifest.js';
import { pageAlignedBuffers } from '../lib/qcow2/io.js';
import type { DigestAlgorithm } from '../lib/store/digest/index.js';
import { chainManifest } from './lib/chain-manifest.js';
import { machineLine, median, medianSpread, pairedRatios, spread, timeAndCpu, times as fmtTimes } from './lib/stats.js';

const arg = (name: string, dflt: number): number => {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? Number(process.argv[i + 1]) : dflt;
};
const MiB = 1024 * 1024;
const sizeMiB = arg('size-mib', 4096);
const layers = arg('layers', 5);
/** Data the full holds, and each incremental (4 MiB writes spread over the disk; incrementals overwrite some of the full's). */
const fullMiB = arg('full-mib', 2048);
const incMiB = arg('inc-mib', 256);
const runs = arg('runs', 5);
/** The virtual size of the sparse chain whose restore's peak RSS shows it is flat in disk size (0: skip). */
const sparseGiB = arg('sparse-gib', 100);
const dropCaches = !process.argv.includes('--no-drop-caches');
/** The manifests' digest algorithm (`--digest sha256` measures restore of the older manifests). */
const digestArg = process.argv.indexOf('--digest');
const digest: DigestAlgorithm = digestArg > 0 && process.argv[digestArg + 1] === 'sha256' ? 'sha256' : 'xxh64';
/** Keep the chain (and print where) for a closer look. */
const keep = process.argv.includes('--keep');
const ROOT = fileURLToPath(new URL('..', import.meta.url));
const binArg = process.argv.indexOf('--bin');
/** The program timed, relative to the checkout: the shipped bundle unless told otherwise. */
const program = binArg > 0 ? path.relative(ROOT, path.resolve(process.argv[binArg + 1]!)) : 'dist/nasbackup.cjs';
const BIN = path.join(ROOT, program);
/** The development entry (ES modules from dist/lib), timed beside the bundle. */
const ESM_BIN = path.join(ROOT, 'bin/nasbackup');
/** Another build's same program, run beside ours in the same rounds (an A/B of a change). */
const baselineArg = process.argv.indexOf('--baseline');
const baseline = baselineArg > 0 ? path.join(path.resolve(process.argv[baselineArg + 1]!), program) : undefined;
const VM = 'i-2-10-VM';
const VOL = 'aaaaaaaa-0000-4000-8000-00000000be01';
const FILE = `root.${VOL}.qcow2`;

function time(f: () => void): number {
  const t0 = process.hrtime.bigint();
  f();
  return Number(process.hrtime.bigint() - t0) / 1e6;
}

function drop(): void {
  execFileSync('sync');
  if (dropCaches) fs.writeFileSync('/proc/sys/vm/drop_caches', '3');
}

/** The floor: every layer's allocated host ranges read once, in 16 MiB sequential reads. */
function readAllocated(files: string[]): void {
  // Page-aligned: the kernel's page-cache copies are fastest there.
  const [buf] = pageAlignedBuffers(1, 16 * MiB) as [Buffer];
  for (const f of files) {
    const fd = fs.openSync(f, 'r');
    try {
      // A backup layer is its header and tables then its data, densely: its allocated bytes are the file.
      const size = fs.fstatSync(fd).size;
      for (let pos = 0; pos < size;) {
        const n = fs.readSync(fd, buf, 0, Math.min(buf.length, size - pos), pos);
        if (n <= 0) break;
        pos += n;
      }
    } finally {
      fs.closeSync(fd);
    }
  }
}

/**
 * The restore floor: the layers read once (dd, 16 MiB reads into its page-aligned buffer) while
 * another process writes `bytes` of non-zero data to `to` with O_DIRECT in 8 MiB writes and
 * then fdatasyncs it.
 */
function readWhileWriting(files: string[], to: string, bytes: number): void {
  const writer = `
    const fs = require('node:fs');
    const mem = new WebAssembly.Memory({ initial: 128 }); // 8 MiB at a page boundary
    const buf = Buffer.from(mem.buffer).fill(0x5a);
    const fd = fs.openSync(process.argv[1], fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_EXCL | fs.constants.O_DIRECT, 0o600);
    const total = Number(process.argv[2]);
    for (let at = 0; at < total; at += buf.length) fs.writeSync(fd, buf, 0, Math.min(buf.length, Math.ceil((total - at) / 4096) * 4096), at);
    fs.fdatasyncSync(fd);
    fs.closeSync(fd);`;
  const script =
    'for f in "${@:3}"; do dd if="$f" of=/dev/null bs=16M status=none; done & node -e "$0" "$1" "$2"; s=$?; wait $! && exit $s';
  const r = spawnSync('bash', ['-c', script, writer, to, String(bytes), ...files], { stdio: 'inherit' });
  if (r.status !== 0) throw new Error('the floor with writes failed');
}

async function main(): Promise<void> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nb-bench-restore-'));
  const nas = path.join(dir, 'nas');
  /** The same layers without their manifests: what a restore does when it has nothing to prove. */
  const plainNas = path.join(dir, 'nas-plain');
  /** `nasbackup restore` of backup `backup`'s disk to `to` (the bind NAS `from`), in `format` when given. */
  const restoreArgv = (backup: string, to: string, format?: string, more: string[] = [], from = nas): string[] => [
    ...['restore', '-t', 'none', '-s', from, '-m', 'bind', '--backup', backup, '--disk', VOL, '--to', to],
    ...(format ? ['--format', format] : []),
    ...more,
  ];
  const tmp = path.join(dir, 'tmp');
  const out = path.join(dir, 'out');
  for (const d of [nas, tmp, out]) fs.mkdirSync(d);
  try {
    const ts = Array.from({ length: layers }, (_, i) => `2026.01.${String(i + 1).padStart(2, '0')}.00.00.00`);
    /** Backup `i` of `vm`'s chain: its layer (the full of `size`, else backed by the one before), qemu-io `cmds`, its manifest. */
    const backupLayer = async (vm: string, i: number, size: string, cmds: string[]): Promise<string> => {
      const file = path.join(nas, vm, ts[i]!, FILE);
      fs.mkdirSync(path.dirname(file), { recursive: true });
      execFileSync('qemu-img', [
        'create',
        '-q',
        '-f',
        'qcow2',
        ...(i === 0 ? [file, size] : ['-b', `../${ts[i - 1]}/${FILE}`, '-F', 'qcow2', file]),
      ]);
      for (let c = 0; c < cmds.length; c += 512)
        execFileSync('qemu-io', ['-f', 'qcow2', ...cmds.slice(c, c + 512), file], { stdio: 'ignore' });
      // The backup's manifest, as the backup writes it.
      const spec = newDigestSpec(digest);
      const disk = await describeLayer(file, VOL, spec);
      const parentTs = i === 0 ? null : ts[i - 1]!;
      await writeManifestFile(path.dirname(file), chainManifest({ vm, ts: ts[i]!, parentTs, index: i, spec, disk }));
      return file;
    };
    const files: string[] = [];
    const chunks = sizeMiB / 4;
    for (let i = 0; i < layers; i++) {
      // The full: every other 4 MiB chunk up to its size; an incremental: chunks spread over the disk, some over the full's.
      const writes = Math.max(1, Math.floor((i === 0 ? fullMiB : incMiB) / 4));
      const cmds: string[] = [];
      for (let w = 0; w < writes; w++) {
        const chunk = i === 0 ? (w * 2) % chunks : (w * 7919 + i * 4099) % chunks;
        cmds.push('-c', `write -P 0x${(0x10 + i * 16 + (w % 16)).toString(16)} ${chunk * 4 * MiB} ${4 * MiB}`);
      }
      files.push(await backupLayer(VM, i, `${sizeMiB}M`, cmds));
    }
    const top = files.at(-1)!;
    for (const f of files) {
      const plain = path.join(plainNas, path.relative(nas, f));
      fs.mkdirSync(path.dirname(plain), { recursive: true });
      fs.linkSync(f, plain);
    }
    const allocated = files.reduce((n, f) => n + fs.statSync(f).size, 0);
    // The point's data bytes: what a sparse restore writes.
    const map = JSON.parse(execFileSync('qemu-img', ['map', '--output=json', '-f', 'qcow2', top], { encoding: 'utf8' })) as Array<{
      length: number;
      data: boolean;
    }>;
    const dataBytes = map.filter((m) => m.data).reduce((n, m) => n + m.length, 0);
    const reference = path.join(dir, 'reference.raw');
    execFileSync('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', top, reference]);
    const env = { ...process.env, TMPDIR: tmp, NASBACKUP_LOG_FILE: path.join(dir, 'nasbackup.log') };
    /** Our restore of the newest point: `more` flags, from `from` (the plain NAS: nothing to prove), by `bin`. */
    const ours =
      (format: string, { more = [] as string[], from = nas, bin = BIN } = {}) =>
      (to: string) => {
        const r = spawnSync(bin, restoreArgv(`${VM}/${ts.at(-1)}`, to, format, more, from), { env, encoding: 'utf8' });
        if (r.status !== 0) throw new Error(`nasbackup restore failed: ${r.stdout}${r.stderr}`);
        // Only the plain chain (no manifests) may warn, and only that nothing was proven.
        const warns = r.stdout.split('\n').filter((l) => l.startsWith('warning:'));
        if (warns.some((w) => !(from === plainNas && w.includes('No manifest'))))
          throw new Error(`nasbackup restore warned (the chain should be proven): ${r.stdout}`);
      };
    /** qemu-img convert of `src` (the newest point by default) with `extra`. */
    const qemu =
      (extra: string[], src = top) =>
      (to: string) =>
        void execFileSync('qemu-img', ['convert', '-f', 'qcow2', ...extra, src, to]);
    type Variant = { name: string; format: string | null; run: (to: string) => void };
    const variants: Variant[] = [
      { name: 'floor: allocated bytes read once (16 MiB reads)', format: null, run: () => readAllocated(files) },
      // What a verified, durable restore must do at least: read every layer's allocated bytes and,
      // at the same time, write the disk's data bytes to the device (O_DIRECT, then fdatasync).
      {
        name: 'floor: read them while writing the data durably',
        format: 'none',
        run: (to) => readWhileWriting(files, to, dataBytes),
      },
      { name: 'nasbackup restore --format raw (verified)', format: 'raw', run: ours('raw') },
      { name: 'nasbackup restore --format qcow2 (verified)', format: 'qcow2', run: ours('qcow2') },
      // Not flushed before it ends, like qemu-img convert's default (cache=unsafe).
      { name: 'nasbackup restore --format raw --no-sync', format: 'raw', run: ours('raw', { more: ['--no-sync'] }) },
      { name: 'nasbackup restore --format qcow2 --no-sync', format: 'qcow2', run: ours('qcow2', { more: ['--no-sync'] }) },
      // The same work as qemu-img convert: nothing to prove, so only what the guest sees is read.
      {
        name: 'nasbackup restore --format qcow2 --no-sync, no manifests',
        format: 'qcow2',
        run: ours('qcow2', { more: ['--no-sync'], from: plainNas }),
      },
      // And flushed: what the proof costs where the disk, not the CPU, sets the pace.
      { name: 'nasbackup restore --format qcow2, no manifests', format: 'qcow2', run: ours('qcow2', { from: plainNas }) },
      ...(BIN !== ESM_BIN
        ? [
            {
              name: 'bin/nasbackup (ES modules) restore --format qcow2 --no-sync',
              format: 'qcow2',
              run: ours('qcow2', { more: ['--no-sync'], bin: ESM_BIN }),
            },
          ]
        : []),
      ...(baseline
        ? [{ name: 'baseline restore --format qcow2 (--baseline)', format: 'qcow2', run: ours('qcow2', { bin: baseline }) }]
        : []),
      { name: 'qemu-img convert -O raw', format: 'raw', run: qemu(['-O', 'raw']) },
      { name: 'qemu-img convert -O qcow2', format: 'qcow2', run: qemu(['-O', 'qcow2']) },
      { name: 'qemu-img convert -O qcow2 -m 16 -W', format: 'qcow2', run: qemu(['-O', 'qcow2', '-m', '16', '-W']) },
      // Durable like ours (cache=writeback flushes the output before qemu-img exits).
      {
        name: 'qemu-img convert -O qcow2 -m 16 -W -t writeback',
        format: 'qcow2',
        run: qemu(['-O', 'qcow2', '-m', '16', '-W', '-t', 'writeback']),
      },
      // Durable and past the page cache (O_DIRECT), as ours writes where it can.
      { name: 'qemu-img convert -O qcow2 -m 16 -W -t none', format: 'qcow2', run: qemu(['-O', 'qcow2', '-m', '16', '-W', '-t', 'none']) },
      // The chain read past the page cache (-T none: O_DIRECT), as ours reads it from a local disk.
      { name: 'qemu-img convert -O qcow2 -T none', format: 'qcow2', run: qemu(['-O', 'qcow2', '-T', 'none']) },
      {
        name: 'qemu-img convert -O qcow2 -m 16 -W -t writeback -T none',
        format: 'qcow2',
        run: qemu(['-O', 'qcow2', '-m', '16', '-W', '-t', 'writeback', '-T', 'none']),
      },
    ];
    const times: number[][] = variants.map(() => []);
    /** CPU seconds of each run (user + system, the children's included). */
    const cpus: number[][] = variants.map(() => []);
    const before = machineLine();
    for (let r = 0; r < runs; r++) {
      // Each round starts one variant later: no variant always follows the same one (what one
      // leaves behind, a large file just written and removed, would always fall on the next).
      for (let k = 0; k < variants.length; k++) {
        const i = (k + r) % variants.length;
        const v = variants[i]!;
        const to = path.join(out, `v${i}.${v.format ?? 'none'}`);
        drop();
        const { ms, cpu } = timeAndCpu(() => v.run(to));
        times[i]!.push(ms);
        cpus[i]!.push(cpu);
        if (v.format === 'none') fs.rmSync(to);
        else if (v.format !== null) {
          if (r === 0) execFileSync('qemu-img', ['compare', '-q', '-f', v.format, '-F', 'raw', to, reference]);
          fs.rmSync(to);
        }
      }
    }
    console.log(
      `chain: ${layers} layers of a ${sizeMiB} MiB disk (full ${fullMiB} MiB of data, incrementals ${incMiB} MiB each; ` +
        `${(allocated / MiB).toFixed(0)} MiB allocated); manifests with 64 MiB extents; ` +
        `${dropCaches ? 'page cache dropped before every run' : 'page cache NOT dropped'}; median of ${runs} runs (min–max)`,
    );
    console.log(`before the runs: ${before}; after: ${machineLine()}`);
    console.log(`ours: ${program}`);
    const med = times.map(median);
    const cpuMed = cpus.map(median);
    console.log(`  ${''.padEnd(58)} ${'wall'.padStart(7)}      ${'(min–max)'.padEnd(13)} CPU s (min–max): user + system`);
    for (const [i, v] of variants.entries())
      console.log(
        `  ${v.name.padEnd(58)} ${med[i]!.toFixed(0).padStart(7)} ms   ${`(${spread(times[i]!, (x) => x.toFixed(0))})`.padEnd(13)} ${cpuMed[i]!.toFixed(2)} (${spread(cpus[i]!)})`,
      );
    const index = (name: string): number => variants.findIndex((v) => v.name.startsWith(name));
    const at = (name: string): number => med[index(name)]!;
    const cpuAt = (name: string): number => cpuMed[index(name)]!;
    const fastestQcow2Name = ['qemu-img convert -O qcow2 -m', 'qemu-img convert -O qcow2', 'qemu-img convert -O qcow2 -T none'].reduce(
      (a, b) => (at(a) <= at(b) ? a : b),
    );
    const fastestQcow2 = at(fastestQcow2Name);
    const fastestDurable = Math.min(
      at('qemu-img convert -O qcow2 -m 16 -W -t none'),
      at('qemu-img convert -O qcow2 -m 16 -W -t writeback'),
      at('qemu-img convert -O qcow2 -m 16 -W -t writeback -T none'),
    );
    const ratio = (a: number, b: number): string => `${(a / b).toFixed(2)}x`;
    console.log('ratios (medians of the same run):');
    // Like for like: each against the fastest qemu-img convert that gives the same promise at its end.
    console.log(
      `  ours qcow2 --no-sync / fastest qemu-img convert -O qcow2 (neither flushes; goal <= 1.0): ${ratio(at('nasbackup restore --format qcow2 --no-sync'), fastestQcow2)}`,
    );
    console.log(
      `    its CPU time against that convert's (on ${os.cpus().length} cores, what bounds the wall time):       ${ratio(cpuAt('nasbackup restore --format qcow2 --no-sync'), cpuAt(fastestQcow2Name))}` +
        `; without manifests ${ratio(cpuAt('nasbackup restore --format qcow2 --no-sync, no manifests'), cpuAt(fastestQcow2Name))}`,
    );
    if (BIN !== ESM_BIN)
      console.log(
        `  the same through bin/nasbackup (ES modules, the development entry):                  ${ratio(at('bin/nasbackup (ES modules)'), fastestQcow2)}`,
      );
    console.log(
      `  ours raw   --no-sync / qemu-img convert -O raw (neither flushes):                       ${ratio(at('nasbackup restore --format raw --no-sync'), at('qemu-img convert -O raw'))}`,
    );
    console.log(
      `  ours qcow2 --no-sync without manifests / fastest convert -O qcow2 (the same work):     ${ratio(at('nasbackup restore --format qcow2 --no-sync, no manifests'), fastestQcow2)}`,
    );
    console.log(
      `  the proof's price: ours qcow2 --no-sync with manifests / without:                      ${ratio(at('nasbackup restore --format qcow2 --no-sync'), at('nasbackup restore --format qcow2 --no-sync, no manifests'))}`,
    );
    console.log(
      `  ours qcow2 / fastest durable qemu-img convert (-t none or writeback, -T none or not; goal <= 1.0): ${ratio(at('nasbackup restore --format qcow2 (verified)'), fastestDurable)}`,
    );
    console.log(
      `    without manifests (the same work as convert):                                          ${ratio(at('nasbackup restore --format qcow2, no manifests'), fastestDurable)}` +
        `; the proof's price flushed: ${ratio(at('nasbackup restore --format qcow2 (verified)'), at('nasbackup restore --format qcow2, no manifests'))}`,
    );
    console.log(`  ours raw   / fastest qemu-img convert -O qcow2: ${ratio(at('nasbackup restore --format raw'), fastestQcow2)}`);
    if (baseline) {
      const i = index('baseline');
      const j = index('nasbackup restore --format qcow2');
      console.log(
        `  ours qcow2 / baseline qcow2: ${ratio(med[j]!, med[i]!)} medians, ${medianSpread(pairedRatios(times[j]!, times[i]!), fmtTimes)} paired`,
      );
    }
    console.log(`  ours qcow2 / fastest qemu-img convert -O qcow2: ${ratio(at('nasbackup restore --format qcow2'), fastestQcow2)}`);
    console.log(
      `  ours raw   / qemu-img convert -O raw:           ${ratio(at('nasbackup restore --format raw'), at('qemu-img convert -O raw'))}`,
    );
    console.log(`  ours raw   / floor:                             ${ratio(at('nasbackup restore --format raw'), at('floor'))}`);
    console.log(`  ours qcow2 / floor:                             ${ratio(at('nasbackup restore --format qcow2'), at('floor'))}`);
    const both = at('floor: read them');
    console.log(`  ours raw   / floor reading while writing:       ${ratio(at('nasbackup restore --format raw'), both)}`);
    console.log(`  ours qcow2 / floor reading while writing:       ${ratio(at('nasbackup restore --format qcow2'), both)}`);
    console.log(
      `  ours qcow2 / qemu-img convert -O qcow2 -m 16 -W -t none (durable, direct): ${ratio(at('nasbackup restore --format qcow2'), at('qemu-img convert -O qcow2 -m 16 -W -t none'))}`,
    );
    console.log(
      `  ours qcow2 / qemu-img convert -O qcow2 -m 16 -W -t writeback (durable too): ${ratio(at('nasbackup restore --format qcow2'), at('qemu-img convert -O qcow2 -m 16 -W -t'))}`,
    );
    // The fixed cost: a 64 MiB disk holding 1 MiB (start, mount, lock, pre-flight, manifests, sync, unmount).
    const small = path.join(nas, VM, '2026.02.01.00.00.00');
    fs.mkdirSync(small);
    const smallFile = path.join(small, FILE);
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', smallFile, '64M']);
    execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x42 0 1M', smallFile], { stdio: 'ignore' });
    const fixed: Record<string, number[]> = { ours: [], qemu: [], node: [] };
    for (let r = 0; r < Math.max(5, runs); r++) {
      const to = path.join(out, 'small.qcow2');
      fixed.ours!.push(
        time(() => {
          const x = spawnSync(BIN, restoreArgv(`${VM}/2026.02.01.00.00.00`, to), { env, encoding: 'utf8' });
          if (x.status !== 0) throw new Error(x.stdout);
        }),
      );
      fs.rmSync(to);
      fixed.qemu!.push(time(() => qemu(['-O', 'qcow2'], smallFile)(to)));
      fs.rmSync(to);
      fixed.node!.push(time(() => execFileSync(process.execPath, ['-e', '0'])));
    }
    console.log(`fixed cost (64 MiB disk, 1 MiB of data, warm cache; median of ${fixed.ours!.length}):`);
    console.log(`  nasbackup restore --format qcow2   ${median(fixed.ours!).toFixed(0).padStart(5)} ms`);
    console.log(`  qemu-img convert -O qcow2          ${median(fixed.qemu!).toFixed(0).padStart(5)} ms`);
    console.log(`  node -e 0 (Node.js start alone)    ${median(fixed.node!).toFixed(0).padStart(5)} ms`);
    // Issue 18: a copy path's peak RSS at most 32 MiB above the idle program's (--version).
    const peakKiB = (argv: string[]): number => {
      const x = spawnSync('/usr/bin/time', ['-f', '%M', BIN, ...argv], { env, encoding: 'utf8' });
      if (x.status !== 0) throw new Error(`${argv[0]} failed: ${x.stdout}${x.stderr}`);
      return Number(x.stderr.trim().split('\n').at(-1));
    };
    const idle = peakKiB(['--version']);
    // The newest point (every layer) and the full alone (one layer: the largest pieces).
    const points: Array<[string, string]> = [
      ['the chain', ts.at(-1)!],
      ['the full alone', ts[0]!],
    ];
    for (const [what, point] of points) {
      for (const format of ['qcow2', 'raw']) {
        const to = path.join(out, `rss.${format}`);
        const peak = peakKiB(restoreArgv(`${VM}/${point}`, to, format));
        fs.rmSync(to);
        console.log(
          `peak RSS, restore --format ${format} of ${what}: ${(peak / 1024).toFixed(1)} MiB = idle (--version) ${(idle / 1024).toFixed(1)} MiB + ${((peak - idle) / 1024).toFixed(1)} MiB (goal: <= +32)`,
        );
      }
    }
    // Flat in disk size: a sparse chain of the same depth on a large disk (1 MiB every 256 MiB
    // per layer, so every layer has data under every L2 table), with manifests.
    if (sparseGiB > 0) {
      for (let i = 0; i < layers; i++) {
        const cmds: string[] = [];
        for (let m = 0; m + 256 <= sparseGiB * 1024; m += 256) cmds.push('-c', `write -P 0x${(0x21 + i).toString(16)} ${m + i * 7}M 1M`);
        await backupLayer('i-3-11-VM', i, `${sparseGiB}G`, cmds);
      }
      for (const format of ['qcow2', 'raw']) {
        const to = path.join(out, `big.${format}`);
        const argv = restoreArgv(`i-3-11-VM/${ts.at(-1)}`, to, format);
        const peak = peakKiB(argv);
        fs.rmSync(to);
        console.log(
          `peak RSS, restore --format ${format} of a ${layers}-layer sparse chain on a ${sparseGiB} GiB disk: ${(peak / 1024).toFixed(1)} MiB = idle + ${((peak - idle) / 1024).toFixed(1)} MiB (goal: <= +32)`,
        );
      }
    }
  } finally {
    if (keep) console.log(`kept: ${dir}`);
    else fs.rmSync(dir, { recursive: true, force: true });
  }
}

await main();
