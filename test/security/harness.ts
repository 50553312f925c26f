// Shared by the security regression tests: running bin/nasbackup as its own process
// group (so a test can signal the group as a terminal or init would), sending signals
// at chosen points, and looking at what a run left behind.
import type { ChildProcess } from 'node:child_process';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { BIN, start, type RunOutcome, type Sandbox } from '../helpers/cli.js';

export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export async function waitFor(cond: () => boolean, ms: number, what = 'condition'): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`${what}: not met within ${ms} ms`);
    await sleep(2);
  }
}

/** bin/nasbackup (or `bin` given) as the leader of its own process group. */
export function startGroup(
  sb: Sandbox,
  args: string[],
  env: NodeJS.ProcessEnv = {},
  bin = BIN,
): { child: ChildProcess; done: Promise<RunOutcome> } {
  return start(sb, args, env, { detached: true, bin });
}

/** Live (non-zombie) children of `pid` whose command name is `comm`. */
export function childrenNamed(pid: number, comm: string): number[] {
  const out: number[] = [];
  for (const d of readdirSync('/proc')) {
    if (!/^\d+$/.test(d)) continue;
    let stat: string;
    try {
      stat = readFileSync(`/proc/${d}/stat`, 'utf8');
    } catch {
      continue;
    }
    // "pid (comm) state ppid ...": comm may hold spaces, so split after the last ')'.
    const name = stat.slice(stat.indexOf('(') + 1, stat.lastIndexOf(')'));
    const [state, ppid] = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    if (name === comm && Number(ppid) === pid && state !== 'Z') out.push(Number(d));
  }
  return out;
}

/** The set of signals a process catches (SigCgt of /proc/<pid>/status), or null once it is gone. */
export function caughtSignals(pid: number): bigint | null {
  try {
    const m = /^SigCgt:\s*([0-9a-f]+)$/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? BigInt(`0x${m[1]}`) : null;
  } catch {
    return null;
  }
}

export const logHas = (file: string, re: RegExp): boolean => existsSync(file) && re.test(readFileSync(file, 'utf8'));
