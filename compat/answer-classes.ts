// The answers the agent sends back (docs/agent-contract.md §8.1), as classes with Gson's field
// order: the subclass's fields, then Answer's (result, details), then Command's.
// An Answer built by `new …Answer(command, success, details)` starts with an empty
// contextMap, wait 0 and bypassHostMaintenance false, whatever the command carried.
import { BACKUP_PACKAGE } from './commands.js';
import { CompatError } from './errors.js';
import { decodeFqcnArray, encodeFqcnArray, type FqcnElement } from './gson.js';
import type { JsonValue } from './json.js';
import { ANSWER_FIELDS, bindFields, COMMAND_FIELDS, unbindFields, type Bound, type ClassSchema } from './schema.js';

interface AnswerCommon {
  result: boolean;
  details?: string;
  contextMap?: Map<string, string | null>;
  wait: number;
  bypassHostMaintenance: boolean;
  externalDetails?: JsonValue;
}

export interface BackupAnswer extends AnswerCommon {
  cls: 'BackupAnswer';
  size?: bigint;
  virtualSize?: bigint;
  volumes?: Map<string, string | null>;
  needsCleanup?: boolean;
  bitmapCreated?: string;
  incrementalFallback?: boolean;
  /** Rebase era only. */
  bitmapRecreated?: string;
  /** Existed briefly upstream; decoded, never produced. */
  parentBitmapDeleted?: boolean;
}

export interface BackupStorageStatsAnswer extends AnswerCommon {
  cls: 'BackupStorageStatsAnswer';
  totalSize?: bigint;
  usedSize?: bigint;
}

/** com.cloud.agent.api.Answer: what the agent sends when a wrapper throws (§2.3). */
export interface PlainAnswer extends AnswerCommon {
  cls: 'Answer';
}

export type WireAnswer = BackupAnswer | BackupStorageStatsAnswer | PlainAnswer;
export type AnswerClass = WireAnswer['cls'];

export const ANSWER_SCHEMAS: Readonly<Record<AnswerClass, ClassSchema>> = {
  BackupAnswer: {
    fqcn: `${BACKUP_PACKAGE}.BackupAnswer`,
    simpleName: 'BackupAnswer',
    fields: [
      { name: 'size', kind: 'Long' },
      { name: 'virtualSize', kind: 'Long' },
      { name: 'volumes', kind: 'Map<String,String>' },
      { name: 'needsCleanup', kind: 'Boolean' },
      { name: 'bitmapCreated', kind: 'String' },
      { name: 'incrementalFallback', kind: 'Boolean' },
      { name: 'bitmapRecreated', kind: 'String' },
      { name: 'parentBitmapDeleted', kind: 'Boolean' },
      ...ANSWER_FIELDS,
      ...COMMAND_FIELDS,
    ],
  },
  BackupStorageStatsAnswer: {
    fqcn: `${BACKUP_PACKAGE}.BackupStorageStatsAnswer`,
    simpleName: 'BackupStorageStatsAnswer',
    fields: [{ name: 'totalSize', kind: 'Long' }, { name: 'usedSize', kind: 'Long' }, ...ANSWER_FIELDS, ...COMMAND_FIELDS],
  },
  Answer: {
    fqcn: 'com.cloud.agent.api.Answer',
    simpleName: 'Answer',
    fields: [...ANSWER_FIELDS, ...COMMAND_FIELDS],
  },
};

const fresh = (result: boolean, details: string | null | undefined): AnswerCommon => ({
  result,
  ...(details === null || details === undefined ? {} : { details }),
  contextMap: new Map(),
  wait: 0,
  bypassHostMaintenance: false,
});

/** new BackupAnswer(command, success, details). */
export const backupAnswer = (result: boolean, details?: string | null): BackupAnswer => ({
  cls: 'BackupAnswer',
  ...fresh(result, details),
});

/** new BackupStorageStatsAnswer(command, success, details): both sizes start at 0L. */
export const statsAnswer = (result: boolean, details?: string | null): BackupStorageStatsAnswer => ({
  cls: 'BackupStorageStatsAnswer',
  totalSize: 0n,
  usedSize: 0n,
  ...fresh(result, details),
});

/** new Answer(command, success, details). */
export const plainAnswer = (result: boolean, details?: string | null): PlainAnswer => ({ cls: 'Answer', ...fresh(result, details) });

export function encodeAnswer(a: WireAnswer): FqcnElement {
  const s = ANSWER_SCHEMAS[a.cls];
  return { fqcn: s.fqcn, body: unbindFields(s, a as unknown as Bound) };
}

export const encodeAnswers = (answers: readonly WireAnswer[]): string => encodeFqcnArray(answers.map(encodeAnswer));

const BY_FQCN = new Map(Object.values(ANSWER_SCHEMAS).map((s) => [s.fqcn, s]));

/** The reverse, for tests and tools that read what the agent sent. */
export function decodeAnswers(text: string): WireAnswer[] {
  return decodeFqcnArray(text).map((el) => {
    const s = BY_FQCN.get(el.fqcn);
    if (!s) throw new CompatError('UNKNOWN_CLASS', `Unknown answer class "${el.fqcn}"`);
    return { cls: s.simpleName, ...bindFields(s, el.body) } as WireAnswer;
  });
}
