// Operator commands beside the agent's CLI (never invoked by the agent):
//   nasbackup chain list|verify|plan-delete|delete -t <type> -s <address> [-m <opts>] --vm <instance>
//             [--backup <instance>/<timestamp>] [--force [--yes]] [--json] [--records <file>]
//   nasbackup restore -t <type> -s <address> [-m <opts>] --backup <instance>/<timestamp> --disk <volume uuid>
//             --to <path> [--format qcow2|raw] [--force] [--json]
//   nasbackup plan-delete --records <file> --backup <uuid> --root-volume-uuid <uuid> [--forced]
//   nasbackup mount -t <type> -s <address> [-m <opts>] --backup <instance>/<timestamp> [--disk <uuid>] <dir>
//   nasbackup umount <dir>
import { readFile } from 'node:fs/promises';
import { parseArgs } from 'node:util';
import yargsParser from 'yargs-parser';
import { loadConfig, type Config } from '../config.js';
import { NasbackupError, toNasbackupError } from '../errors.js';
import { createLogger, logFileFromEnv, type Logger } from '../log.js';
import type { DeletePlan } from '../ops/chain/plan.js';
import type { BackupRecord, ChainRepairPlan } from '../ops/chain/provider-plan.js';
import type { ChainArgs } from '../ops/chain/index.js';
import type * as ChainOpsModule from '../ops/chain/index.js';
import type { OpContext } from '../ops/context.js';
import type { RestoreArgs } from '../ops/restore.js';
import {
  chainDeleteRenderer,
  chainListRenderer,
  chainPlanRenderer,
  chainVerifyRenderer,
  mountRenderer,
  planText,
  providerPlanRenderer,
  render,
  restoreRenderer,
  renderFailure,
  umountRenderer,
  type OutputMode,
} from '../output.js';
import { wantsJson } from './args.js';
import { execute, type ExecuteIo } from './lifecycle.js';
import { validateChainArgs, validateMountArgs, validateRestoreArgs, validateUmountArgs } from './validate.js';

/** The chain operations (lib/ops/chain), loaded while a chain command starts. */
type ChainOps = typeof ChainOpsModule;

export const TOOLS = ['chain', 'plan-delete', 'restore', 'mount', 'umount'] as const;

export const CHAIN_SUBCOMMANDS = ['list', 'verify', 'plan-delete', 'delete'] as const;

/** yargs, loaded only by the commands that use it (restore parses its flags without it: a faster start). */
async function parser(argv: readonly string[]) {
  const { default: yargsFactory } = await import('yargs/yargs');
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
  const { parseRecords } = await import('../ops/chain/provider-plan.js');
  try {
    return parseRecords(JSON.parse(text));
  } catch (e) {
    throw new NasbackupError('INVALID_ARGUMENT', `Invalid records file ${file}: ${(e as Error).message}`);
  }
}

/** The operator commands' flags whose next argument is their value (`-m --json` is a mount option). */
const VALUE_FLAGS = [
  '-t',
  '--type',
  '-s',
  '--storage',
  '-m',
  '--mount',
  '--vm',
  '--backup',
  '--records',
  '--engine',
  '--root-volume-uuid',
  '--disk',
  '--to',
  '--format',
];
const takesValue = (a: string): boolean => VALUE_FLAGS.includes(a);

export interface ToolIo extends ExecuteIo {
  /** Ask the operator a yes/no question; absent when nobody can answer (stdin/stdout not a terminal). */
  confirm?: (question: string) => Promise<boolean>;
}

export async function runTool(tool: string, argv: readonly string[], io: ToolIo): Promise<number> {
  const logger = createLogger(logFileFromEnv(io.env));
  const json = wantsJson(argv, takesValue);
  const mode: OutputMode = json ? 'json' : 'text';
  const fail = (command: string, e: unknown): number => {
    const err = toNasbackupError(e);
    logger.log(`ERROR [${err.code}] ${err.message}`);
    return renderFailure(io.out, mode, command, [err]);
  };

  if (tool === 'plan-delete') {
    let plan: ChainRepairPlan;
    try {
      const a = (await parser(argv))
        .option('records', { type: 'string', demandOption: true })
        .option('backup', { type: 'string', demandOption: true })
        .option('root-volume-uuid', { type: 'string', demandOption: true })
        .option('forced', { type: 'boolean', default: false })
        .option('json', { type: 'boolean' })
        .parseSync();
      const records = await loadRecords(a.records);
      const { computeChainRepair } = await import('../ops/chain/provider-plan.js');
      plan = computeChainRepair(records, a.backup, a['root-volume-uuid'], a.forced);
    } catch (e) {
      return fail('plan-delete', e);
    }
    const errors = plan.proceed ? [] : [new NasbackupError(plan.code ?? 'CHAIN_REFUSED', plan.reason ?? 'refused')];
    for (const e of errors) logger.log(`ERROR [${e.code}] ${e.message}`);
    return render(io.out, mode, providerPlanRenderer, { result: plan, errors, mounts: [] });
  }

  if (tool === 'restore') return runRestore(argv, io, json, logger, fail);
  if (tool === 'mount' || tool === 'umount') return runMountTool(tool, argv, io, mode, fail);

  const command = `chain ${CHAIN_SUBCOMMANDS.find((s) => s === argv[0]) ?? ''}`.trim();
  // Loaded while the arguments are read and the NAS is mounted (see run below).
  const opsLoad = import('../ops/chain/index.js');
  opsLoad.catch(() => {}); // awaited below; unused when the arguments are refused
  let a: ChainFlags;
  let records: BackupRecord[] | undefined;
  let config: Readonly<Config>;
  try {
    a = plainChainFlags(argv) ?? (await yargsChainFlags(argv));
    config = loadConfig(io.env, a.engine !== undefined ? { engine: a.engine } : {});
    if (a.records) records = await loadRecords(a.records);
  } catch (e) {
    return fail(command, e);
  }
  const action = a.action;
  let args: ChainArgs;
  try {
    args = validateChainArgs(action, {
      nas: { type: a.t, address: a.s, options: a.m },
      vm: a.vm,
      ...(a.backup ? { backup: a.backup } : {}),
      force: a.force,
      ...(records ? { records } : {}),
    });
  } catch (e) {
    return fail(command, e);
  }
  // --force may remove a whole chain: on a terminal, show the plan and ask (unless --yes).
  const confirm = io.confirm;
  const approve =
    action === 'delete' && a.force && !a.yes && !json && confirm
      ? async (plan: DeletePlan): Promise<boolean> => {
          io.out.write(planText(plan));
          return confirm('Proceed? [y/N] ');
        }
      : undefined;
  /**
   * Every chain command first mounts the NAS: started here, so that `mount` (a child process)
   * runs while the operation's modules load; the operation's own openNas gets that session.
   */
  const run = <T>(body: (o: ChainOps, ctx: OpContext) => Promise<T>) =>
    execute(io, config, logger, (ctx) => {
      ctx.openNas(args.nas).catch(() => {}); // the operation awaits it first thing
      return opsLoad.then((o) => body(o, ctx));
    });
  switch (action) {
    case 'list':
      return render(io.out, mode, chainListRenderer, await run((o, ctx) => o.chainList(ctx, args)));
    case 'verify': {
      // A bar on stderr for an operator at a terminal; never with --json.
      const bar = process.stdout.isTTY === true && !json;
      const progress = bar ? await (await import('../ops/backup/progress.js')).createProgress(true, 'verify') : null;
      const outcome = await run((o, ctx) =>
        o
          .chainVerify(ctx, args, progress ? { progress: (done, total) => progress.update(done, total) } : {})
          .finally(() => progress?.stop()),
      );
      return render(io.out, mode, chainVerifyRenderer, outcome);
    }
    case 'plan-delete':
      return render(io.out, mode, chainPlanRenderer, await run((o, ctx) => o.chainPlanDelete(ctx, args)));
    case 'delete': {
      const outcome = await run(async (ops, ctx) => {
        const { QemuImgRebaseEngine } = await import('../engine/qemu-img.js');
        const { selectEngine } = await import('../engine/select.js');
        const qemuImg = new QemuImgRebaseEngine(ctx.clients.qemuImg, (step) => ctx.shield(step));
        const engine = selectEngine(
          config.engine,
          qemuImg,
          (m) => ctx.logger.log(m),
          undefined,
          () => ctx.checkpoint(),
        );
        return ops.chainDelete(ctx, args, engine, approve);
      });
      return render(io.out, mode, chainDeleteRenderer, outcome);
    }
  }
}

/** `chain`'s flags, read. */
export interface ChainFlags {
  action: (typeof CHAIN_SUBCOMMANDS)[number];
  t: string;
  s: string;
  m: string;
  vm: string;
  backup?: string;
  force: boolean;
  yes: boolean;
  json: boolean;
  records?: string;
  engine?: string;
}

const CHAIN_STRINGS = ['t', 'type', 's', 'storage', 'm', 'mount', 'vm', 'backup', 'records', 'engine'];
const CHAIN_BOOLEANS = ['force', 'yes', 'json'];

/** `chain`'s flags with yargs, which also words every refusal (the reference: see plainChainFlags). */
export async function yargsChainFlags(argv: readonly string[]): Promise<ChainFlags> {
  const a = (await parser(argv))
    .command('$0 <action>', 'chain tools', (y) => y.positional('action', { choices: CHAIN_SUBCOMMANDS, type: 'string' }))
    .option('t', { alias: 'type', type: 'string', demandOption: true, nargs: 1 })
    .option('s', { alias: 'storage', type: 'string', demandOption: true, nargs: 1 })
    .option('m', { alias: 'mount', type: 'string', default: '', nargs: 1 })
    .option('vm', { type: 'string', demandOption: true, nargs: 1 })
    .option('backup', { type: 'string', nargs: 1 })
    .option('force', { type: 'boolean', default: false })
    .option('yes', { type: 'boolean', default: false })
    .option('json', { type: 'boolean', default: false })
    .option('records', { type: 'string', nargs: 1 })
    .option('engine', { type: 'string', nargs: 1 })
    .parseSync();
  return {
    action: a.action as ChainFlags['action'],
    t: a.t,
    s: a.s,
    m: a.m,
    vm: a.vm,
    ...(a.backup !== undefined ? { backup: a.backup } : {}),
    force: a.force,
    yes: a.yes,
    json: a.json,
    ...(a.records !== undefined ? { records: a.records } : {}),
    ...(a.engine !== undefined ? { engine: a.engine } : {}),
  };
}

/**
 * The common case without loading yargs (~50 ms and ~10 MiB: `chain verify` is run often):
 * yargs-parser, which yargs runs underneath, with the options yargs gives it. Only an argv
 * that is plainly good is read here — one known action, the required flags, every flag
 * known, nothing after `--`, no parse error — and then exactly as yargs reads it (proved
 * on random argv in test/cli/validate-chain.test.ts); anything else (null) goes to
 * yargsChainFlags, so every refusal keeps yargs' own words.
 */
export function plainChainFlags(argv: readonly string[]): ChainFlags | null {
  const narg: Record<string, number> = {};
  for (const n of ['t', 's', 'm', 'vm', 'backup', 'records', 'engine']) narg[n] = 1;
  const key: Record<string, boolean> = {};
  for (const n of [...CHAIN_STRINGS, ...CHAIN_BOOLEANS]) key[n] = true;
  const options = {
    boolean: CHAIN_BOOLEANS,
    string: CHAIN_STRINGS,
    narg,
    key,
    alias: { t: ['type'], s: ['storage'], m: ['mount'] },
    default: { m: '', force: false, yes: false, json: false },
    configuration: {
      'parse-positional-numbers': false,
      'camel-case-expansion': false,
      'parse-numbers': false,
      'duplicate-arguments-array': false,
      'populate--': true,
    },
  };
  const parsed = yargsParser.detailed([...argv], options);
  if (parsed.error) return null;
  const a = parsed.argv as Record<string, unknown>;
  const rest = a['--'];
  if (rest !== undefined && (!Array.isArray(rest) || rest.length > 0)) return null;
  const pos = a._ as unknown[];
  const action = pos[0];
  if (pos.length !== 1 || typeof action !== 'string' || !(CHAIN_SUBCOMMANDS as readonly string[]).includes(action)) return null;
  for (const k of Object.keys(a)) if (k !== '_' && k !== '--' && !(k in key)) return null;
  const str = (k: string): string | undefined | null => (a[k] === undefined ? undefined : typeof a[k] === 'string' ? a[k] : null);
  const bool = (k: string): boolean | null => (typeof a[k] === 'boolean' ? a[k] : null);
  const [t, s, m, vm, backup, records, engine] = ['t', 's', 'm', 'vm', 'backup', 'records', 'engine'].map(str);
  const force = bool('force');
  const yes = bool('yes');
  const json = bool('json');
  if (typeof t !== 'string' || typeof s !== 'string' || typeof m !== 'string' || typeof vm !== 'string') return null;
  if (backup === null || records === null || engine === null || force === null || yes === null || json === null) return null;
  return {
    action: action as ChainFlags['action'],
    t,
    s,
    m,
    vm,
    ...(backup !== undefined ? { backup } : {}),
    force,
    yes,
    json,
    ...(records !== undefined ? { records } : {}),
    ...(engine !== undefined ? { engine } : {}),
  };
}

const RESTORE_VALUES = { t: 'type', s: 'storage', m: 'mount', backup: 'backup', disk: 'disk', to: 'to', format: 'format' } as const;

/**
 * `restore`'s flags with node:util's parser (no yargs to load: the command starts faster). Like
 * the other tools: a value flag takes the next argument whatever it looks like (`-m --json`
 * is a mount option), the last of a repeated flag wins, anything unknown is INVALID_OPTION.
 */
function restoreFlags(argv: readonly string[]) {
  const long = (f: string): string | undefined => {
    const name = f.startsWith('--') ? f.slice(2) : f.length === 2 && f.startsWith('-') ? f.slice(1) : undefined;
    if (name === undefined) return undefined;
    return (RESTORE_VALUES as Record<string, string>)[name] ?? (Object.values(RESTORE_VALUES).includes(name as never) ? name : undefined);
  };
  const args: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const l = long(argv[i]!);
    if (l === undefined) args.push(argv[i]!);
    else if (i + 1 >= argv.length)
      throw new NasbackupError('INVALID_OPTION', `Not enough arguments following: ${argv[i]!.replace(/^-+/, '')}`);
    else args.push(`--${l}=${argv[++i]!}`);
  }
  let values;
  try {
    ({ values } = parseArgs({
      args,
      strict: true,
      allowPositionals: false,
      options: {
        ...Object.fromEntries(Object.values(RESTORE_VALUES).map((n) => [n, { type: 'string' as const }])),
        force: { type: 'boolean' },
        'no-sync': { type: 'boolean' },
        json: { type: 'boolean' },
      },
    }));
  } catch (e) {
    throw new NasbackupError('INVALID_OPTION', (e as Error).message);
  }
  const v = values as Record<string, string | boolean | undefined>;
  const str = (k: string): string | undefined => (typeof v[k] === 'string' ? v[k] : undefined);
  const missing = ['type', 'storage', 'backup', 'disk', 'to'].filter((k) => str(k) === undefined);
  if (missing.length > 0)
    throw new NasbackupError('INVALID_OPTION', `Missing required argument${missing.length > 1 ? 's' : ''}: ${missing.join(', ')}`);
  return {
    t: str('type')!,
    s: str('storage')!,
    m: str('mount') ?? '',
    backup: str('backup')!,
    disk: str('disk')!,
    to: str('to')!,
    format: str('format'),
    force: v.force === true,
    sync: v['no-sync'] !== true,
  };
}

async function runRestore(
  argv: readonly string[],
  io: ToolIo,
  json: boolean,
  logger: Logger,
  fail: (command: string, e: unknown) => number,
): Promise<number> {
  let config: Readonly<Config>;
  let args: RestoreArgs;
  try {
    const a = restoreFlags(argv);
    config = loadConfig(io.env, {});
    args = validateRestoreArgs({
      nas: { type: a.t, address: a.s, options: a.m },
      backup: a.backup,
      disk: a.disk,
      to: a.to,
      ...(a.format !== undefined ? { format: a.format } : {}),
      force: a.force,
      sync: a.sync,
      cwd: process.cwd(),
    });
  } catch (e) {
    return fail('restore', e);
  }
  const { restore } = await import('../ops/restore.js');
  const { createProgress } = await import('../ops/backup/progress.js');
  // A bar on stderr when stderr is a terminal (an operator watching; stdout may be redirected to keep the result); never with --json.
  const progress = await createProgress(process.stderr.isTTY === true && !json, 'restore');
  const outcome = await execute(io, config, logger, (ctx) =>
    restore(ctx, args, { progress: (done, total) => progress.update(done, total) }).finally(() => progress.stop()),
  );
  return render(io.out, json ? 'json' : 'text', restoreRenderer, outcome);
}

/** `nasbackup mount … <dir>` and `nasbackup umount <dir>` (file-level access). */
async function runMountTool(
  tool: 'mount' | 'umount',
  argv: readonly string[],
  io: ToolIo,
  mode: OutputMode,
  fail: (command: string, e: unknown) => number,
): Promise<number> {
  const logger = createLogger(logFileFromEnv(io.env));
  const ops = await import('../ops/mount.js');
  if (tool === 'umount') {
    let args;
    let config: Readonly<Config>;
    try {
      const a = (await parser(argv)).command('$0 [dir]', 'umount').option('json', { type: 'boolean', default: false }).parseSync();
      args = validateUmountArgs({ ...(typeof a.dir === 'string' ? { dir: a.dir } : {}) });
      config = loadConfig(io.env, {});
    } catch (e) {
      return fail(tool, e);
    }
    return render(io.out, mode, umountRenderer, await execute(io, config, logger, (ctx) => ops.umountBackup(ctx, args)));
  }
  let args;
  let config: Readonly<Config>;
  try {
    const a = (await parser(argv))
      .command('$0 [dir]', 'mount')
      .option('t', { alias: 'type', type: 'string', demandOption: true, nargs: 1 })
      .option('s', { alias: 'storage', type: 'string', demandOption: true, nargs: 1 })
      .option('m', { alias: 'mount', type: 'string', default: '', nargs: 1 })
      .option('backup', { type: 'string', demandOption: true, nargs: 1 })
      .option('disk', { type: 'string', nargs: 1 })
      .option('json', { type: 'boolean', default: false })
      .parseSync();
    args = validateMountArgs({
      nas: { type: a.t, address: a.s, options: a.m },
      backup: a.backup,
      ...(a.disk !== undefined ? { disk: a.disk } : {}),
      ...(typeof a.dir === 'string' ? { dir: a.dir } : {}),
    });
    config = loadConfig(io.env, {});
  } catch (e) {
    return fail(tool, e);
  }
  return render(io.out, mode, mountRenderer, await execute(io, config, logger, (ctx) => ops.mountBackup(ctx, args)));
}
