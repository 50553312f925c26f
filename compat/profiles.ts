// Which generation of the agent's Java wrappers we reproduce (docs/agent-contract.md §1). A
// profile is data: argv.ts and answers.ts read these traits, so the differences
// between generations are listed here once.
import { AGENT_PROFILES, DEFAULT_AGENT_PROFILE, PROFILE_ENV, type AgentProfile } from '../lib/protocol.js';
import { CompatError } from './errors.js';

export const PROFILE_NAMES = AGENT_PROFILES;
export type ProfileName = AgentProfile;
export const DEFAULT_PROFILE: ProfileName = DEFAULT_AGENT_PROFILE;
export { PROFILE_ENV };

export interface Profile {
  name: ProfileName;
  /** The contract's name for the TakeBackup wrapper generation. */
  wrapper: 'G1/G2' | 'G3' | 'W4';
  /** How parents reach the script: the rebase-era `parentPath` field as `--parent-path`, or `parentPaths` joined. */
  parentFlag: '--parent-path' | '--parent-paths';
  /** Test for appending an optional tail value: Java isEmpty, or commons-lang isBlank (W4). */
  tailTest: 'empty' | 'blank';
  /** Pre-validation of mode/bitmaps before anything runs (W2 and later), with the same emptiness test. */
  preValidate: false | 'empty' | 'blank';
  /** W4: `--quiesce-timeout <n>` when quiescing and n > 0. */
  quiesceTimeout: boolean;
  /** LibvirtRebaseBackupCommandWrapper exists (removed in the merged code). */
  rebaseWrapper: boolean;
  /** How a successful TakeBackup's stdout becomes the answer (docs/agent-contract.md §5.2). */
  successParse: 'g12-markers' | 'g3-fallback-marker' | 'w4-size-marker';
  /** W4 catches RuntimeException itself and answers BackupAnswer(false, message). */
  catchesRuntimeException: boolean;
}

export const PROFILES: Readonly<Record<ProfileName, Profile>> = {
  'rebase-era': {
    name: 'rebase-era',
    wrapper: 'G1/G2',
    parentFlag: '--parent-path',
    tailTest: 'empty',
    preValidate: false,
    quiesceTimeout: false,
    rebaseWrapper: true,
    successParse: 'g12-markers',
    catchesRuntimeException: false,
  },
  merged: {
    name: 'merged',
    wrapper: 'G3',
    parentFlag: '--parent-paths',
    tailTest: 'empty',
    preValidate: 'empty',
    quiesceTimeout: false,
    rebaseWrapper: false,
    successParse: 'g3-fallback-marker',
    catchesRuntimeException: false,
  },
  newest: {
    name: 'newest',
    wrapper: 'W4',
    parentFlag: '--parent-paths',
    tailTest: 'blank',
    preValidate: 'blank',
    quiesceTimeout: true,
    rebaseWrapper: false,
    successParse: 'w4-size-marker',
    catchesRuntimeException: true,
  },
};

export const isProfileName = (s: string): s is ProfileName => (PROFILE_NAMES as readonly string[]).includes(s);

/** --profile wins, then NASBACKUP_AGENT_PROFILE, then the rebase-era default. Empty counts as unset. */
export function resolveProfile(fromCli?: string, fromEnv?: string): Profile {
  const pick = fromCli !== undefined && fromCli !== '' ? fromCli : fromEnv !== undefined && fromEnv !== '' ? fromEnv : DEFAULT_PROFILE;
  if (!isProfileName(pick)) {
    const source = fromCli !== undefined && fromCli !== '' ? '--profile' : PROFILE_ENV;
    throw new CompatError('UNKNOWN_PROFILE', `Unknown agent profile "${pick}" from ${source} (expected ${PROFILE_NAMES.join(', ')})`);
  }
  return PROFILES[pick];
}
