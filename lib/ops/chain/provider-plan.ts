// The management server's chain-repair plan (rebase-era `computeChainRepair`), ported
// from the contract so its decisions can be checked without Java. Pure: no I/O.
// Its known weakness is kept on purpose (root disk only, paths from the CURRENT root
// volume uuid); lib/ops/chain/plan.ts is the improved, on-disk planner.
//
// `providerChainRepair` reads malformed metadata exactly as the provider does:
//   * `nas.chain_position` is read with Integer.parseInt ("+1" and "01" parse; " 1", "1 ",
//     "" and values beyond 2^31-1 do not); missing, null or unparseable counts as
//     Integer.MAX_VALUE (not 0: that is decideChain's rule, `chainPosition` below);
//   * of duplicate details rows the first (storage order) wins, a null value included;
//   * backups are taken in storage order (the records' order): of two backups at the
//     wanted position the first listed is the parent, or the child that is rebased;
//   * an empty `nas.chain_id` is a chain id like any other; only a missing (or null) one
//     makes a legacy backup that is deleted alone;
//   * position arithmetic is Java int arithmetic (it wraps).
//
// `computeChainRepair` (what `plan-delete` prints) is that plan, except where the plan
// would orphan a backup. There it refuses with code CHAIN_WOULD_ORPHAN (the provider
// would proceed), in exactly these cases, each checked only when the provider proceeds:
//   1. a middle delete where two or more backups of the chain sit at the position of the
//      immediate child: the provider rebases the first listed and leaves the others
//      backing onto the deleted file;
//   2. a middle delete while a backup of the chain has no readable position: the provider
//      counts it as MAX_VALUE, a descendant it never rebases, though it may be the child;
//   3. a plan that leaves a backup of the VM (other than the rebased child) whose
//      `nas.parent_backup_id` names a deleted backup: a descendant left without its backing
//      (cyclic parent ids, a second child beside the rebased one, a child in another chain id).
// Every other refusal is the provider's own, with its message (code CHAIN_REFUSED).

import { parseJavaInt } from '../../../compat/java.js';

export const CHAIN_ID = 'nas.chain_id';
export const CHAIN_POSITION = 'nas.chain_position';
export const PARENT_BACKUP_ID = 'nas.parent_backup_id';
export const BITMAP_NAME = 'nas.bitmap_name';
export const TYPE = 'nas.type';

/** Integer.MAX_VALUE: the provider's position for a backup whose position it cannot read. */
export const UNREADABLE_POSITION = 2147483647;

export interface BackupRecord {
  id: number | string;
  uuid: string;
  /** `<instance>/<timestamp>`: the backup folder, mount-relative. */
  externalId: string;
  vmId: number | string;
  status: string;
  date: string;
  /** The first backup_details row of each name (null: a row whose value is NULL). */
  details: Record<string, string | null>;
}

export interface RebaseStep {
  childBackupId: number | string;
  targetMountRelativePath: string;
  newBackingMountRelativePath: string;
  newParentUuid: string;
  newChainPosition: number;
}

export interface BackupRef {
  id: number | string;
  uuid: string;
  externalId: string;
}

export interface ChainRepairPlan {
  proceed: boolean;
  reason: string | null;
  /** Why it was refused: the provider's own refusal, or ours where its plan would orphan a backup. */
  code: 'CHAIN_REFUSED' | 'CHAIN_WOULD_ORPHAN' | null;
  rebaseSteps: RebaseStep[];
  toDelete: BackupRef[];
  shiftPositionsBelow: { chainId: string; afterPosition: number } | null;
}

/** decideChain's reading (lib/ops/chain/plan.ts cross-checks with it): a missing or unparseable position counts as 0. */
export function chainPosition(r: BackupRecord): number {
  const raw = r.details[CHAIN_POSITION];
  if (raw === undefined || raw === null || !/^\s*-?\d+\s*$/.test(raw)) return 0;
  return parseInt(raw, 10);
}

/** computeChainRepair's reading: Integer.parseInt, else MAX_VALUE; null when the position cannot be read. */
function readPosition(r: BackupRecord): number | null {
  const raw = r.details[CHAIN_POSITION];
  if (raw === undefined || raw === null) return null;
  try {
    return parseJavaInt(raw);
  } catch {
    return null;
  }
}

export const repairPosition = (r: BackupRecord): number => readPosition(r) ?? UNREADABLE_POSITION;

/** Java int subtraction. */
const minusOne = (x: number): number => (x - 1) | 0;

const ref = (r: BackupRecord): BackupRef => ({ id: r.id, uuid: r.uuid, externalId: r.externalId });
const refuse = (reason: string, code: 'CHAIN_REFUSED' | 'CHAIN_WOULD_ORPHAN' = 'CHAIN_REFUSED'): ChainRepairPlan => ({
  proceed: false,
  reason,
  code,
  rebaseSteps: [],
  toDelete: [],
  shiftPositionsBelow: null,
});
const deleteOnly = (r: BackupRecord): ChainRepairPlan => ({
  proceed: true,
  reason: null,
  code: null,
  rebaseSteps: [],
  toDelete: [ref(r)],
  shiftPositionsBelow: null,
});

export function rootFileOf(externalId: string, rootVolumeUuid: string): string {
  return `${externalId}/root.${rootVolumeUuid}.qcow2`;
}

interface Chain {
  target: BackupRecord;
  /** The other backups of the VM with the same chain id, in storage order. */
  members: BackupRecord[];
}

function findChain(records: BackupRecord[], target: BackupRecord): Chain | null {
  const chainId = target.details[CHAIN_ID];
  if (chainId === undefined || chainId === null) return null;
  const members = records.filter((r) => r !== target && String(r.vmId) === String(target.vmId) && r.details[CHAIN_ID] === chainId);
  return { target, members };
}

/**
 * The provider's plan for deleting `backupUuid` among `records` (the VM's backups, in
 * storage order), malformed metadata read exactly as the provider reads it:
 *   no chain id ⇒ delete it alone; full without descendants ⇒ delete it;
 *   full with descendants ⇒ refuse, or with `forced` delete them newest first, then it;
 *   tail ⇒ delete it; middle ⇒ rebase the immediate child onto the parent, delete it,
 *   shift the positions after it.
 */
export function providerChainRepair(records: BackupRecord[], backupUuid: string, rootVolumeUuid: string, forced: boolean): ChainRepairPlan {
  const target = records.find((r) => r.uuid === backupUuid);
  if (!target) return refuse(`Backup ${backupUuid} not found`);
  const chain = findChain(records, target);
  if (!chain) return deleteOnly(target);
  const chainId = target.details[CHAIN_ID]!;

  const pos = repairPosition(target);
  // Newest first; Array.prototype.sort is stable, so ties keep storage order as Java's List.sort does.
  const descendants = chain.members.filter((r) => repairPosition(r) > pos).sort((a, b) => repairPosition(b) - repairPosition(a));

  if (pos === 0) {
    if (descendants.length === 0) return deleteOnly(target);
    if (!forced) {
      return refuse(
        `Backup ${target.uuid} is the full anchor of a chain with ${descendants.length} incremental(s). ` +
          'Delete the incrementals first, or pass forced=true to remove the entire chain.',
      );
    }
    return {
      proceed: true,
      reason: null,
      code: null,
      rebaseSteps: [],
      toDelete: [...descendants.map(ref), ref(target)],
      shiftPositionsBelow: null,
    };
  }

  if (descendants.length === 0) return deleteOnly(target);
  const parentPos = minusOne(pos);
  const parent = chain.members.find((r) => repairPosition(r) === parentPos);
  if (!parent) return refuse(`Cannot delete ${target.uuid}: its parent (chain_position=${parentPos}) is missing from the chain`);
  // The immediate child: the nearest descendant (a gap skips positions), the first listed of a tie.
  const childPos = repairPosition(descendants.at(-1)!);
  const child = chain.members.find((r) => repairPosition(r) === childPos)!;
  return {
    proceed: true,
    reason: null,
    code: null,
    rebaseSteps: [
      {
        childBackupId: child.id,
        targetMountRelativePath: rootFileOf(child.externalId, rootVolumeUuid),
        newBackingMountRelativePath: rootFileOf(parent.externalId, rootVolumeUuid),
        newParentUuid: parent.uuid,
        newChainPosition: minusOne(childPos),
      },
    ],
    toDelete: [ref(target)],
    shiftPositionsBelow: { chainId, afterPosition: pos },
  };
}

/** Why the provider's (proceeding) plan would orphan a backup, or null. */
function orphaned(records: BackupRecord[], target: BackupRecord, plan: ChainRepairPlan): string | null {
  const step = plan.rebaseSteps[0];
  const chain = findChain(records, target);
  if (step && chain) {
    const childPos = readPosition(chain.members.find((r) => r.id === step.childBackupId)!);
    const unreadable = chain.members.filter((r) => readPosition(r) === null);
    if (unreadable.length > 0) {
      return (
        `Cannot delete ${target.uuid}: backup(s) ${unreadable.map((r) => r.uuid).join(', ')} of its chain have no readable ` +
        `chain_position, so whether they depend on ${target.uuid} is unknown, and the rebase would leave them backing onto ` +
        'the deleted backup. Fix nas.chain_position first'
      );
    }
    const twins = chain.members.filter((r) => readPosition(r) === childPos);
    if (twins.length > 1) {
      return (
        `Cannot delete ${target.uuid}: ${twins.length} backups (${twins.map((r) => r.uuid).join(', ')}) share ` +
        `chain_position=${childPos} after it; only the first would be rebased and the others left backing onto the deleted backup. ` +
        'Fix nas.chain_position first'
      );
    }
  }
  const gone = new Set(plan.toDelete.map((r) => r.uuid));
  const rebased = step?.childBackupId;
  for (const r of records) {
    if (gone.has(r.uuid) || r.id === rebased || String(r.vmId) !== String(target.vmId)) continue;
    const parent = r.details[PARENT_BACKUP_ID];
    if (parent !== undefined && parent !== null && gone.has(parent)) {
      return (
        `Cannot delete ${target.uuid}: backup ${r.uuid} names ${parent} as its parent (nas.parent_backup_id), ` +
        'and the plan would delete that parent without rebasing it. Fix the chain metadata first'
      );
    }
  }
  return null;
}

/**
 * `plan-delete`: the provider's plan (`providerChainRepair`), refused with
 * CHAIN_WOULD_ORPHAN where that plan would orphan a backup (the cases in the header).
 */
export function computeChainRepair(records: BackupRecord[], backupUuid: string, rootVolumeUuid: string, forced: boolean): ChainRepairPlan {
  const plan = providerChainRepair(records, backupUuid, rootVolumeUuid, forced);
  if (!plan.proceed) return plan;
  const target = records.find((r) => r.uuid === backupUuid)!;
  const why = orphaned(records, target, plan);
  return why ? refuse(why, 'CHAIN_WOULD_ORPHAN') : plan;
}

/**
 * Records from JSON (an array, or `{ "backups": [...] }`), checked field by field. The
 * array's order is the storage order. `details` is a map, or `[{name, value}]` rows as
 * the backup_details table has them, where (as for the provider) the first row of a
 * name wins and a null value stays null.
 */
export function parseRecords(json: unknown): BackupRecord[] {
  const list = Array.isArray(json) ? json : (json as { backups?: unknown })?.backups;
  if (!Array.isArray(list)) throw new Error('records must be a JSON array of backups (or {"backups": [...]})');
  const ids = new Set<string>();
  const uuids = new Set<string>();
  return list.map((r: Record<string, unknown>, i) => {
    if (!r || typeof r !== 'object' || Array.isArray(r)) throw new Error(`record ${i}: not an object`);
    const need = (k: string): string => {
      const v = r[k];
      if (typeof v !== 'string' && typeof v !== 'number') throw new Error(`record ${i}: missing ${k}`);
      return String(v);
    };
    // No prototype: a detail named "__proto__" is a name like any other.
    const details = Object.create(null) as Record<string, string | null>;
    // A detail's value is a string column; anything else is kept as its JSON text.
    const value = (v: unknown): string | null =>
      v === null || v === undefined
        ? null
        : typeof v === 'string'
          ? v
          : typeof v === 'number' || typeof v === 'boolean'
            ? String(v)
            : JSON.stringify(v);
    const d = r.details;
    if (Array.isArray(d)) {
      for (const e of d as Array<{ name?: unknown; value?: unknown }>) {
        if (typeof e?.name === 'string' && !Object.hasOwn(details, e.name)) details[e.name] = value(e.value);
      }
    } else if (d && typeof d === 'object') {
      for (const [k, v] of Object.entries(d)) details[k] = value(v);
    }
    const id = typeof r.id === 'number' ? r.id : need('id');
    const uuid = need('uuid');
    // The table's keys: a second row with the same id or uuid cannot exist.
    if (ids.has(String(id))) throw new Error(`record ${i}: duplicate id ${id}`);
    if (uuids.has(uuid)) throw new Error(`record ${i}: duplicate uuid ${uuid}`);
    ids.add(String(id));
    uuids.add(uuid);
    return {
      id,
      uuid,
      externalId: need('externalId'),
      vmId: typeof r.vmId === 'number' ? r.vmId : need('vmId'),
      status: typeof r.status === 'string' ? r.status : 'BackedUp',
      date: typeof r.date === 'string' ? r.date : '',
      details,
    };
  });
}
