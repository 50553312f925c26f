// Constants of the script's contract with the CloudStack agent, defined once. A pure leaf
// (no imports): compat/ may use it without loading anything on the script's path.

export const EXIT_OK = 0;
export const EXIT_FAILURE = 1;
/** The original's EXIT_CLEANUP_FAILED: the agent marks the backup as Error (needs cleanup). */
export const EXIT_CLEANUP_FAILED = 20;

/**
 * Agent generations that may be paired with us. They differ in the marker lines they
 * strip and where they read the backup size from (lib/agent-output.ts, compat/profiles.ts).
 */
export const AGENT_PROFILES = ['rebase-era', 'merged', 'newest'] as const;
export type AgentProfile = (typeof AGENT_PROFILES)[number];
export const DEFAULT_AGENT_PROFILE: AgentProfile = 'rebase-era';
/** Where an operator who runs the script directly names the agent generation. */
export const PROFILE_ENV = 'NASBACKUP_AGENT_PROFILE';

export function isAgentProfile(s: string | undefined): s is AgentProfile {
  return (AGENT_PROFILES as readonly string[]).includes(s ?? '');
}
