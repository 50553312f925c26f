// The four backup commands the management server sends to the KVM agent
// (docs/agent-contract.md §8.1), decoded from and encoded to the wire. Every generation's
// fields are modelled in one class each; which of them a wrapper reads is the
// profile's business (argv.ts), not the parser's.
import { CompatError, isCompatError } from './errors.js';
import { decodeFqcnArray, encodeFqcnArray, type FqcnElement } from './gson.js';
import type { JsonObject, JsonValue } from './json.js';
import { bindFields, COMMAND_FIELDS, unbindFields, type Bound, type ClassSchema, type Field } from './schema.js';

export const BACKUP_PACKAGE = 'org.apache.cloudstack.backup';

/** Fields every Command carries on the wire (after the subclass's own). */
export interface CommandBase {
  contextMap?: Map<string, string | null>;
  wait: number;
  bypassHostMaintenance: boolean;
  externalDetails?: JsonValue;
}

export interface TakeBackupCommand extends CommandBase {
  cls: 'TakeBackupCommand';
  vmName: string;
  backupPath: string;
  backupRepoType: string;
  backupRepoAddress: string;
  /** PrimaryDataStoreTO per volume (stopped VMs), kept as sent. */
  volumePools?: Array<JsonObject | null>;
  volumePaths?: Array<string | null>;
  quiesce?: boolean;
  mountOptions?: string;
  mode?: string;
  bitmapNew?: string;
  bitmapParent?: string;
  /** Rebase era: the root disk's parent only. */
  parentPath?: string;
  /** Later: one parent per volume, deviceId order. */
  parentPaths?: Array<string | null>;
  /** Newest only (LUKS); carried, never used for argv. */
  volumePassphrases?: JsonValue;
  /** Newest only. */
  quiesceTimeout?: number;
}

export interface DeleteBackupCommand extends CommandBase {
  cls: 'DeleteBackupCommand';
  backupPath: string;
  backupRepoType: string;
  backupRepoAddress: string;
  mountOptions?: string;
}

export interface RebaseBackupCommand extends CommandBase {
  cls: 'RebaseBackupCommand';
  /** Mount-relative. */
  targetPath: string;
  /** Mount-relative. */
  newBackingPath: string;
  backupRepoType: string;
  backupRepoAddress: string;
  mountOptions?: string;
}

export interface GetBackupStorageStatsCommand extends CommandBase {
  cls: 'GetBackupStorageStatsCommand';
  backupRepoType: string;
  backupRepoAddress: string;
  mountOptions?: string;
}

export type BackupCommand = TakeBackupCommand | DeleteBackupCommand | RebaseBackupCommand | GetBackupStorageStatsCommand;
export type CommandClass = BackupCommand['cls'];

const req = (name: string): Field => ({ name, kind: 'String', required: true });
const str = (name: string): Field => ({ name, kind: 'String' });

const schema = (simpleName: CommandClass, own: Field[]): ClassSchema => ({
  fqcn: `${BACKUP_PACKAGE}.${simpleName}`,
  simpleName,
  fields: [...own, ...COMMAND_FIELDS],
});

export const COMMAND_SCHEMAS: Readonly<Record<CommandClass, ClassSchema>> = {
  TakeBackupCommand: schema('TakeBackupCommand', [
    req('vmName'),
    req('backupPath'),
    req('backupRepoType'),
    req('backupRepoAddress'),
    { name: 'volumePools', kind: 'List<Object>' },
    { name: 'volumePaths', kind: 'List<String>' },
    { name: 'quiesce', kind: 'Boolean' },
    str('mountOptions'),
    str('mode'),
    str('bitmapNew'),
    str('bitmapParent'),
    str('parentPath'),
    { name: 'parentPaths', kind: 'List<String>' },
    { name: 'volumePassphrases', kind: 'Object' },
    { name: 'quiesceTimeout', kind: 'Integer' },
  ]),
  DeleteBackupCommand: schema('DeleteBackupCommand', [
    req('backupPath'),
    req('backupRepoType'),
    req('backupRepoAddress'),
    str('mountOptions'),
  ]),
  RebaseBackupCommand: schema('RebaseBackupCommand', [
    req('targetPath'),
    req('newBackingPath'),
    req('backupRepoType'),
    req('backupRepoAddress'),
    str('mountOptions'),
  ]),
  GetBackupStorageStatsCommand: schema('GetBackupStorageStatsCommand', [
    req('backupRepoType'),
    req('backupRepoAddress'),
    str('mountOptions'),
  ]),
};

const BY_FQCN = new Map(Object.values(COMMAND_SCHEMAS).map((s) => [s.fqcn, s]));

/** The command class a FQCN names, or undefined. */
export function commandClassOf(fqcn: string): CommandClass | undefined {
  return BY_FQCN.get(fqcn)?.simpleName as CommandClass | undefined;
}

/** Decode one {"<FQCN>": {…}} element. Throws CompatError (UNKNOWN_CLASS, MISSING_FIELD, INVALID_FIELD). */
export function decodeCommand(el: FqcnElement): BackupCommand {
  const s = BY_FQCN.get(el.fqcn);
  if (!s) {
    const known = Object.values(COMMAND_SCHEMAS)
      .map((x) => x.fqcn)
      .join(', ');
    throw new CompatError('UNKNOWN_CLASS', `Unknown command class "${el.fqcn}" (this agent handles ${known})`);
  }
  return { cls: s.simpleName, ...bindFields(s, el.body) } as BackupCommand;
}

export function encodeCommand(cmd: BackupCommand): FqcnElement {
  const s = COMMAND_SCHEMAS[cmd.cls];
  return { fqcn: s.fqcn, body: unbindFields(s, cmd as unknown as Bound) };
}

export const encodeCommands = (cmds: readonly BackupCommand[]): string => encodeFqcnArray(cmds.map(encodeCommand));

/** One element of a decoded request: the command, or why it cannot be one. */
export type DecodedElement =
  { ok: true; fqcn: string; command: BackupCommand } | { ok: false; fqcn: string; commandClass?: CommandClass; error: CompatError };

/**
 * Decode a whole request. Structural errors throw (nothing can be answered per
 * element); class and field errors are reported per element so each can get an
 * answer of its own class.
 */
export function decodeRequest(text: string): DecodedElement[] {
  return decodeFqcnArray(text).map((el): DecodedElement => {
    try {
      return { ok: true, fqcn: el.fqcn, command: decodeCommand(el) };
    } catch (e) {
      if (!isCompatError(e)) throw e;
      const commandClass = commandClassOf(el.fqcn);
      return { ok: false, fqcn: el.fqcn, ...(commandClass ? { commandClass } : {}), error: e };
    }
  });
}

/** Decode a request that must be entirely valid (tests, tools). */
export function decodeCommands(text: string): BackupCommand[] {
  return decodeRequest(text).map((d) => {
    if (!d.ok) throw d.error;
    return d.command;
  });
}
