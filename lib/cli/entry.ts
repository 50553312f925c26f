// The program's one dispatch, shared by bin/nasbackup (ESM, runs dist/) and the
// single-file bundle (dist/nasbackup.cjs): the agent's CLI (`-o …`) by default, and the
// operator commands (never on the agent's path) by their first argument.
import { EXIT_OK } from '../errors.js';
import type { Output } from '../output.js';
import { installSignalHandlers, restoreDefaultSignals } from './signals.js';
import { render, versionRenderer } from '../output.js';
import { operatorHelp } from './help.js';

/** First arguments that select an operator command instead of the agent's CLI. */
export const OPERATOR_COMMANDS = ['agent', 'chain', 'plan-delete', 'restore', 'install-agent-hook', 'mount', 'umount'] as const;

export interface EntryIo {
  out: Output;
  env: NodeJS.ProcessEnv;
  /** $0 of the original: the agent's script path (NASBACKUP_SCRIPT_NAME) or our own. */
  scriptName: string;
  /** Absolute path of the file node runs (the bundle or bin/nasbackup): what a launcher execs. */
  selfPath: string;
  /** package.json's version (inlined in the bundle, read next to bin/ otherwise). */
  version: () => string;
  /** All of stdin (only `agent` reads it). */
  readStdin: () => Promise<string>;
  /** A yes/no question to the operator; absent when stdin/stdout are not a terminal. */
  confirm?: (question: string) => Promise<boolean>;
}

const isHelp = (a: string): boolean => a === '-h' || a === '--help';

export async function dispatch(argv: readonly string[], io: EntryIo): Promise<number> {
  const [first, ...rest] = argv;
  if (first === '--version') {
    return render(io.out, rest.includes('--json') ? 'json' : 'text', versionRenderer, {
      result: { version: io.version() },
      errors: [],
      mounts: [],
    });
  }
  // Operator commands: --help is that command's usage, exit 0 (only the agent CLI's -h keeps the original's exit 1).
  if ((OPERATOR_COMMANDS as readonly string[]).includes(first ?? '') && rest.some(isHelp)) {
    io.out.write(operatorHelp(first!, rest));
    return EXIT_OK;
  }
  switch (first) {
    case 'agent': {
      const { runAgent, parseAgentArgs } = await import('./agent.js'); // lazy: the script path never loads compat/
      const args = parseAgentArgs(rest);
      // Waiting for stdin is no operation yet: a signal meanwhile ends us as by default.
      restoreDefaultSignals();
      const stdin = await io.readStdin();
      installSignalHandlers();
      const r = await runAgent(stdin, { profile: args.profile, argError: args.error, env: io.env, scriptName: io.scriptName });
      io.out.write(r.stdout);
      return r.exitCode;
    }
    case 'chain':
    case 'plan-delete':
    case 'restore':
    case 'mount':
    case 'umount': {
      const { runTool } = await import('./tools.js');
      return runTool(first, rest, { out: io.out, env: io.env, ...(io.confirm ? { confirm: io.confirm } : {}) });
    }
    case 'install-agent-hook': {
      restoreDefaultSignals(); // not an operation under the lifecycle: signals act as by default
      const { runInstallAgentHook } = await import('./install.js');
      return runInstallAgentHook(rest, { out: io.out, env: io.env, selfPath: io.selfPath, version: io.version });
    }
    default: {
      const { main } = await import('./main.js'); // (inlined in the bundle; lazy so --version loads nothing else)
      return main(argv, { out: io.out, env: io.env, scriptName: io.scriptName });
    }
  }
}

/** Run with this process's argv, stdout and environment, then exit with the code. */
export async function start(version: () => string): Promise<void> {
  installSignalHandlers(); // normally done already, before anything was loaded
  const selfPath = process.argv[1] ?? '';
  const argv = process.argv.slice(2);
  const { findLossyArgument, lossyArgumentMessage } = await import('./raw-argv.js');
  const lossy = findLossyArgument(argv);
  if (lossy) {
    // Before anything is touched: a lossily decoded name could be another, existing one.
    const [{ NasbackupError }, { createLogger, logFileFromEnv }] = await Promise.all([import('../errors.js'), import('../log.js')]);
    const err = new NasbackupError('ARGV_NOT_UTF8', lossyArgumentMessage(argv, lossy));
    createLogger(logFileFromEnv(process.env)).log(`ERROR [${err.code}] ${err.message}`);
    process.stdout.write(err.toText(), () => process.exit(err.exitCode));
    return;
  }
  const code = await dispatch(argv, {
    out: { write: (text) => void process.stdout.write(text) },
    env: process.env,
    scriptName: process.env.NASBACKUP_SCRIPT_NAME || selfPath,
    selfPath,
    version,
    ...(process.stdin.isTTY && process.stdout.isTTY ? { confirm: askOnTerminal } : {}),
    readStdin: async () => {
      const chunks: Buffer[] = [];
      for await (const chunk of process.stdin) chunks.push(chunk as Buffer);
      return Buffer.concat(chunks).toString('utf8');
    },
  });
  // stdout to a pipe or file is synchronous on Linux; flush anyway before exiting.
  process.stdout.write('', () => process.exit(code));
}

/** One line from the terminal: yes only for y/yes. */
async function askOnTerminal(question: string): Promise<boolean> {
  const { createInterface } = await import('node:readline/promises');
  const rl = createInterface({ input: process.stdin, output: process.stdout });
  try {
    return /^(y|yes)$/i.test((await rl.question(question)).trim());
  } finally {
    rl.close();
  }
}
