// One agent request end to end, without I/O of its own: wire command array in,
// wire answer array out. Running the script is the caller's `run` (the agent entry
// runs the operation in-process; tests pass fakes). Bad input never runs anything.
import { backupAnswer, encodeAnswers, statsAnswer, type WireAnswer } from './answer-classes.js';
import { answerFor, agentAnswerForThrow, type ExecResult } from './answers.js';
import { prepare, type PrepareOptions } from './argv.js';
import { decodeRequest, type CommandClass, type DecodedElement } from './commands.js';
import { type CompatError, isCompatError } from './errors.js';
import { pipedStdout } from './java.js';
import type { Profile } from './profiles.js';

/** Runs the script once: the process's exit code and its raw stdout. */
export type ScriptRunner = (argv: readonly string[]) => Promise<ExecResult>;

export interface ServeOptions extends PrepareOptions {
  profile: Profile;
  run: ScriptRunner;
}

export interface ServedCommand {
  fqcn: string;
  /** What the wrapper ran, when it ran anything. */
  argv?: string[];
  /** The pair the wrapper saw (stdout already as Script.executePipedCommands returns it). */
  exec?: ExecResult;
  answer: WireAnswer;
  notes: string[];
}

export interface ServeResult {
  /** The answer array on the wire. */
  wire: string;
  served: ServedCommand[];
}

const REFUSED = 'nothing was executed';

/** A failed answer of the class the command's caller expects (stats callers cast to BackupStorageStatsAnswer). */
function failureFor(cls: CommandClass | undefined, details: string): WireAnswer {
  return cls === 'GetBackupStorageStatsCommand' ? statsAnswer(false, details) : backupAnswer(false, details);
}

/** The answer to a request that could not be read at all: one failed BackupAnswer. */
export function badRequest(error: CompatError | string): ServeResult {
  const message = typeof error === 'string' ? error : error.message;
  const details = `nasbackup agent: ${message}; ${REFUSED}`;
  const answer = backupAnswer(false, details);
  return { wire: encodeAnswers([answer]), served: [{ fqcn: '', answer, notes: [details] }] };
}

function refuseAll(elements: DecodedElement[]): ServeResult {
  const firstBad = elements.findIndex((e) => !e.ok);
  const served = elements.map((e, i): ServedCommand => {
    const cls = e.ok ? e.command.cls : e.commandClass;
    const details = e.ok
      ? `nasbackup agent: command ${i} was not run because command ${firstBad} of the same request is invalid; ${REFUSED}`
      : `nasbackup agent: ${e.error.message}; ${REFUSED}`;
    return { fqcn: e.fqcn, answer: failureFor(cls, details), notes: [details] };
  });
  return { wire: encodeAnswers(served.map((s) => s.answer)), served };
}

export async function serveRequest(text: string, opts: ServeOptions): Promise<ServeResult> {
  let elements: DecodedElement[];
  try {
    elements = decodeRequest(text);
  } catch (e) {
    if (isCompatError(e)) return badRequest(e);
    throw e;
  }
  // Like Gson failing the whole Command[], one bad element means nothing runs.
  if (elements.some((e) => !e.ok)) return refuseAll(elements);

  const served: ServedCommand[] = [];
  for (const el of elements) {
    if (!el.ok) continue; // unreachable: checked above
    const cmd = el.command;
    const p = prepare(opts.profile, cmd, opts);
    if (p.kind === 'answer') {
      served.push({ fqcn: el.fqcn, answer: p.answer, notes: p.notes });
      continue;
    }
    if (p.kind === 'throw') {
      const notes = [
        ...p.notes,
        `the ${opts.profile.wrapper} wrapper throws ${p.exception.toString()} before running anything; the agent answers with a plain Answer`,
      ];
      served.push({ fqcn: el.fqcn, answer: agentAnswerForThrow(p.exception, p.wrapperClass), notes });
      continue;
    }
    let exec: ExecResult;
    const notes = [...p.notes];
    try {
      const raw = await opts.run(p.argv);
      exec = { exitCode: raw.exitCode, stdout: pipedStdout(raw.stdout) };
    } catch (e) {
      // Script.executePipedCommands turns an unexpected failure into (-1, "execute.error").
      notes.push(`running the operation failed: ${e instanceof Error ? e.message : String(e)}`);
      exec = { exitCode: -1, stdout: 'execute.error' };
    }
    const out = answerFor(opts.profile, cmd, exec, p.stoppedVm);
    served.push({ fqcn: el.fqcn, argv: p.argv, exec, answer: out.answer, notes: [...notes, ...out.notes] });
  }
  return { wire: encodeAnswers(served.map((s) => s.answer)), served };
}
