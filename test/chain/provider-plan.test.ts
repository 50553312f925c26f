import { describe, expect, it } from 'vitest';
import { computeChainRepair, parseRecords, type BackupRecord } from '../../lib/ops/chain/provider-plan.js';

const ROOT = 'r00t-uuid';
let nextId = 1;
function rec(pos: number | string | null, opts: { chain?: string | null; vm?: number; ts?: string } = {}): BackupRecord {
  const id = nextId++;
  const details: Record<string, string> = {};
  if (opts.chain !== null) details['nas.chain_id'] = opts.chain ?? 'chain-A';
  if (pos !== null) details['nas.chain_position'] = String(pos);
  return {
    id,
    uuid: `b-${id}`,
    externalId: `i-2-10-VM/${opts.ts ?? `2025.01.0${id}.00.00.00`}`,
    vmId: opts.vm ?? 10,
    status: 'BackedUp',
    date: '',
    details,
  };
}

describe('computeChainRepair (the provider’s plan)', () => {
  it('no chain metadata: delete it alone', () => {
    const a = rec(null, { chain: null });
    expect(computeChainRepair([a], a.uuid, ROOT, false)).toEqual({
      proceed: true,
      reason: null,
      code: null,
      rebaseSteps: [],
      toDelete: [{ id: a.id, uuid: a.uuid, externalId: a.externalId }],
      shiftPositionsBelow: null,
    });
  });

  it('full without descendants: delete it', () => {
    const f = rec(0);
    const other = rec(1, { chain: 'chain-B' });
    const plan = computeChainRepair([f, other], f.uuid, ROOT, false);
    expect(plan.proceed).toBe(true);
    expect(plan.toDelete.map((r) => r.uuid)).toEqual([f.uuid]);
  });

  it('full with descendants, not forced: refused with the provider’s message', () => {
    const f = rec(0);
    const i1 = rec(1);
    const i2 = rec(2);
    const plan = computeChainRepair([f, i1, i2], f.uuid, ROOT, false);
    expect(plan).toEqual({
      proceed: false,
      reason: `Backup ${f.uuid} is the full anchor of a chain with 2 incremental(s). Delete the incrementals first, or pass forced=true to remove the entire chain.`,
      code: 'CHAIN_REFUSED',
      rebaseSteps: [],
      toDelete: [],
      shiftPositionsBelow: null,
    });
  });

  it('full with descendants, forced: descendants newest first, then the full, no rebase', () => {
    const f = rec(0);
    const i1 = rec(1);
    const i2 = rec(2);
    const elsewhere = rec(3, { vm: 99 });
    const plan = computeChainRepair([i1, f, i2, elsewhere], f.uuid, ROOT, true);
    expect(plan.proceed).toBe(true);
    expect(plan.rebaseSteps).toEqual([]);
    expect(plan.toDelete.map((r) => r.uuid)).toEqual([i2.uuid, i1.uuid, f.uuid]);
  });

  it('tail incremental: delete it', () => {
    const f = rec(0);
    const i1 = rec(1);
    const plan = computeChainRepair([f, i1], i1.uuid, ROOT, false);
    expect(plan).toMatchObject({ proceed: true, rebaseSteps: [], shiftPositionsBelow: null });
    expect(plan.toDelete.map((r) => r.uuid)).toEqual([i1.uuid]);
  });

  it('middle incremental: rebase the child onto the parent (root disk only), delete, shift positions', () => {
    const f = rec(0);
    const i1 = rec(1);
    const i2 = rec(2);
    const i3 = rec(3);
    const plan = computeChainRepair([f, i1, i2, i3], i1.uuid, ROOT, false);
    expect(plan).toEqual({
      proceed: true,
      reason: null,
      code: null,
      rebaseSteps: [
        {
          childBackupId: i2.id,
          targetMountRelativePath: `${i2.externalId}/root.${ROOT}.qcow2`,
          newBackingMountRelativePath: `${f.externalId}/root.${ROOT}.qcow2`,
          newParentUuid: f.uuid,
          newChainPosition: 1,
        },
      ],
      toDelete: [{ id: i1.id, uuid: i1.uuid, externalId: i1.externalId }],
      shiftPositionsBelow: { chainId: 'chain-A', afterPosition: 1 },
    });
  });

  it('middle incremental whose parent is missing: refused', () => {
    const f = rec(0);
    const i2 = rec(2);
    const i3 = rec(3);
    expect(computeChainRepair([f, i2, i3], i2.uuid, ROOT, false)).toEqual({
      proceed: false,
      reason: `Cannot delete ${i2.uuid}: its parent (chain_position=1) is missing from the chain`,
      code: 'CHAIN_REFUSED',
      rebaseSteps: [],
      toDelete: [],
      shiftPositionsBelow: null,
    });
  });

  it('unparseable or missing positions count as MAX_VALUE (a descendant of everything), not 0', () => {
    const f = rec(0);
    const odd = rec('two');
    expect(computeChainRepair([f, odd], f.uuid, ROOT, false)).toMatchObject({
      proceed: false,
      reason: expect.stringContaining('1 incremental(s)'),
    });
    expect(computeChainRepair([f, odd], odd.uuid, ROOT, false)).toMatchObject({ proceed: true, toDelete: [{ uuid: odd.uuid }] });
    const none = rec(null);
    expect(computeChainRepair([none], none.uuid, ROOT, false).proceed).toBe(true);
  });

  it('unknown backup: refused', () => {
    expect(computeChainRepair([], 'nope', ROOT, false)).toMatchObject({ proceed: false, reason: 'Backup nope not found' });
  });

  it('parses records with details as a map or as [{name, value}]', () => {
    const r = parseRecords([
      { id: 1, uuid: 'u1', externalId: 'vm/t1', vmId: 3, details: { 'nas.chain_id': 'c', 'nas.chain_position': 0 } },
      {
        id: 2,
        uuid: 'u2',
        externalId: 'vm/t2',
        vmId: 3,
        details: [
          { name: 'nas.chain_id', value: 'c' },
          { name: 'nas.chain_position', value: '1' },
        ],
      },
    ]);
    expect(r[1]!.details).toEqual({ 'nas.chain_id': 'c', 'nas.chain_position': '1' });
    expect(() => parseRecords([{ id: 1 }])).toThrow(/missing uuid/);
    expect(() => parseRecords([null])).toThrow(/record 0: not an object/);
    expect(() =>
      parseRecords([
        { id: 1, uuid: 'a', externalId: 'v/1', vmId: 1 },
        { id: 1, uuid: 'b', externalId: 'v/2', vmId: 1 },
      ]),
    ).toThrow(/record 1: duplicate id 1/);
    expect(() =>
      parseRecords([
        { id: 1, uuid: 'a', externalId: 'v/1', vmId: 1 },
        { id: 2, uuid: 'a', externalId: 'v/2', vmId: 1 },
      ]),
    ).toThrow(/record 1: duplicate uuid a/);
    // Rows: the first of a name wins, a null value stays null; "__proto__" is a plain name.
    const rows = parseRecords([
      {
        id: 1,
        uuid: 'a',
        externalId: 'v/1',
        vmId: 1,
        details: [
          { name: 'nas.chain_position', value: null },
          { name: 'nas.chain_position', value: '3' },
          { name: '__proto__', value: 'x' },
        ],
      },
    ])[0]!.details;
    expect(rows['nas.chain_position']).toBeNull();
    expect(Object.hasOwn(rows, '__proto__')).toBe(true);
    expect(
      parseRecords([{ id: 1, uuid: 'a', externalId: 'v/1', vmId: 1, details: { 'nas.chain_id': null } }])[0]!.details['nas.chain_id'],
    ).toBeNull();
    expect(() => parseRecords({})).toThrow(/array/);
  });
});
