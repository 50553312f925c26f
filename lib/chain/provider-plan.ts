// The management server's chain-repair plan (rebase-era `computeChainRepair`), ported
// from the contract so its decisions can be checked without Java. Pure: no I/O.
// Its known weakness is kept on purpose (root disk only, paths from the CURRENT root
// volume uuid); lib/chain/plan.ts is the improved, on-disk planner.

export const CHAIN_ID = 'nas.chain_id';
export const CHAIN_POSITION = 'nas.chain_position';
export const PARENT_BACKUP_ID = 'nas.parent_backup_id';
export const BITMAP_NAME = 'nas.bitmap_name';
export const TYPE = 'nas.type';

export interface BackupRecord {
  id: number | string;
  uuid: string;
  /** `<instance>/<timestamp>`: the backup folder, mount-relative. */
  externalId: string;
  vmId: number | string;
  status: string;
  date: string;
  details: Record<string, string>;
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
  rebaseSteps: RebaseStep[];
  toDelete: BackupRef[];
  shiftPositionsBelow: { chainId: string; afterPosition: number } | null;
}

/** Like the provider: a missing or unparseable position counts as 0. */
export function chainPosition(r: BackupRecord): number {
  const raw = r.details[CHAIN_POSITION];
  if (raw === undefined || !/^\s*-?\d+\s*$/.test(raw)) return 0;
  return parseInt(raw, 10);
}

const ref = (r: BackupRecord): BackupRef => ({ id: r.id, uuid: r.uuid, externalId: r.externalId });
const refuse = (reason: string): ChainRepairPlan => ({ proceed: false, reason, rebaseSteps: [], toDelete: [], shiftPositionsBelow: null });
const deleteOnly = (r: BackupRecord): ChainRepairPlan => ({ proceed: true, reason: null, rebaseSteps: [], toDelete: [ref(r)], shiftPositionsBelow: null });

export function rootFileOf(externalId: string, rootVolumeUuid: string): string {
  return `${externalId}/root.${rootVolumeUuid}.qcow2`;
}

/**
 * Plan the deletion of `backupUuid` among `records` (the VM's backups).
 *   no chain id ⇒ delete it alone; full without descendants ⇒ delete it;
 *   full with descendants ⇒ refuse, or with `forced` delete them newest first, then it;
 *   tail ⇒ delete it; middle ⇒ rebase the immediate child onto the parent, delete it,
 *   shift the positions after it.
 */
export function computeChainRepair(records: BackupRecord[], backupUuid: string, rootVolumeUuid: string, forced: boolean): ChainRepairPlan {
  const target = records.find((r) => r.uuid === backupUuid);
  if (!target) return refuse(`Backup ${backupUuid} not found`);
  const chainId = target.details[CHAIN_ID];
  if (!chainId) return deleteOnly(target);

  const pos = chainPosition(target);
  const members = records.filter((r) => r !== target && String(r.vmId) === String(target.vmId) && r.details[CHAIN_ID] === chainId);
  const descendants = members.filter((r) => chainPosition(r) > pos).sort((a, b) => chainPosition(b) - chainPosition(a));

  if (pos === 0) {
    if (descendants.length === 0) return deleteOnly(target);
    if (!forced) {
      return refuse(
        `Backup ${target.uuid} is the full anchor of a chain with ${descendants.length} incremental(s). ` +
          'Delete the incrementals first, or pass forced=true to remove the entire chain.',
      );
    }
    return { proceed: true, reason: null, rebaseSteps: [], toDelete: [...descendants.map(ref), ref(target)], shiftPositionsBelow: null };
  }

  if (descendants.length === 0) return deleteOnly(target);
  const parent = members.find((r) => chainPosition(r) === pos - 1);
  if (!parent) return refuse(`Cannot delete ${target.uuid}: its parent (chain_position=${pos - 1}) is missing from the chain`);
  // The immediate child; with a gap in the positions, the nearest descendant.
  const child = descendants.at(-1)!;
  const childPos = chainPosition(child);
  return {
    proceed: true,
    reason: null,
    rebaseSteps: [
      {
        childBackupId: child.id,
        targetMountRelativePath: rootFileOf(child.externalId, rootVolumeUuid),
        newBackingMountRelativePath: rootFileOf(parent.externalId, rootVolumeUuid),
        newParentUuid: parent.uuid,
        newChainPosition: childPos - 1,
      },
    ],
    toDelete: [ref(target)],
    shiftPositionsBelow: { chainId, afterPosition: pos },
  };
}

/** Records from JSON (an array, or `{ "backups": [...] }`), checked field by field. */
export function parseRecords(json: unknown): BackupRecord[] {
  const list = Array.isArray(json) ? json : (json as { backups?: unknown })?.backups;
  if (!Array.isArray(list)) throw new Error('records must be a JSON array of backups (or {"backups": [...]})');
  return list.map((r: Record<string, unknown>, i) => {
    const need = (k: string): string => {
      const v = r?.[k];
      if (typeof v !== 'string' && typeof v !== 'number') throw new Error(`record ${i}: missing ${k}`);
      return String(v);
    };
    const details: Record<string, string> = {};
    const d = r.details;
    if (Array.isArray(d)) {
      // [{name, value}] as the backup_details table has it
      for (const e of d as Array<{ name?: unknown; value?: unknown }>) if (typeof e?.name === 'string') details[e.name] = String(e.value ?? '');
    } else if (d && typeof d === 'object') {
      for (const [k, v] of Object.entries(d)) details[k] = String(v);
    }
    return {
      id: typeof r.id === 'number' ? r.id : need('id'),
      uuid: need('uuid'),
      externalId: need('externalId'),
      vmId: typeof r.vmId === 'number' ? r.vmId : need('vmId'),
      status: typeof r.status === 'string' ? r.status : 'BackedUp',
      date: typeof r.date === 'string' ? r.date : '',
      details,
    };
  });
}
