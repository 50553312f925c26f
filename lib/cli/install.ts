// `nasbackup install-agent-hook [--target <path>] [--node <path>] [--uninstall] [--json]`
//
// Puts a small /bin/sh launcher at the agent's script path (lib/install/launcher.ts) and
// keeps the original beside it; `--uninstall` puts the original back
// (lib/install/transaction.ts). This file only parses the arguments and prints the
// outcome. Never on the agent's path.
import { NasbackupError, toNasbackupError } from '../errors.js';
import { Runner } from '../exec.js';
import { installAgentHook, uninstallAgentHook, type InstallAction, type InstallResult } from '../install/transaction.js';
import { createLogger, logFileFromEnv } from '../log.js';
import type { Output } from '../output.js';
import { wantsJson } from './args.js';
import { render, renderFailure, type OutputMode, type Renderer } from '../output.js';

// The command's pieces as they were exported before the split (test/ship/install.test.ts uses them from here).
export { isLauncher, launcherText, LAUNCHER_MARKER, NODE_FLAGS, shQuote } from '../install/launcher.js';
export { compareVersions, MIN_NODE_VERSION } from '../install/node-probe.js';

/** Where packaged CloudStack agents keep the script (paths.script in environment.properties). */
export const DEFAULT_AGENT_SCRIPT = '/usr/share/cloudstack-common/scripts/vm/hypervisor/kvm/nasbackup.sh';

export interface InstallArgs {
  target: string;
  node?: string;
  uninstall: boolean;
  json: boolean;
}

/** The flags whose next argument is their value (a path, whatever it says: even `--json`). */
const takesValue = (a: string): boolean => a === '--target' || a === '--node';

export function parseInstallArgs(argv: readonly string[]): InstallArgs {
  const out: InstallArgs = { target: DEFAULT_AGENT_SCRIPT, uninstall: false, json: false };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    const eq = a.indexOf('=');
    const [flag, inline] = a.startsWith('--') && eq > 0 ? [a.slice(0, eq), a.slice(eq + 1)] : [a, undefined];
    if (flag === '--uninstall' || flag === '--json') {
      if (inline !== undefined) throw new NasbackupError('INVALID_OPTION', `Invalid option: ${a}`);
      out[flag === '--json' ? 'json' : 'uninstall'] = true;
    } else if (takesValue(flag)) {
      const v = inline ?? argv[++i];
      if (v === undefined) throw new NasbackupError('MISSING_OPTION_VALUE', `Option ${flag} requires a value`);
      if (v === '') throw new NasbackupError('INVALID_ARGUMENT', `Option ${flag} needs a path`);
      if (flag === '--target') out.target = v;
      else out.node = v;
    } else {
      throw new NasbackupError(
        'INVALID_OPTION',
        `Invalid option: ${a} (usage: nasbackup install-agent-hook [--target <path>] [--node <path>] [--uninstall] [--json])`,
      );
    }
  }
  return out;
}

const SUMMARY: Record<InstallAction, (r: InstallResult) => string> = {
  installed: (r) => `Installed: ${r.target} now runs ${r.node} (Node.js ${r.nodeVersion}) ${r.entry}; the original is ${r.orig}`,
  updated: (r) => `Updated the launcher at ${r.target}: it runs ${r.node} (Node.js ${r.nodeVersion}) ${r.entry}; ${r.orig} untouched`,
  unchanged: (r) => `Already installed: ${r.target} runs ${r.node} (Node.js ${r.nodeVersion}) ${r.entry}; nothing changed`,
  uninstalled: (r) => `Restored the original ${r.target} from ${r.orig}`,
  'not-installed': (r) => `Not installed: ${r.target} is not a nasbackup launcher and there is no ${r.orig}; nothing changed`,
};

export interface InstallIo {
  out: Output;
  env: NodeJS.ProcessEnv;
  /** The program being run (argv[1]): what the launcher will exec. */
  selfPath: string;
  version: () => string;
  /** The Node.js running us, the launcher's default interpreter. */
  execPath?: string;
}

const installRenderer: Renderer<InstallResult> = {
  command: 'install-agent-hook',
  text: (r) => `${SUMMARY[r.action](r)}\n`,
  fields: (r) => ({ ...r }),
};

export async function runInstallAgentHook(argv: readonly string[], io: InstallIo): Promise<number> {
  const logger = createLogger(logFileFromEnv(io.env));
  const mode: OutputMode = wantsJson(argv, takesValue) ? 'json' : 'text';
  try {
    const a = parseInstallArgs(argv);
    const r = a.uninstall
      ? await uninstallAgentHook({ target: a.target })
      : await installAgentHook({
          target: a.target,
          node: a.node ?? io.execPath ?? process.execPath,
          entry: io.selfPath,
          version: io.version(),
          env: io.env,
          runner: new Runner(logger),
        });
    logger.log(`install-agent-hook: ${SUMMARY[r.action](r)}`);
    return render(io.out, mode, installRenderer, { result: r, errors: [], mounts: [] });
  } catch (e) {
    const err = toNasbackupError(e);
    logger.log(`ERROR [${err.code}] install-agent-hook: ${err.message}`);
    return renderFailure(io.out, mode, installRenderer.command, [err]);
  }
}
