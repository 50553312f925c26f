// The CLI: parse, validate everything that needs no side effects, check the host,
// run one operation, and ALWAYS close the NAS session — on success, on error and
// on SIGTERM/SIGINT/SIGHUP (the agent's timeout does not kill us; an operator may).
import { agentProfileFromEnv, invalidOptionText, usageText } from '../agent-output.js';
import { loadConfig, type Config } from '../config.js';
import { EXIT_OK, NasbackupError, toNasbackupError } from '../errors.js';
import { createLogger, type Logger } from '../log.js';
import type { NasTarget } from '../nas/session.js';
import { QemuImgRebaseEngine } from '../engine/qemu-img.js';
import { parseEngineMode, selectEngine } from '../engine/select.js';
import { checkHostVersions } from '../sanity.js';
import { isOperation, parseArgs, UsageRequested, wantsJson, type CliArgs, type Operation } from './args.js';
import type { OpContext } from '../ops/context.js';
import { execute, type ExecuteIo } from './lifecycle.js';

export { processSignals } from './lifecycle.js';

export interface MainIo extends ExecuteIo {
  /** Shown in the usage text ($0 of the original). */
  scriptName: string;
}

/** -t and -s were checked by validateOperationArgs before we got here. */
function nasTarget(a: CliArgs): NasTarget {
  return { type: a.type!, address: a.storage!, options: a.mount ?? '' };
}

/** Later upstream flags: honoured where we can, refused where pretending would mislead. */
function checkLaterFlags(a: CliArgs, config: Config, logger: Logger): void {
  if (a.encrypt !== undefined)
    throw new NasbackupError('UNSUPPORTED_OPTION', 'Option -e/--encrypt is not supported by this nasbackup; backups would not be encrypted');
  if (a.compress)
    throw new NasbackupError('UNSUPPORTED_OPTION', 'Option -c/--compress is not supported by this nasbackup');
  if (a.bandwidth !== undefined)
    throw new NasbackupError('UNSUPPORTED_OPTION', 'Option -b/--bandwidth is not supported by this nasbackup');
  if (a.mountTimeout !== undefined) {
    const n = Number(a.mountTimeout);
    if (!Number.isFinite(n) || n <= 0) throw new NasbackupError('INVALID_ARGUMENT', `Invalid mount timeout: ${a.mountTimeout}`);
    config.mountTimeoutMs = Math.round(n * 1000);
  }
  if (a.quiesceTimeout !== undefined) {
    if (!/^\d+$/.test(a.quiesceTimeout) || Number(a.quiesceTimeout) === 0)
      throw new NasbackupError('INVALID_ARGUMENT', `Invalid quiesce timeout: ${a.quiesceTimeout}`);
    config.quiesceTimeoutSec = Number(a.quiesceTimeout);
  }
  if (a.verify) logger.log('--verify: chains are checked after the operation');
  if (a.engine !== undefined) config.engine = parseEngineMode(a.engine, '--engine');
}

export async function main(argv: readonly string[], io: MainIo): Promise<number> {
  const config = loadConfig(io.env);
  const logger = createLogger(config.logFile);
  const json = wantsJson(argv); // people and automation only: the agent never passes --json

  let args: CliArgs;
  let op: Operation;
  try {
    args = parseArgs(argv);
    if (args.operation === undefined || args.operation === '')
      throw new NasbackupError('MISSING_ARGUMENT', 'Missing -o <operation> (backup, delete, rebase or stats)');
    if (!isOperation(args.operation))
      throw new NasbackupError('UNKNOWN_OPERATION', `Unknown operation: ${args.operation} (expected backup, delete, rebase or stats)`);
    op = args.operation;
    checkLaterFlags(args, config, logger);
    await import('./validate.js').then((m) => m.validateOperationArgs(op, args));
  } catch (e) {
    if (e instanceof UsageRequested) {
      io.out.write(usageText(io.scriptName));
      return e.exitCode;
    }
    const err = toNasbackupError(e);
    if (json) io.out.write((await import('./json.js')).jsonFailure([err]));
    else io.out.write(err.code === 'INVALID_OPTION' ? invalidOptionText(err.message.slice('Invalid option: '.length), io.scriptName) : err.toText());
    logger.log(`ERROR [${err.code}] ${err.message}`);
    return err.exitCode;
  }

  const needsVersions = config.versionCheck === 'all' || (config.versionCheck === 'backup' && op === 'backup');
  // --json: the operation's agent text goes to a buffer and comes out as one object.
  const report = json ? (await import('./json.js')).jsonReport(op, args, io.env) : null;
  const code = await execute({ ...io, json }, config, logger, async (ctx) => {
    if (needsVersions) await checkHostVersions(ctx.clients.virsh, logger);
    ctx.checkpoint();
    await runOperation(op, args, report ? { ...ctx, out: report.out } : ctx);
  });
  if (report && code === EXIT_OK) io.out.write(report.render());
  return code;
}

async function runOperation(op: Operation, a: CliArgs, ctx: OpContext): Promise<void> {
  switch (op) {
    case 'rebase': {
      const { rebaseOperation } = await import('../ops/rebase.js');
      const qemuImg = new QemuImgRebaseEngine(ctx.clients.qemuImg, (step) => ctx.shield(step));
      const engine = selectEngine(parseEngineMode(ctx.config.engine, 'NASBACKUP_ENGINE'), qemuImg, (m) => ctx.logger.log(m), undefined, () => ctx.checkpoint());
      await rebaseOperation(ctx, { nas: nasTarget(a), target: a.rebaseTarget!, newBacking: a.rebaseNewBacking! }, engine);
      return;
    }
    case 'delete': {
      const { deleteOperation } = await import('../ops/delete.js');
      await deleteOperation(ctx, { nas: nasTarget(a), path: a.path! });
      return;
    }
    case 'stats': {
      const { statsOperation } = await import('../ops/stats.js');
      await statsOperation(ctx, { nas: nasTarget(a) });
      return;
    }
    case 'backup': {
      const { backupOperation, validateBackupArgs } = await import('../ops/backup/index.js');
      await backupOperation(ctx, validateBackupArgs(a, nasTarget(a), agentProfileFromEnv(ctx.env)));
      return;
    }
  }
}
