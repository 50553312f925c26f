// Command → the script's argv, exactly as each wrapper generation builds it
// (docs/agent-contract.md §3): fixed flags in a fixed order, "" for null mount options and an
// empty disk list, the optional tail only when its value passes the wrapper's
// emptiness test, and the generation differences from profiles.ts.
import { backupAnswer, type WireAnswer } from './answer-classes.js';
import type {
  BackupCommand,
  DeleteBackupCommand,
  GetBackupStorageStatsCommand,
  RebaseBackupCommand,
  TakeBackupCommand,
} from './commands.js';
import { buildDiskPaths, type RbdPoolResolver } from './disks.js';
import { isBlank, isNotEmpty, javaJoin, JavaException } from './java.js';
import type { Profile } from './profiles.js';

/** The agent's default script location (§3); the agent entry passes its own path. */
export const DEFAULT_SCRIPT_PATH = '/usr/share/cloudstack-common/scripts/vm/hypervisor/kvm/nasbackup.sh';

export interface PrepareOptions {
  /** argv[0], the <S> of §3. */
  scriptPath?: string;
  /** Pool facts for rbd: strings (default: from the command's PrimaryDataStoreTO). */
  rbdPool?: RbdPoolResolver;
}

/** What a wrapper does with a command before (or instead of) running the script. */
export type Prepared =
  | { kind: 'run'; argv: string[]; /** -d was non-empty: the stopped-VM size rule applies. */ stoppedVm: boolean; notes: string[] }
  | { kind: 'answer'; answer: WireAnswer; notes: string[] }
  | { kind: 'throw'; exception: JavaException; wrapperClass: string; notes: string[] };

const WRAPPER_PACKAGE = 'com.cloud.hypervisor.kvm.resource.wrapper';
export const WRAPPER_CLASSES: Readonly<Record<BackupCommand['cls'], string>> = {
  TakeBackupCommand: `${WRAPPER_PACKAGE}.LibvirtTakeBackupCommandWrapper`,
  DeleteBackupCommand: `${WRAPPER_PACKAGE}.LibvirtDeleteBackupCommandWrapper`,
  RebaseBackupCommand: `${WRAPPER_PACKAGE}.LibvirtRebaseBackupCommandWrapper`,
  GetBackupStorageStatsCommand: `${WRAPPER_PACKAGE}.LibvirtGetBackupStatsCommandWrapper`,
};

const present = (profile: Profile, v: string | undefined): v is string => (profile.tailTest === 'blank' ? !isBlank(v) : isNotEmpty(v));

/** The TakeBackup argv for already-built -d entries. */
export function takeBackupArgv(
  profile: Profile,
  cmd: TakeBackupCommand,
  diskPaths: ReadonlyArray<string | null>,
  script = DEFAULT_SCRIPT_PATH,
): string[] {
  const argv = [
    script,
    '-o',
    'backup',
    '-v',
    cmd.vmName,
    '-t',
    cmd.backupRepoType,
    '-s',
    cmd.backupRepoAddress,
    '-m',
    cmd.mountOptions ?? '',
    '-p',
    cmd.backupPath,
    '-q',
    cmd.quiesce === true ? 'true' : 'false',
    '-d',
    diskPaths.length === 0 ? '' : javaJoin(',', diskPaths),
  ];
  if (present(profile, cmd.mode)) argv.push('-M', cmd.mode);
  if (present(profile, cmd.bitmapNew)) argv.push('--bitmap-new', cmd.bitmapNew);
  if (present(profile, cmd.bitmapParent)) argv.push('--bitmap-parent', cmd.bitmapParent);
  if (profile.parentFlag === '--parent-path') {
    if (isNotEmpty(cmd.parentPath)) argv.push('--parent-path', cmd.parentPath);
  } else if (cmd.parentPaths !== undefined && cmd.parentPaths.length > 0) {
    argv.push('--parent-paths', javaJoin(',', cmd.parentPaths));
  }
  if (profile.quiesceTimeout && cmd.quiesce === true && cmd.quiesceTimeout !== undefined && cmd.quiesceTimeout > 0) {
    argv.push('--quiesce-timeout', String(cmd.quiesceTimeout));
  }
  return argv;
}

export const deleteArgv = (cmd: DeleteBackupCommand, script = DEFAULT_SCRIPT_PATH): string[] => [
  script,
  '-o',
  'delete',
  '-t',
  cmd.backupRepoType,
  '-s',
  cmd.backupRepoAddress,
  '-m',
  cmd.mountOptions ?? '',
  '-p',
  cmd.backupPath,
];

export const rebaseArgv = (cmd: RebaseBackupCommand, script = DEFAULT_SCRIPT_PATH): string[] => [
  script,
  '-o',
  'rebase',
  '-t',
  cmd.backupRepoType,
  '-s',
  cmd.backupRepoAddress,
  '-m',
  cmd.mountOptions ?? '',
  '--rebase-target',
  cmd.targetPath,
  '--rebase-new-backing',
  cmd.newBackingPath,
];

export const statsArgv = (cmd: GetBackupStorageStatsCommand, script = DEFAULT_SCRIPT_PATH): string[] => [
  script,
  '-o',
  'stats',
  '-t',
  cmd.backupRepoType,
  '-s',
  cmd.backupRepoAddress,
  '-m',
  cmd.mountOptions ?? '',
];

/** W2-and-later pre-validation: the refusal text, or null to go ahead. */
export function preValidationError(profile: Profile, cmd: TakeBackupCommand): string | null {
  if (profile.preValidate === false) return null;
  const missing = (s: string | undefined): boolean => (profile.preValidate === 'blank' ? isBlank(s) : !isNotEmpty(s));
  const mode = cmd.mode;
  if (missing(mode)) return null; // legacy caller: full backup, no checkpoint
  switch (mode) {
    case 'incremental':
      if (missing(cmd.bitmapNew)) return 'incremental mode requires bitmapNew';
      if (missing(cmd.bitmapParent)) return 'incremental mode requires bitmapParent';
      if (cmd.parentPaths === undefined || cmd.parentPaths.length === 0) return 'incremental mode requires parentPaths';
      return null;
    case 'full':
      return missing(cmd.bitmapNew) ? 'full mode requires bitmapNew (the bitmap to create for the next incremental)' : null;
    case 'legacy-full':
      return null;
    default:
      return `Unknown backup mode: ${mode}`;
  }
}

/** Fields the profile's wrapper class does not have: Gson drops them, we say so in the log. */
function ignoredFieldNotes(profile: Profile, cmd: TakeBackupCommand): string[] {
  const notes: string[] = [];
  if (profile.parentFlag === '--parent-path' && cmd.parentPaths !== undefined && cmd.parentPaths.length > 0) {
    notes.push(`profile ${profile.name}: the ${profile.wrapper} wrapper only knows parentPath; parentPaths ignored`);
  }
  if (profile.parentFlag === '--parent-paths' && isNotEmpty(cmd.parentPath)) {
    notes.push(`profile ${profile.name}: the ${profile.wrapper} wrapper only knows parentPaths; parentPath ignored`);
  }
  if (!profile.quiesceTimeout && cmd.quiesceTimeout !== undefined) {
    notes.push(`profile ${profile.name}: quiesceTimeout is not sent by the ${profile.wrapper} wrapper`);
  }
  return notes;
}

function prepareTakeBackup(profile: Profile, cmd: TakeBackupCommand, opts: PrepareOptions): Prepared {
  const notes = ignoredFieldNotes(profile, cmd);
  const refusal = preValidationError(profile, cmd);
  if (refusal !== null)
    return { kind: 'answer', answer: backupAnswer(false, refusal), notes: [...notes, `pre-validation refused: ${refusal}`] };
  let disks: Array<string | null>;
  try {
    disks = buildDiskPaths(cmd, opts.rbdPool);
  } catch (e) {
    if (!(e instanceof JavaException)) throw e;
    if (profile.catchesRuntimeException) {
      return {
        kind: 'answer',
        answer: backupAnswer(false, e.message),
        notes: [...notes, `disk list: ${e.toString()} (caught by the ${profile.wrapper} wrapper)`],
      };
    }
    return {
      kind: 'throw',
      exception: e,
      wrapperClass: WRAPPER_CLASSES.TakeBackupCommand,
      notes: [...notes, `disk list: ${e.toString()}`],
    };
  }
  return { kind: 'run', argv: takeBackupArgv(profile, cmd, disks, opts.scriptPath), stoppedVm: disks.length > 0, notes };
}

/** What the profile's wrapper does with a command up to running the script. */
export function prepare(profile: Profile, cmd: BackupCommand, opts: PrepareOptions = {}): Prepared {
  const script = opts.scriptPath ?? DEFAULT_SCRIPT_PATH;
  switch (cmd.cls) {
    case 'TakeBackupCommand':
      return prepareTakeBackup(profile, cmd, { ...opts, scriptPath: script });
    case 'DeleteBackupCommand':
      return { kind: 'run', argv: deleteArgv(cmd, script), stoppedVm: false, notes: [] };
    case 'GetBackupStorageStatsCommand':
      return { kind: 'run', argv: statsArgv(cmd, script), stoppedVm: false, notes: [] };
    case 'RebaseBackupCommand':
      if (!profile.rebaseWrapper) {
        const why = `RebaseBackupCommand is not handled by the ${profile.name} agent profile (the ${profile.wrapper} agent has no rebase wrapper); nothing was executed`;
        return { kind: 'answer', answer: backupAnswer(false, why), notes: [why] };
      }
      return { kind: 'run', argv: rebaseArgv(cmd, script), stoppedVm: false, notes: [] };
  }
}
