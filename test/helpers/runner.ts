// Runners for client tests: a scripted one (answers chosen per argv, every call recorded)
// for parsing and failure cases, and the real one with a log kept in memory.
import { Runner, type RunOptions, type RunResult } from '../../lib/exec.js';
import type { Logger } from '../../lib/log.js';

export interface Call {
  command: string;
  args: readonly string[];
  opts: RunOptions;
}

export const ok = (stdout: string): Partial<RunResult> => ({ stdout });
export const fails = (stderr: string, exitCode = 1): Partial<RunResult> => ({ exitCode, stderr });

/** `answer` sees each call and returns what differs from a silent success. */
export function scriptedRunner(answer: (args: readonly string[], command: string) => Partial<RunResult> = () => ({})): {
  runner: Runner;
  calls: Call[];
} {
  const calls: Call[] = [];
  const runner = {
    run: async (command: string, args: readonly string[], opts: RunOptions): Promise<RunResult> => {
      calls.push({ command, args, opts });
      return {
        command,
        args,
        exitCode: 0,
        signal: null,
        stdout: '',
        stderr: '',
        timedOut: false,
        canceled: false,
        spawnError: null,
        durationMs: 1,
        ...answer(args, command),
      };
    },
  } as unknown as Runner;
  return { runner, calls };
}

export function realRunner(): { runner: Runner; lines: string[] } {
  const lines: string[] = [];
  const logger: Logger = { file: '/dev/null', log: (m) => lines.push(m) };
  return { runner: new Runner(logger), lines };
}
