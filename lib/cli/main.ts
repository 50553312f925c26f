// The CLI: parse, validate everything that needs no side effects (once, into typed
// arguments and one immutable config), check the host, run one operation, ALWAYS close
// the NAS session — on success, on error and on SIGTERM/SIGINT/SIGHUP (the agent's
// timeout does not kill us; an operator may) — and render what it returned.
import { invalidOptionText, usageText } from '../agent-output.js';
import { loadConfig, type Config, type ConfigFlags } from '../config.js';
import { NasbackupError, toNasbackupError } from '../errors.js';
import { createLogger, logFileFromEnv, type Logger } from '../log.js';
import {
  backupRenderer,
  deleteRenderer,
  rebaseRenderer,
  render,
  renderFailure,
  statsRenderer,
  type BackupResult,
  type Outcome,
  type OutputMode,
  type Renderer,
} from '../output.js';
import type { AgentProfile } from '../../compat/protocol.js';
import { isOperation, parseArgs, UsageRequested, wantsJson, type CliArgs, type Operation } from './args.js';
import { parseBandwidth } from '../ops/backup/args.js';
import type { OpContext } from '../ops/context.js';
import type { ExecuteIo } from './lifecycle.js';
import type { OperationArgs } from './validate.js';

export interface MainIo extends ExecuteIo {
  /** Shown in the usage text ($0 of the original). */
  scriptName: string;
  /** The agent generation `nasbackup agent` serves (else NASBACKUP_AGENT_PROFILE). */
  profile?: AgentProfile;
}

/** The settings the command line may give; checked with the environment's by loadConfig. */
function configFlags(a: CliArgs, profile: AgentProfile | undefined): ConfigFlags {
  return {
    ...(a.mountTimeout !== undefined ? { mountTimeout: a.mountTimeout } : {}),
    ...(a.quiesceTimeout !== undefined ? { quiesceTimeout: a.quiesceTimeout } : {}),
    ...(a.engine !== undefined ? { engine: a.engine } : {}),
    ...(profile !== undefined ? { agentProfile: profile } : {}),
  };
}

/**
 * Later upstream flags (#12898). -e is refused: pretending would mislead, and nothing
 * records which key encrypted which backup. -b and -c are honoured by backups; the other
 * operations copy no disk, so there they are accepted and logged (a bad -b value is still refused).
 */
function laterFlags(a: CliArgs, op: Operation, log: (m: string) => void): void {
  if (a.encrypt !== undefined)
    throw new NasbackupError(
      'UNSUPPORTED_OPTION',
      'Option -e/--encrypt is not supported by this nasbackup: backups would not be encrypted, and nothing would record which key encrypted which backup (a rotated passphrase would strand the older backups of the chain)',
    );
  if (op === 'backup') return;
  if (a.bandwidth !== undefined) parseBandwidth(a.bandwidth);
  for (const [given, flag] of [
    [a.bandwidth !== undefined, '-b/--bandwidth'],
    [a.compress, '-c/--compress'],
  ] as const) {
    if (given) log(`${flag} applies to backups only; ignored for -o ${op}`);
  }
}

export async function main(argv: readonly string[], io: MainIo): Promise<number> {
  const logger = createLogger(logFileFromEnv(io.env));
  const json = wantsJson(argv); // people and automation only: the agent never passes --json
  const mode: OutputMode = json ? 'json' : 'agent';

  // argv → config and one checked argument object, once; nothing below checks them again.
  let config: Readonly<Config>;
  let checked: OperationArgs;
  try {
    const args = parseArgs(argv);
    if (args.operation === undefined || args.operation === '')
      throw new NasbackupError('MISSING_ARGUMENT', 'Missing -o <operation> (backup, delete, rebase or stats)');
    if (!isOperation(args.operation))
      throw new NasbackupError('UNKNOWN_OPERATION', `Unknown operation: ${args.operation} (expected backup, delete, rebase or stats)`);
    const op = args.operation;
    laterFlags(args, op, (m) => logger.log(m));
    config = loadConfig(io.env, configFlags(args, io.profile));
    if (args.verify && op !== 'backup') logger.log(`--verify: ignored by -o ${op} (it verifies a backup just written)`);
    checked = (await import('./validate.js')).validateOperationArgs(op, args, config.agentProfile);
  } catch (e) {
    if (e instanceof UsageRequested) {
      io.out.write(usageText(io.scriptName));
      return e.exitCode;
    }
    const err = toNasbackupError(e);
    logger.log(`ERROR [${err.code}] ${err.message}`);
    if (!json && err.code === 'INVALID_OPTION') {
      io.out.write(invalidOptionText(err.message.slice('Invalid option: '.length), io.scriptName));
      return err.exitCode;
    }
    return renderFailure(io.out, mode, wantedCommand(argv), [err]);
  }

  const needsVersions = config.versionCheck === 'all' || (config.versionCheck === 'backup' && checked.op === 'backup');
  // Loaded once the argv is good: the usage and an argv error need none of it.
  const [{ execute }, { checkHostVersions }] = await Promise.all([import('./lifecycle.js'), import('../sanity.js')]);
  if (needsVersions) preloadOperation(checked.op);
  const outcome = await execute(io, config, logger, async (ctx) => {
    if (needsVersions) await checkHostVersions(ctx.clients.virsh, logger);
    ctx.checkpoint();
    return runOperation(checked, ctx);
  });
  const shown = checked.op === 'backup' ? cleanupOnlyWarns(outcome as Outcome<BackupResult>, config.agentProfile, logger) : outcome;
  return render(io.out, mode, RENDERERS[checked.op] as Renderer<unknown>, shown);
}

/**
 * #13424, followed for the merged and newest agents: an unmount that fails or times out
 * after a complete backup only warns (the backup is there; those agents would mark it
 * failed). The rebase-era pairing keeps exit 20 (`Backup cleanup failed`).
 */
function cleanupOnlyWarns(outcome: Outcome<BackupResult>, profile: AgentProfile, logger: Logger): Outcome<BackupResult> {
  const r = outcome.result;
  if (profile === 'rebase-era' || !r || outcome.errors.length === 0) return outcome;
  if (!outcome.errors.every((e) => e.code === 'NAS_CLEANUP_FAILED')) return outcome;
  const warnings = outcome.errors.map((e) => ({ code: 'CLEANUP_INCOMPLETE' as const, message: e.message.split('\n').join('; ') }));
  for (const w of warnings)
    logger.log(`Warning: after the complete backup ${r.path}: ${w.message} (not a failure for the ${profile} agent)`);
  return { ...outcome, result: { ...r, warnings: [...r.warnings, ...warnings] }, errors: [] };
}

/** The operation named in argv, for the JSON envelope of a command line that did not parse. */
function wantedCommand(argv: readonly string[]): string {
  const i = argv.findIndex((a) => a === '-o' || a === '--operation');
  const op = i >= 0 ? argv[i + 1] : undefined;
  return isOperation(op) ? op : 'nasbackup';
}

const RENDERERS = { stats: statsRenderer, delete: deleteRenderer, rebase: rebaseRenderer, backup: backupRenderer } as const;

/**
 * Start loading the operation's modules (no side effects: code only), so they load while
 * `virsh version` runs; runOperation's own imports then find them loaded.
 */
function preloadOperation(op: Operation): void {
  const loads: Array<Promise<unknown>> =
    op === 'rebase'
      ? [import('../ops/rebase.js'), import('../engine/qemu-img.js'), import('../engine/select.js')]
      : op === 'delete'
        ? [import('../ops/delete.js')]
        : op === 'stats'
          ? [import('../ops/stats.js')]
          : [import('../ops/backup/index.js')];
  for (const l of loads) l.catch(() => {}); // a load that fails is reported where runOperation awaits it
}

async function runOperation(c: OperationArgs, ctx: OpContext): Promise<unknown> {
  switch (c.op) {
    case 'rebase': {
      // The engines (and the qcow2 library behind them) only for the operation that uses them.
      const [{ rebaseOperation }, { QemuImgRebaseEngine }, { selectEngine }] = await Promise.all([
        import('../ops/rebase.js'),
        import('../engine/qemu-img.js'),
        import('../engine/select.js'),
      ]);
      const qemuImg = new QemuImgRebaseEngine(ctx.clients.qemuImg, (step) => ctx.shield(step));
      const engine = selectEngine(
        ctx.config.engine,
        qemuImg,
        (m) => ctx.logger.log(m),
        undefined,
        () => ctx.checkpoint(),
      );
      return rebaseOperation(ctx, c.args, engine);
    }
    case 'delete': {
      const { deleteOperation } = await import('../ops/delete.js');
      return deleteOperation(ctx, c.args);
    }
    case 'stats': {
      const { statsOperation } = await import('../ops/stats.js');
      return statsOperation(ctx, c.args);
    }
    case 'backup': {
      const { backupOperation } = await import('../ops/backup/index.js');
      return backupOperation(ctx, c.args);
    }
  }
}
