// `nasbackup agent [--profile rebase-era|merged|newest]`: serve one CloudStack agent
// request. stdin is the management server's wire command array; each command is
// turned into the script's argv as the chosen generation's Java wrapper builds it,
// run in-process through main(), and answered as that wrapper would answer. The
// exit code is always 0: the answer array on stdout is the result channel.
import { badRequest, CompatError, PROFILE_ENV, resolveProfile, serveRequest, type Profile, type ServeResult } from '../../compat/index.js';
import { redact } from '../exec.js';
import { createLogger, logFileFromEnv, type Logger } from '../log.js';
import { main } from './main.js';

export interface AgentOptions {
  /** From --profile; else NASBACKUP_AGENT_PROFILE in env; else rebase-era. */
  profile?: string;
  env: NodeJS.ProcessEnv;
  /** argv[0] of every run (the agent's script path) and the name in usage texts. */
  scriptName: string;
  /** A command-line problem found by parseAgentArgs: answered, nothing run. */
  argError?: string;
}

export interface AgentResult {
  stdout: string;
  exitCode: number;
}

/** `agent` arguments: --profile X or --profile=X, nothing else. */
export function parseAgentArgs(args: readonly string[]): { profile?: string; error?: string } {
  let profile: string | undefined;
  for (let i = 0; i < args.length; i++) {
    const a = args[i]!;
    if (a === '--profile') {
      if (i + 1 >= args.length) return { error: 'Option --profile requires a value' };
      profile = args[++i];
    } else if (a.startsWith('--profile=')) {
      profile = a.slice('--profile='.length);
    } else {
      return { error: `Invalid agent option: ${a} (usage: nasbackup agent [--profile rebase-era|merged|newest] < command.json)` };
    }
  }
  return profile === undefined ? {} : { profile };
}

/** Mount options may hold CIFS credentials; CloudStack hides them from its logs too. */
function argvForLog(argv: readonly string[]): string {
  return argv
    .slice(1)
    .map((a, i, all) => (all[i - 1] === '-m' ? redact(a) : a))
    .map((a) => (a === '' ? '""' : a))
    .join(' ');
}

/** After the fact: exit codes, why an answer looks as it does, and what was answered. */
function logServed(logger: Logger, profile: Profile | null, r: ServeResult): void {
  const tag = `agent[${profile?.name ?? '-'}]`;
  for (const s of r.served) {
    const name = s.fqcn.slice(s.fqcn.lastIndexOf('.') + 1) || 'request';
    if (s.exec) logger.log(`${tag}: ${name}: exit ${s.exec.exitCode}`);
    for (const n of s.notes) logger.log(`${tag}: ${name}: ${redact(n)}`);
    logger.log(`${tag}: ${name}: answered ${s.answer.cls} result=${s.answer.result}`);
  }
}

export async function runAgent(stdinText: string, opts: AgentOptions): Promise<AgentResult> {
  const logger = createLogger(logFileFromEnv(opts.env));
  let profile: Profile | null = null;
  let result: ServeResult;
  try {
    if (opts.argError !== undefined) throw new CompatError('BAD_AGENT_ARGS', opts.argError);
    const chosen = resolveProfile(opts.profile, opts.env[PROFILE_ENV]);
    profile = chosen;
    result = await serveRequest(stdinText, {
      profile: chosen,
      scriptPath: opts.scriptName,
      run: async (argv) => {
        logger.log(`agent[${chosen.name}]: run ${argvForLog(argv)}`);
        let stdout = '';
        const exitCode = await main(argv.slice(1), {
          out: { write: (text: string) => void (stdout += text) },
          env: opts.env,
          scriptName: opts.scriptName,
          // The script formats its backup stdout for the wrapper generation we model.
          profile: chosen.name,
        });
        return { exitCode, stdout };
      },
    });
  } catch (e) {
    // Whatever went wrong, the caller still gets an answer array it can read.
    result = badRequest(e instanceof CompatError ? e : `internal error: ${e instanceof Error ? e.message : String(e)}`);
  }
  logServed(logger, profile, result);
  return { stdout: `${result.wire}\n`, exitCode: 0 };
}
