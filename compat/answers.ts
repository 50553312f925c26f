// (exit code, stdout) → the answer each wrapper generation builds (docs/agent-contract.md §4.2,
// §5.2, §5.3). Where a real wrapper throws on output it cannot parse, the result is
// what the agent then sends instead (§2.3): a plain com.cloud.agent.api.Answer with
// the stack trace, plus a note saying why, for the log.
import { backupAnswer, plainAnswer, statsAnswer, type BackupAnswer, type WireAnswer } from './answer-classes.js';
import type { BackupCommand, TakeBackupCommand } from './commands.js';
import { WRAPPER_CLASSES } from './argv.js';
import { indexOutOfBounds, javaSplit, javaSplitWhitespace, javaTrim, JavaException, parseLong, wrapLong } from './java.js';
import type { Profile } from './profiles.js';
import { EXIT_CLEANUP_FAILED } from './protocol.js';

/** Script.executePipedCommands's Pair<Integer,String>: exit code and stdout as the agent read it. */
export interface ExecResult {
  exitCode: number;
  stdout: string;
}

export interface AnswerOutcome {
  answer: WireAnswer;
  /** Why the answer looks the way it does, when that is not obvious (for the log). */
  notes: string[];
}

export { EXIT_CLEANUP_FAILED };
const FALLBACK_MARKER = 'INCREMENTAL_FALLBACK=true';
const SIZE_MARKER = 'BACKUP_SIZE_TOTAL=';

/** What the agent sends when a wrapper throws: Answer(false, printStackTrace text). */
export function agentAnswerForThrow(e: JavaException, wrapperClass: string): WireAnswer {
  return plainAnswer(false, e.stackTrace(wrapperClass));
}

/**
 * G1/G2/G3 size rules on the marker-free stdout: a running VM's size is the last
 * line; a stopped VM's is the sum of every line's first space-separated token.
 * Throws like Long.parseLong / array indexing would.
 */
export function positionalSize(rest: string, stoppedVm: boolean): bigint {
  const lines = javaSplit(rest, '\n');
  if (!stoppedVm) return lines.length > 0 ? parseLong(javaTrim(lines[lines.length - 1]!)) : 0n;
  let sum = 0n;
  for (const line of lines) {
    const tokens = javaSplit(line, ' ');
    if (tokens.length === 0) throw indexOutOfBounds(0, 0);
    sum = wrapLong(sum + parseLong(javaTrim(tokens[0]!)));
  }
  return sum;
}

/**
 * G1/G2: trim, drop trimmed marker lines (keeping their values), re-join, trim: that
 * text is only for the size. `details` is the whole stdout trimmed once, markers
 * included (contract §5.2, corrected).
 */
function successG12(stdout: string, stoppedVm: boolean): BackupAnswer {
  let created: string | undefined;
  let recreated: string | undefined;
  let fallback = false;
  const kept: string[] = [];
  const whole = javaTrim(stdout);
  for (const line of javaSplit(whole, '\n')) {
    const t = javaTrim(line);
    if (t.startsWith('BITMAP_CREATED=')) created = t.slice('BITMAP_CREATED='.length);
    else if (t.startsWith('BITMAP_RECREATED=')) recreated = t.slice('BITMAP_RECREATED='.length);
    else if (t.startsWith('INCREMENTAL_FALLBACK=')) fallback = true;
    else kept.push(line);
  }
  const size = positionalSize(javaTrim(kept.join('\n')), stoppedVm);
  const a = backupAnswer(true, whole);
  a.size = size;
  if (created !== undefined) a.bitmapCreated = created;
  a.incrementalFallback = fallback;
  if (recreated !== undefined) a.bitmapRecreated = recreated;
  return a;
}

/**
 * G3/W4 report the command's bitmapNew as created, "null for legacy-full" (contract
 * §5.2). Whether that null comes from the provider or the wrapper is not said; we
 * never claim a bitmap for legacy-full (the script creates none there), even if one
 * was sent: a bitmap name recorded for a backup without one would base the next
 * incremental on nothing.
 */
function bitmapFromCommand(cmd: TakeBackupCommand): string | undefined {
  return cmd.mode === 'legacy-full' ? undefined : cmd.bitmapNew;
}

/**
 * G3: only its own fallback marker is stripped, and only for the size (BITMAP_CREATED=
 * is not: the contract leaves that unconfirmed, so we take the reading that throws);
 * bitmapCreated is the command's bitmapNew; `details` is the whole stdout trimmed once.
 */
function successG3(cmd: TakeBackupCommand, stdout: string, stoppedVm: boolean): BackupAnswer {
  const fallback = stdout.includes(FALLBACK_MARKER);
  const stripped =
    stdout === ''
      ? ''
      : javaSplit(stdout, '\n', -1)
          .filter((l) => !l.includes(FALLBACK_MARKER))
          .join('\n');
  const size = positionalSize(javaTrim(stripped), stoppedVm);
  const a = backupAnswer(true, javaTrim(stdout));
  a.size = size;
  const created = bitmapFromCommand(cmd);
  if (created !== undefined) a.bitmapCreated = created;
  a.incrementalFallback = fallback;
  return a;
}

/** W4: size from the first BACKUP_SIZE_TOTAL= line (missing or bad: 0 and a warning, still success). */
function successW4(cmd: TakeBackupCommand, stdout: string, notes: string[]): BackupAnswer {
  const fallback = stdout.includes(FALLBACK_MARKER);
  const lines = javaSplit(stdout, '\n', -1);
  let size = 0n;
  const marker = lines.find((l) => l.startsWith(SIZE_MARKER));
  if (marker === undefined) {
    notes.push(`W4 wrapper: no ${SIZE_MARKER} line in stdout; the backup succeeds with size 0`);
  } else {
    try {
      size = parseLong(javaTrim(marker.slice(SIZE_MARKER.length)));
    } catch (e) {
      if (!(e instanceof JavaException)) throw e;
      notes.push(`W4 wrapper: unparseable ${SIZE_MARKER} line ${JSON.stringify(marker)}; the backup succeeds with size 0`);
    }
  }
  // Like every generation, the whole stdout trimmed once (contract §5.2's answer row;
  // see compat/README.md for why that wins over "strips marker lines from details").
  const a = backupAnswer(true, javaTrim(stdout));
  a.size = size;
  const created = bitmapFromCommand(cmd);
  if (created !== undefined) a.bitmapCreated = created;
  a.incrementalFallback = fallback;
  return a;
}

export function takeBackupAnswer(profile: Profile, cmd: TakeBackupCommand, exec: ExecResult, stoppedVm: boolean): AnswerOutcome {
  const notes: string[] = [];
  if (exec.exitCode !== 0) {
    const a = backupAnswer(false, javaTrim(exec.stdout));
    if (exec.exitCode === EXIT_CLEANUP_FAILED) a.needsCleanup = true;
    return { answer: a, notes };
  }
  try {
    switch (profile.successParse) {
      case 'g12-markers':
        return { answer: successG12(exec.stdout, stoppedVm), notes };
      case 'g3-fallback-marker':
        return { answer: successG3(cmd, exec.stdout, stoppedVm), notes };
      case 'w4-size-marker':
        return { answer: successW4(cmd, exec.stdout, notes), notes };
    }
  } catch (e) {
    if (!(e instanceof JavaException)) throw e;
    if (profile.catchesRuntimeException) {
      return { answer: backupAnswer(false, e.message), notes: [`${profile.wrapper} wrapper caught ${e.toString()}`] };
    }
    return {
      answer: agentAnswerForThrow(e, WRAPPER_CLASSES.TakeBackupCommand),
      notes: [
        `the ${profile.wrapper} TakeBackup wrapper cannot parse this stdout (${e.toString()}); ` +
          'the agent answers with a plain Answer, which the management server fails to cast to BackupAnswer',
      ],
    };
  }
}

/** Delete and Rebase: any non-zero exit is a failure with the raw stdout; success carries no details. */
function plainOutcome(exec: ExecResult, failureNote?: string): AnswerOutcome {
  if (exec.exitCode !== 0) return { answer: backupAnswer(false, exec.stdout), notes: failureNote ? [failureNote] : [] };
  return { answer: backupAnswer(true, null), notes: [] };
}

/**
 * Stats: result=false even on success (the provider ignores it); `details` is the
 * stdout as read, untrimmed, on success and on failure (contract §5.3); the sizes are
 * whitespace tokens 1 and 2 of the whole stdout, in 1K blocks, unconverted.
 */
export function statsAnswerFrom(exec: ExecResult): AnswerOutcome {
  if (exec.exitCode !== 0) return { answer: statsAnswer(false, exec.stdout), notes: [] };
  const tok = javaSplitWhitespace(exec.stdout);
  try {
    if (tok.length < 2) throw indexOutOfBounds(1, tok.length);
    const total = parseLong(tok[1]!);
    if (tok.length < 3) throw indexOutOfBounds(2, tok.length);
    const used = parseLong(tok[2]!);
    const a = statsAnswer(false, exec.stdout);
    a.totalSize = total;
    a.usedSize = used;
    return { answer: a, notes: [] };
  } catch (e) {
    if (!(e instanceof JavaException)) throw e;
    return {
      answer: agentAnswerForThrow(e, WRAPPER_CLASSES.GetBackupStorageStatsCommand),
      notes: [`the stats wrapper cannot parse this stdout (${e.toString()}); the agent answers with a plain Answer`],
    };
  }
}

/** The answer the profile's wrapper builds from a finished script run. */
export function answerFor(profile: Profile, cmd: BackupCommand, exec: ExecResult, stoppedVm = false): AnswerOutcome {
  switch (cmd.cls) {
    case 'TakeBackupCommand':
      return takeBackupAnswer(profile, cmd, exec, stoppedVm);
    case 'DeleteBackupCommand':
      return plainOutcome(exec);
    case 'RebaseBackupCommand':
      return plainOutcome(exec, `Failed to rebase backup file ${cmd.targetPath} onto ${cmd.newBackingPath}: ${exec.stdout}`);
    case 'GetBackupStorageStatsCommand':
      return statsAnswerFrom(exec);
  }
}
