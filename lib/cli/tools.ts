// Operator commands beside the agent's CLI (never invoked by the agent):
//   nasbackup chain list|verify|plan-delete|delete -t <type> -s <address> [-m <opts>] --vm <instance>
//             [--backup <instance>/<timestamp>] [--force] [--json] [--records <file>]
//   nasbackup plan-delete --records <file> --backup <uuid> --root-volume-uuid <uuid> [--forced]
import { readFile } from 'node:fs/promises';
import yargsFactory from 'yargs/yargs';
import { loadConfig } from '../config.js';
import { NasbackupError, toNasbackupError } from '../errors.js';
import { createLogger } from '../log.js';
import { parseRecords, computeChainRepair, type BackupRecord } from '../chain/provider-plan.js';
import { execute, type ExecuteIo } from './lifecycle.js';

export const TOOLS = ['chain', 'plan-delete'] as const;

const CHAIN_SUBCOMMANDS = ['list', 'verify', 'plan-delete', 'delete'] as const;

function parser(argv: readonly string[]) {
  return yargsFactory([...argv])
    .help(false)
    .version(false)
    .exitProcess(false)
    .strict()
    .parserConfiguration({ 'camel-case-expansion': false, 'parse-numbers': false, 'duplicate-arguments-array': false })
    .fail((msg: string) => {
      throw new NasbackupError('INVALID_OPTION', msg);
    });
}

async function loadRecords(file: string): Promise<BackupRecord[]> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (e) {
    throw new NasbackupError('FILE_NOT_FOUND', `Cannot read records file ${file}`, { details: (e as Error).message });
  }
  try {
    return parseRecords(JSON.parse(text));
  } catch (e) {
    throw new NasbackupError('INVALID_ARGUMENT', `Invalid records file ${file}: ${(e as Error).message}`);
  }
}

export async function runTool(tool: string, argv: readonly string[], io: ExecuteIo): Promise<number> {
  const config = loadConfig(io.env);
  const logger = createLogger(config.logFile);
  const json = argv.includes('--json');
  const fail = (e: unknown): number => {
    const err = toNasbackupError(e);
    io.out.write(json ? JSON.stringify({ ok: false, errors: [err.toJSON()] }) + '\n' : err.toText());
    logger.log(`ERROR [${err.code}] ${err.message}`);
    return err.exitCode;
  };

  if (tool === 'plan-delete') {
    try {
      const a = parser(argv)
        .option('records', { type: 'string', demandOption: true })
        .option('backup', { type: 'string', demandOption: true })
        .option('root-volume-uuid', { type: 'string', demandOption: true })
        .option('forced', { type: 'boolean', default: false })
        .option('json', { type: 'boolean' })
        .parseSync();
      const plan = computeChainRepair(await loadRecords(a.records), a.backup, a['root-volume-uuid'], a.forced);
      io.out.write(JSON.stringify(plan, null, 2) + '\n');
      if (!plan.proceed) {
        const code = plan.code ?? 'CHAIN_REFUSED';
        logger.log(`ERROR [${code}] ${plan.reason}`);
        return new NasbackupError(code, plan.reason ?? '').exitCode;
      }
      return 0;
    } catch (e) {
      return fail(e);
    }
  }

  let a;
  let records: BackupRecord[] | undefined;
  try {
    a = parser(argv)
      .command('$0 <action>', 'chain tools', (y) => y.positional('action', { choices: CHAIN_SUBCOMMANDS, type: 'string' }))
      .option('t', { alias: 'type', type: 'string', demandOption: true, nargs: 1 })
      .option('s', { alias: 'storage', type: 'string', demandOption: true, nargs: 1 })
      .option('m', { alias: 'mount', type: 'string', default: '', nargs: 1 })
      .option('vm', { type: 'string', demandOption: true, nargs: 1 })
      .option('backup', { type: 'string', nargs: 1 })
      .option('force', { type: 'boolean', default: false })
      .option('json', { type: 'boolean', default: false })
      .option('records', { type: 'string', nargs: 1 })
      .option('engine', { type: 'string', nargs: 1, choices: ['auto', 'native', 'qemu-img'] })
      .parseSync();
    if (a.records) records = await loadRecords(a.records);
  } catch (e) {
    return fail(e);
  }
  const action = a.action as (typeof CHAIN_SUBCOMMANDS)[number];
  const engineMode = a.engine ?? config.engine;
  const args = {
    nas: { type: a.t, address: a.s, options: a.m },
    vm: a.vm,
    ...(a.backup ? { backup: a.backup } : {}),
    force: a.force,
    json: a.json,
    ...(records ? { records } : {}),
  };
  return execute({ ...io, json: a.json }, config, logger, async (ctx) => {
    const ops = await import('../ops/chain.js');
    switch (action) {
      case 'list':
        return ops.chainList(ctx, args);
      case 'verify':
        await ops.chainVerify(ctx, args);
        return;
      case 'plan-delete':
        await ops.chainPlanDelete(ctx, args);
        return;
      case 'delete': {
        const { QemuImgClient } = await import('../clients/qemu-img.js');
        const { QemuImgRebaseEngine } = await import('../engine/qemu-img.js');
        const { parseEngineMode, selectEngine } = await import('../engine/select.js');
        const qemuImg = new QemuImgRebaseEngine(new QemuImgClient(ctx.runner, config.qemuImgBinary, config.qemuImgTimeoutMs));
        const engine = selectEngine(parseEngineMode(engineMode, a.engine ? '--engine' : 'NASBACKUP_ENGINE'), qemuImg, (m) => ctx.logger.log(m), undefined, () => ctx.checkpoint());
        return ops.chainDelete(ctx, args, engine);
      }
    }
  });
}
