// (a) Stopped full copy of a qcow2 disk: ours (the CLI, bind-mounted local NAS) against the
// original's `qemu-img convert -O qcow2` (plus the global `sync` it runs after the copies) and
// the floor (the allocated bytes read once and written once, fdatasync), same images, same run,
// caches dropped before every measurement, the order rotated per run.
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import {
  BASELINE_BIN,
  bytes,
  cliBox,
  cliStoppedBackup,
  dropCaches,
  floorCopy,
  fmtB,
  GiB,
  idleRssKiB,
  loadAverage,
  machineLine,
  makeShape,
  median,
  MiB,
  opt,
  ratio,
  RUNS,
  scratch,
  spread,
  timed,
  type Run,
} from './common.js';

export interface Shape {
  name: string;
  virtual: number;
  piece: number;
  stride: number;
  dataEnd: number;
}

/** The shapes; sizes from the flags for shorter runs. */
export function stoppedShapes(): Shape[] {
  const disk = bytes(opt('disk', '4G'));
  const data = bytes(opt('data', '2G'));
  const sparseVirtual = bytes(opt('sparse-virtual', '100G'));
  const sparseData = bytes(opt('sparse-data', '1G'));
  const all: Shape[] = [
    { name: `contiguous (${fmtB(data)} of ${fmtB(disk)})`, virtual: disk, piece: data, stride: disk, dataEnd: data },
    {
      name: `fragmented (1 MiB every 2 MiB, ${fmtB(data)} of ${fmtB(disk)})`,
      virtual: disk,
      piece: MiB,
      stride: 2 * MiB,
      dataEnd: 2 * data,
    },
    {
      name: `sparse (${fmtB(sparseData)} spread thin over ${fmtB(sparseVirtual)})`,
      virtual: sparseVirtual,
      piece: MiB,
      stride: Math.floor(sparseVirtual / (sparseData / MiB) / MiB) * MiB,
      dataEnd: sparseVirtual,
    },
  ];
  const only = opt('shapes', 'contiguous,fragmented,sparse').split(',');
  return all.filter((s) => only.some((o) => s.name.startsWith(o)));
}

export async function sectionStopped(): Promise<void> {
  const idle = await idleRssKiB();
  console.log(
    `(a) stopped full copy: ${RUNS} runs per shape; idle RSS (nasbackup --version) ${(idle / 1024).toFixed(1)} MiB; ${machineLine()}`,
  );
  for (const shape of stoppedShapes()) {
    const dir = scratch('a');
    try {
      const src = path.join(dir, '6a0b6f3e-0000-4000-8000-00000000a001');
      const data = makeShape(src, shape.virtual, shape.piece, shape.stride, shape.dataEnd);
      const box = cliBox(dir);
      const out = path.join(box.nas, 'convert.qcow2');
      const ours: Run[] = [];
      const conv: Run[] = [];
      const floor: Run[] = [];
      const base: Run[] = [];
      let cold = true;
      for (let r = 0; r < RUNS; r++) {
        const steps: Array<() => Promise<void>> = [
          async () => {
            cold = dropCaches() && cold;
            const b = await cliStoppedBackup(box, 'i-2-10-VM', [src]);
            ours.push(b);
            fs.rmSync(b.folder, { recursive: true, force: true });
          },
          async () => {
            cold = dropCaches() && cold;
            const t = await timed('qemu-img', ['convert', '-O', 'qcow2', src, out]);
            const s = await timed('sync', []);
            conv.push({ seconds: t.seconds + s.seconds, rssKiB: t.rssKiB, cpuSeconds: (t.cpuSeconds ?? 0) + (s.cpuSeconds ?? 0) });
            fs.rmSync(out, { force: true });
          },
          async () => {
            cold = dropCaches() && cold;
            floor.push(await floorCopy(src, box.nas));
          },
          ...(BASELINE_BIN
            ? [
                async () => {
                  cold = dropCaches() && cold;
                  const b = await cliStoppedBackup(box, 'i-2-10-VM', [src], BASELINE_BIN);
                  base.push(b);
                  fs.rmSync(b.folder, { recursive: true, force: true });
                },
              ]
            : []),
        ];
        // Rotate who goes first, so none always meets the same page-cache and writeback state.
        for (let k = 0; k < steps.length; k++) await steps[(k + r) % steps.length]!();
      }
      const t = (xs: Run[]): number[] => xs.map((x) => x.seconds);
      const rss = (xs: Run[]): string => `${(Math.max(...xs.map((x) => x.rssKiB)) / 1024).toFixed(1)} MiB`;
      // CPU time (user + system; the sync's is the kernel's writeback, not counted): steadier than wall time on a loaded host.
      const cpu = (xs: Run[]): string => `CPU ${median(xs.map((x) => x.cpuSeconds ?? 0)).toFixed(2)} s`;
      console.log(`  ${shape.name}: ${fmtB(data)} of data${cold ? '' : ' (warm caches: not root)'}`);
      console.log(
        `    ours (CLI)            ${spread(t(ours))}  peak RSS ${rss(ours)} (idle + ${((Math.max(...ours.map((x) => x.rssKiB)) - idle) / 1024).toFixed(1)} MiB), ${cpu(ours)}`,
      );
      if (BASELINE_BIN) {
        console.log(
          `    baseline (CLI)        ${spread(t(base))}  peak RSS ${rss(base)}, ${cpu(base)}; ours / baseline ${ratio(t(ours), t(base))} paired`,
        );
      }
      console.log(`    qemu-img convert+sync ${spread(t(conv))}  peak RSS ${rss(conv)}, ${cpu(conv)}`);
      console.log(
        `    floor                 ${spread(t(floor))}  (${fmtB(median(t(floor)) > 0 ? data / median(t(floor)) : 0)}/s), ${cpu(floor)}`,
      );
      console.log(
        `    ours / convert ${ratio(t(ours), t(conv))}   ours / floor ${ratio(t(ours), t(floor))}   convert / floor ${ratio(t(conv), t(floor))}`,
      );
    } finally {
      execFileSync('rm', ['-rf', dir]);
    }
  }
  console.log(`  load average at the end: ${loadAverage()}`);
  void GiB;
}
