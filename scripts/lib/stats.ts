// The figures every bench script prints, in one place: medians of the runs, their min–max
// spread, paired ratios (a / b of the same run, so a change of machine load hits both sides
// alike) and the machine's load average (the host is shared: a figure comes with its load).
import { readFileSync } from 'node:fs';
import os from 'node:os';

/** How a value is printed: two decimals unless a script says otherwise. */
export type Fmt = (v: number) => string;
const fixed2: Fmt = (v) => v.toFixed(2);

/** The middle value (the mean of the two middle ones for an even count). */
export function median(xs: readonly number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = Math.floor(s.length / 2);
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

/** "min–max" of the runs. */
export function spread(xs: readonly number[], f: Fmt = fixed2): string {
  return `${f(Math.min(...xs))}–${f(Math.max(...xs))}`;
}

/** "median (min–max)" of the runs. */
export function medianSpread(xs: readonly number[], f: Fmt = fixed2): string {
  return `${f(median(xs))} (${spread(xs, f)})`;
}

/** a[i] / b[i]: each run's ratio, both sides measured in the same round. */
export function pairedRatios(a: readonly number[], b: readonly number[]): number[] {
  if (a.length !== b.length) throw new Error(`paired ratios of ${a.length} and ${b.length} runs`);
  return a.map((v, i) => v / b[i]!);
}

/** A ratio as printed: "0.42×". */
export const times: Fmt = (r) => `${r.toFixed(2)}×`;

/** The 1, 5 and 15 minute load averages: "3.7 2.2 1.9". */
export function loadAverage(): string {
  return os
    .loadavg()
    .map((l) => l.toFixed(1))
    .join(' ');
}

/**
 * A VM that hands freed memory back to its host (virtio-balloon free page reporting) pays a
 * host fault for every such page it touches again: page cache after drop_caches, fresh
 * buffers. That makes a run 3-10x slower in bursts. The settings are printed with the figures;
 * raising min_free_ms (e.g. to 60000, as root) keeps recently freed pages, and raising
 * max_waiting_mib (e.g. to 32768) stops a large free (a dropped page cache, a removed output)
 * from being reported at once: with both, a warm restore's time varied by 2% instead of 2x.
 */
export function pageReporting(): string | null {
  const param = (name: string): string | null => {
    try {
      return readFileSync(`/sys/module/page_reporting/parameters/${name}`, 'utf8').trim();
    } catch {
      return null;
    }
  };
  const ms = param('min_free_ms');
  if (ms === null) return null;
  const waiting = param('max_waiting_mib');
  return `free page reporting on (min_free_ms ${ms}${waiting === null ? '' : `, max_waiting_mib ${waiting}`})`;
}

/** "2 CPU(s), load average 3.7 2.2 1.9": the line a bench prints before and after its runs. */
export function machineLine(): string {
  const reporting = pageReporting();
  return `${os.cpus().length} CPU(s), load average ${loadAverage()}${reporting ? `; ${reporting}` : ''}`;
}

/** Clock ticks per second of /proc's CPU times (USER_HZ: 100 on every Linux this runs on). */
const USER_HZ = 100;

/** CPU seconds spent so far by this process and by its children it has waited for. */
export function cpuSoFar(): { user: number; sys: number } {
  // /proc/self/stat: fields after the command's closing parenthesis, from field 3 on;
  // cutime and cstime are fields 16 and 17.
  const stat = readFileSync('/proc/self/stat', 'utf8');
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  const self = process.cpuUsage();
  return { user: self.user / 1e6 + Number(f[13]) / USER_HZ, sys: self.system / 1e6 + Number(f[14]) / USER_HZ };
}

/**
 * A run's wall time and CPU time (user + system, its children's included once waited for). On
 * a shared host the CPU seconds move far less than the wall time from run to run, and on a
 * small one they bound it: a program that needs 4 CPU-seconds cannot finish in under 2 s on 2 cores.
 */
export function timeAndCpu(f: () => void): { ms: number; cpu: number } {
  const c0 = cpuSoFar();
  const t0 = process.hrtime.bigint();
  f();
  const ms = Number(process.hrtime.bigint() - t0) / 1e6;
  const c1 = cpuSoFar();
  return { ms, cpu: c1.user - c0.user + (c1.sys - c0.sys) };
}
