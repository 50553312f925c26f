// `plan-delete` against a reference model of the provider's rebase-era computeChainRepair,
// written here from the contract's description (§9.4) in the provider's own style: detail
// rows read first-match, Integer.parseInt, a loop over the VM's backups in storage order.
// Generated record sets (one or several chains, legacy backups, another VM's backups) go
// through the records-file parser first, as `plan-delete --records` reads them.
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { parseJavaInt } from '../../compat/java.js';
import { computeChainRepair, parseRecords, providerChainRepair, type ChainRepairPlan } from '../../lib/ops/chain/provider-plan.js';

const ROOT = 'RV';
const MAX = 2147483647;
const CHAIN = 'nas.chain_id';
const POS = 'nas.chain_position';
const PARENT = 'nas.parent_backup_id';

interface Row {
  name: string;
  value: string | null;
}
interface DbBackup {
  id: number;
  uuid: string;
  externalId: string;
  vmId: number;
  status: string;
  date: string;
  details: Row[];
}

// ---------------------------------------------------------------- the reference model

/** findDetail(backupId, name): the first row in storage order, its value possibly null. */
function detail(b: DbBackup, name: string): string | null {
  for (const row of b.details) if (row.name === name) return row.value;
  return null;
}

function position(b: DbBackup): number {
  const v = detail(b, POS);
  if (v === null) return MAX;
  try {
    return parseJavaInt(v);
  } catch {
    return MAX;
  }
}

const readable = (b: DbBackup): boolean => {
  const v = detail(b, POS);
  if (v === null) return false;
  try {
    parseJavaInt(v);
    return true;
  } catch {
    return false;
  }
};

type ModelPlan = Omit<ChainRepairPlan, 'code'>;

function model(all: DbBackup[], backup: DbBackup, forced: boolean): ModelPlan {
  const refuse = (reason: string): ModelPlan => ({ proceed: false, reason, rebaseSteps: [], toDelete: [], shiftPositionsBelow: null });
  const ref = (b: DbBackup) => ({ id: b.id, uuid: b.uuid, externalId: b.externalId });
  const only = (): ModelPlan => ({ proceed: true, reason: null, rebaseSteps: [], toDelete: [ref(backup)], shiftPositionsBelow: null });
  const chainId = detail(backup, CHAIN);
  if (chainId === null) return only();
  const pos = position(backup);
  const chain: DbBackup[] = [];
  for (const b of all) if (b.vmId === backup.vmId && b.id !== backup.id && chainId === detail(b, CHAIN)) chain.push(b);
  const descendants: DbBackup[] = [];
  for (const b of chain) if (position(b) > pos) descendants.push(b);
  if (pos === 0) {
    if (descendants.length === 0) return only();
    if (!forced) {
      return refuse(
        `Backup ${backup.uuid} is the full anchor of a chain with ${descendants.length} incremental(s). Delete the incrementals first, or pass forced=true to remove the entire chain.`,
      );
    }
    // A stable descending sort, spelled out: position, then storage order.
    const order = descendants.map((b, i) => ({ b, i }));
    order.sort((x, y) => (position(y.b) > position(x.b) ? 1 : position(y.b) < position(x.b) ? -1 : x.i - y.i));
    return {
      proceed: true,
      reason: null,
      rebaseSteps: [],
      toDelete: [...order.map((o) => ref(o.b)), ref(backup)],
      shiftPositionsBelow: null,
    };
  }
  if (descendants.length === 0) return only();
  const want = (pos - 1) | 0;
  let parent: DbBackup | null = null;
  for (const b of chain)
    if (position(b) === want) {
      parent = b;
      break;
    }
  if (parent === null) return refuse(`Cannot delete ${backup.uuid}: its parent (chain_position=${want}) is missing from the chain`);
  let child: DbBackup | null = null;
  for (const b of descendants) if (child === null || position(b) < position(child)) child = b;
  return {
    proceed: true,
    reason: null,
    rebaseSteps: [
      {
        childBackupId: child!.id,
        targetMountRelativePath: `${child!.externalId}/root.${ROOT}.qcow2`,
        newBackingMountRelativePath: `${parent.externalId}/root.${ROOT}.qcow2`,
        newParentUuid: parent.uuid,
        newChainPosition: (position(child!) - 1) | 0,
      },
    ],
    toDelete: [ref(backup)],
    shiftPositionsBelow: { chainId, afterPosition: pos },
  };
}

type Orphan = 'twins' | 'unreadable' | 'parent';

/** The documented cases where the model's (proceeding) plan orphans a backup. */
function orphanOf(all: DbBackup[], backup: DbBackup, plan: ModelPlan): Orphan | null {
  const step = plan.rebaseSteps[0];
  const chainId = detail(backup, CHAIN);
  if (step && chainId !== null) {
    const chain = all.filter((b) => b.vmId === backup.vmId && b.id !== backup.id && detail(b, CHAIN) === chainId);
    if (chain.some((b) => !readable(b))) return 'unreadable';
    const child = chain.find((b) => b.id === step.childBackupId)!;
    if (chain.filter((b) => position(b) === position(child)).length > 1) return 'twins';
  }
  const deleted = plan.toDelete.map((r) => r.uuid);
  for (const b of all) {
    if (b.vmId !== backup.vmId || deleted.includes(b.uuid) || b.id === step?.childBackupId) continue;
    const p = detail(b, PARENT);
    if (p !== null && deleted.includes(p)) return 'parent';
  }
  return null;
}

const ORPHAN_TEXT: Record<Orphan, RegExp> = {
  twins: /share chain_position=-?\d+ after it; only the first would be rebased/,
  unreadable: /have no readable chain_position/,
  parent: /as its parent \(nas\.parent_backup_id\), and the plan would delete that parent/,
};

// ---------------------------------------------------------------- generated record sets

const VM = 10;
const OTHER_VM = 11;

/** A well-formed set: chains 0..n-1 with parent ids, legacy backups, another VM's chain. */
function wellFormed(chains: number[], legacy: number, other: number): DbBackup[] {
  const out: DbBackup[] = [];
  let id = 0;
  const add = (vmId: number, details: Row[]): DbBackup => {
    id++;
    const b = {
      id,
      uuid: `b-${id}`,
      externalId: `i-2-${vmId}-VM/2025.01.01.00.00.${String(id).padStart(2, '0')}`,
      vmId,
      status: 'BackedUp',
      date: `t${id}`,
      details,
    };
    out.push(b);
    return b;
  };
  for (let i = 0; i < legacy; i++) add(VM, []);
  const chain = (vmId: number, chainId: string, length: number): void => {
    let prev: DbBackup | null = null;
    for (let p = 0; p < length; p++) {
      const rows: Row[] = [
        { name: 'nas.bitmap_name', value: `backup-${id + 1}` },
        { name: CHAIN, value: chainId },
        { name: POS, value: String(p) },
        { name: 'nas.type', value: p === 0 ? 'full' : 'incremental' },
      ];
      if (prev) rows.push({ name: PARENT, value: prev.uuid });
      prev = add(vmId, rows);
    }
  };
  chains.forEach((n, k) => chain(VM, `chain-${k + 1}`, n));
  if (other > 0) chain(OTHER_VM, 'chain-other', other);
  return out;
}

const POSITION_TOKENS = [
  null,
  '',
  '0',
  '1',
  '2',
  '3',
  '4',
  '-1',
  '+1',
  '+2',
  ' 1',
  '1 ',
  '01',
  '007',
  'abc',
  '1.0',
  '0x1',
  '+',
  '-',
  '2147483647',
  '2147483648',
  '-2147483648',
  '-2147483649',
  '99999999999',
  '\u0661',
  '\u0662',
];
const CHAIN_TOKENS = [null, '', 'chain-1', 'chain-2', 'chain-3', 'chain-1 ', 'CHAIN-1'];

type Mutation =
  | { kind: 'drop'; i: number }
  | { kind: 'pos'; i: number; value: string | null | undefined }
  | { kind: 'dupPos'; i: number; value: string | null; first: boolean }
  | { kind: 'chain'; i: number; value: string | null | undefined }
  | { kind: 'dupChain'; i: number; value: string | null; first: boolean }
  | { kind: 'parent'; i: number; j: number; how: 'uuid' | 'dangling' | 'empty' | 'null' | 'none' }
  | { kind: 'clone'; i: number }
  | { kind: 'samePos'; i: number; j: number }
  | { kind: 'vm'; i: number }
  | { kind: 'renameChain'; i: number; value: string | null };

const idx = fc.nat({ max: 40 });
const token = fc.oneof(fc.constantFrom(...POSITION_TOKENS), fc.integer({ min: -2, max: 8 }).map(String));
const mutation: fc.Arbitrary<Mutation> = fc.oneof(
  fc.record({ kind: fc.constant('drop' as const), i: idx }),
  fc.record({ kind: fc.constant('pos' as const), i: idx, value: fc.oneof(token, fc.constant(undefined)) }),
  fc.record({ kind: fc.constant('dupPos' as const), i: idx, value: token, first: fc.boolean() }),
  fc.record({ kind: fc.constant('chain' as const), i: idx, value: fc.oneof(fc.constantFrom(...CHAIN_TOKENS), fc.constant(undefined)) }),
  fc.record({ kind: fc.constant('dupChain' as const), i: idx, value: fc.constantFrom(...CHAIN_TOKENS), first: fc.boolean() }),
  fc.record({
    kind: fc.constant('parent' as const),
    i: idx,
    j: idx,
    how: fc.constantFrom('uuid' as const, 'uuid' as const, 'dangling' as const, 'empty' as const, 'null' as const, 'none' as const),
  }),
  fc.record({ kind: fc.constant('clone' as const), i: idx }),
  fc.record({ kind: fc.constant('samePos' as const), i: idx, j: idx }),
  fc.record({ kind: fc.constant('vm' as const), i: idx }),
  fc.record({ kind: fc.constant('renameChain' as const), i: idx, value: fc.constantFrom('', null, 'chain-1', 'chain-2') }),
);

function setRow(b: DbBackup, name: string, value: string | null | undefined): void {
  const at = b.details.findIndex((r) => r.name === name);
  if (value === undefined) {
    if (at >= 0) b.details.splice(at, 1);
  } else if (at >= 0) b.details[at] = { name, value };
  else b.details.push({ name, value });
}

function mutate(set: DbBackup[], m: Mutation): void {
  if (set.length === 0) return;
  const b = set[m.i % set.length]!;
  switch (m.kind) {
    case 'drop':
      if (set.length > 1) set.splice(m.i % set.length, 1);
      return;
    case 'pos':
      return setRow(b, POS, m.value);
    case 'chain':
      return setRow(b, CHAIN, m.value);
    case 'dupPos':
    case 'dupChain': {
      const row = { name: m.kind === 'dupPos' ? POS : CHAIN, value: m.value };
      if (m.first) b.details.unshift(row);
      else b.details.push(row);
      return;
    }
    case 'parent': {
      const other = set[m.j % set.length]!;
      const value = { uuid: other.uuid, dangling: 'b-999', empty: '', null: null, none: undefined }[m.how];
      return setRow(b, PARENT, value);
    }
    case 'clone': {
      const id = Math.max(...set.map((x) => x.id)) + 1;
      set.splice((m.i % set.length) + 1, 0, {
        ...b,
        id,
        uuid: `b-${id}`,
        externalId: `${b.externalId}-copy`,
        details: b.details.map((r) => ({ ...r })),
      });
      return;
    }
    case 'samePos':
      return setRow(b, POS, detail(set[m.j % set.length]!, POS));
    case 'vm':
      b.vmId = b.vmId === VM ? OTHER_VM : VM;
      return;
    case 'renameChain': {
      // A whole chain: every row of that chain id (an empty one included) gets the new value.
      const old = detail(b, CHAIN);
      if (old === null) return;
      for (const x of set) for (const r of x.details) if (r.name === CHAIN && r.value === old) r.value = m.value;
      return;
    }
  }
}

interface Case {
  db: DbBackup[];
  target: DbBackup;
  forced: boolean;
  malformed: boolean;
}

const caseOf = (malformed: boolean): fc.Arbitrary<Case> =>
  fc
    .record({
      chains: fc.array(fc.integer({ min: 1, max: 6 }), { minLength: 1, maxLength: 3 }),
      legacy: fc.nat({ max: 2 }),
      other: fc.nat({ max: 3 }),
      mutations: malformed ? fc.array(mutation, { minLength: 1, maxLength: 4 }) : fc.constant([] as Mutation[]),
      order: fc.array(fc.nat(), { maxLength: 40 }),
      target: fc.nat(),
      forced: fc.boolean(),
    })
    .map((g) => {
      const db = wellFormed(g.chains, g.legacy, g.other);
      for (const m of g.mutations) mutate(db, m);
      // Storage order is not insertion order: a few swaps.
      g.order.forEach((k, n) => {
        const a = n % db.length;
        const c = k % db.length;
        [db[a], db[c]] = [db[c]!, db[a]!];
      });
      return { db, target: db[g.target % db.length]!, forced: g.forced, malformed: g.mutations.length > 0 };
    });

/** The records file as `plan-delete --records` reads it (details as rows). */
const recordsOf = (db: DbBackup[]) => parseRecords(JSON.parse(JSON.stringify(db)));
const withoutCode = ({ code: _code, ...rest }: ChainRepairPlan): ModelPlan => rest;

const SEED = 14_05;
const RUNS = 600;

describe('plan-delete parity with the provider’s computeChainRepair (property)', () => {
  it('providerChainRepair is the model exactly, on well-formed and malformed sets alike', () => {
    fc.assert(
      fc.property(fc.oneof(caseOf(false), caseOf(true)), ({ db, target, forced }) => {
        const records = recordsOf(db);
        expect(withoutCode(providerChainRepair(records, target.uuid, ROOT, forced))).toEqual(model(db, target, forced));
      }),
      { seed: SEED, numRuns: RUNS },
    );
  });

  it('well-formed sets: plan-delete’s plan equals the model’s, refusals included', () => {
    let proceeded = 0;
    let rebased = 0;
    fc.assert(
      fc.property(caseOf(false), ({ db, target, forced }) => {
        const plan = computeChainRepair(recordsOf(db), target.uuid, ROOT, forced);
        const want = model(db, target, forced);
        expect(withoutCode(plan)).toEqual(want);
        expect(plan.code).toBe(want.proceed ? null : 'CHAIN_REFUSED');
        if (plan.proceed) proceeded++;
        if (plan.rebaseSteps.length > 0) rebased++;
      }),
      { seed: SEED, numRuns: RUNS },
    );
    // The generator reaches every branch, not only the refusals.
    expect(proceeded).toBeGreaterThan(RUNS / 4);
    expect(rebased).toBeGreaterThan(RUNS / 20);
  });

  it('malformed sets: equal to the model, or refused with CHAIN_WOULD_ORPHAN exactly in the documented cases; never proceeds where the model refuses', () => {
    const seen = { agree: 0, modelRefused: 0, twins: 0, unreadable: 0, parent: 0 };
    fc.assert(
      fc.property(caseOf(true), ({ db, target, forced }) => {
        const plan = computeChainRepair(recordsOf(db), target.uuid, ROOT, forced);
        const want = model(db, target, forced);
        if (!want.proceed) {
          seen.modelRefused++;
          expect(plan).toEqual({ ...want, code: 'CHAIN_REFUSED' });
          return;
        }
        const orphan = orphanOf(db, target, want);
        if (orphan === null) {
          seen.agree++;
          expect(withoutCode(plan)).toEqual(want);
          expect(plan.code).toBeNull();
        } else {
          seen[orphan]++;
          expect(plan).toMatchObject({
            proceed: false,
            code: 'CHAIN_WOULD_ORPHAN',
            rebaseSteps: [],
            toDelete: [],
            shiftPositionsBelow: null,
          });
          expect(plan.reason).toMatch(new RegExp(`^Cannot delete ${target.uuid}: `));
          expect(plan.reason).toMatch(ORPHAN_TEXT[orphan]);
        }
      }),
      { seed: SEED, numRuns: RUNS },
    );
    // Every documented difference is actually exercised, and most plans still agree.
    expect(seen.twins).toBeGreaterThan(0);
    expect(seen.unreadable).toBeGreaterThan(0);
    expect(seen.parent).toBeGreaterThan(0);
    expect(seen.modelRefused).toBeGreaterThan(0);
    expect(seen.agree).toBeGreaterThan(RUNS / 2);
  });
});

// ---------------------------------------------------------------- each §9.4 rule by example

let nextId = 100;
/** A backup of the VM; `chain: false` leaves out the chain id row; `rows` come before the others. */
function rec(
  pos: string | null | undefined,
  opts: { chain?: string | null | false; parent?: string; vm?: number; rows?: Row[] } = {},
): DbBackup {
  const id = nextId++;
  const details: Row[] = [...(opts.rows ?? [])];
  if (opts.chain !== false) details.push({ name: CHAIN, value: opts.chain === undefined ? 'c' : opts.chain });
  if (pos !== undefined) details.push({ name: POS, value: pos });
  if (opts.parent !== undefined) details.push({ name: PARENT, value: opts.parent });
  return { id, uuid: `u-${id}`, externalId: `i-2-10-VM/t${id}`, vmId: opts.vm ?? VM, status: 'BackedUp', date: '', details };
}
const plan = (db: DbBackup[], target: DbBackup, forced = false) => computeChainRepair(recordsOf(db), target.uuid, ROOT, forced);
const provider = (db: DbBackup[], target: DbBackup, forced = false) => providerChainRepair(recordsOf(db), target.uuid, ROOT, forced);
const uuids = (p: ChainRepairPlan) => p.toDelete.map((r) => r.uuid);

describe('how the provider reads malformed metadata (examples)', () => {
  it('Integer.parseInt, as the JDK does', () => {
    expect(parseJavaInt('+1')).toBe(1);
    expect(parseJavaInt('01')).toBe(1);
    expect(parseJavaInt('-0')).toBe(0);
    expect(parseJavaInt('\u0661\u0662')).toBe(12); // Unicode digits count
    expect(parseJavaInt('2147483647')).toBe(MAX);
    expect(parseJavaInt('-2147483648')).toBe(-MAX - 1);
    for (const bad of [' 1', '1 ', '', '+', '-', '1.0', '0x1', '1e3', '2147483648', '-2147483649', '99999999999']) {
      expect(() => parseJavaInt(bad), JSON.stringify(bad)).toThrow(
        expect.objectContaining({ className: 'java.lang.NumberFormatException' }),
      );
    }
  });

  it('a missing, null or unparseable position counts as MAX_VALUE, not 0: a descendant of the full', () => {
    for (const odd of [undefined, null, 'two', ' 1', '2147483648']) {
      const f = rec('0');
      const x = rec(odd);
      const p = plan([f, x], f);
      expect(p, String(odd)).toMatchObject({
        proceed: false,
        code: 'CHAIN_REFUSED',
        reason: expect.stringContaining('chain with 1 incremental(s)'),
      });
      expect(uuids(plan([f, x], f, true))).toEqual([x.uuid, f.uuid]);
      // Deleting it: nothing is above MAX_VALUE, so it goes alone, as a tail would.
      expect(plan([f, x], x)).toMatchObject({ proceed: true, code: null, rebaseSteps: [], toDelete: [{ uuid: x.uuid }] });
    }
  });

  it('"+1" and "01" are position 1; " 1" is not', () => {
    for (const one of ['+1', '01', '\u0661']) {
      const f = rec('0');
      const i1 = rec(one);
      const i2 = rec('2');
      expect(plan([f, i1, i2], i1)).toMatchObject({
        proceed: true,
        rebaseSteps: [{ childBackupId: i2.id, newParentUuid: f.uuid, newChainPosition: 1 }],
      });
    }
    const f = rec('0');
    const i1 = rec(' 1');
    const i2 = rec('2');
    // " 1" is MAX_VALUE: above i2, and not at i2's parent position 1.
    expect(plan([f, i1, i2], i2)).toEqual({
      proceed: false,
      code: 'CHAIN_REFUSED',
      reason: `Cannot delete ${i2.uuid}: its parent (chain_position=1) is missing from the chain`,
      rebaseSteps: [],
      toDelete: [],
      shiftPositionsBelow: null,
    });
    expect(uuids(plan([f, i1, i2], f, true))).toEqual([i1.uuid, i2.uuid, f.uuid]);
  });

  it('a position that overflows int is unparseable; -2147483648 - 1 wraps to MAX_VALUE like Java int arithmetic', () => {
    const f = rec('0');
    const big = rec('2147483648');
    const min = rec('-2147483648');
    // The provider looks for min's parent at MAX_VALUE and finds the unparseable one.
    expect(provider([f, big, min], min)).toMatchObject({
      proceed: true,
      rebaseSteps: [{ childBackupId: f.id, newParentUuid: big.uuid, newChainPosition: -1 }],
      shiftPositionsBelow: { chainId: 'c', afterPosition: -MAX - 1 },
    });
    expect(plan([f, big, min], min)).toMatchObject({
      proceed: false,
      code: 'CHAIN_WOULD_ORPHAN',
      reason: expect.stringContaining(`${big.uuid} of its chain have no readable chain_position`),
    });
    expect(provider([f, min], min)).toMatchObject({
      proceed: false,
      reason: `Cannot delete ${min.uuid}: its parent (chain_position=2147483647) is missing from the chain`,
    });
  });

  it('of duplicate details rows the first one wins (a null value too)', () => {
    const f = rec('0');
    const a = rec('1', { rows: [{ name: POS, value: '2' }] }); // rows: 2, then 1
    const b = rec('2', { rows: [{ name: POS, value: '1' }] }); // rows: 1, then 2
    const c = rec('3');
    expect(plan([f, a, b, c], b)).toMatchObject({ proceed: true, rebaseSteps: [{ childBackupId: a.id, newParentUuid: f.uuid }] });
    const shadowed = rec('1', { rows: [{ name: POS, value: null }] });
    expect(plan([f, shadowed], f)).toMatchObject({ proceed: false, reason: expect.stringContaining('1 incremental(s)') });
    const legacy = rec('0', { rows: [{ name: CHAIN, value: null }] });
    expect(plan([legacy, rec('1')], legacy)).toMatchObject({ proceed: true, toDelete: [{ uuid: legacy.uuid }] });
    // The records file keeps rows in order; the map form has one value per name.
    expect(recordsOf([a])[0]!.details[POS]).toBe('2');
  });

  it('storage order: the first backup listed at the parent’s position is the parent', () => {
    const f = rec('0');
    const p1 = rec('1');
    const p2 = rec('1');
    const i = rec('2');
    const tail = rec('3');
    expect(plan([f, p2, p1, i, tail], i).rebaseSteps[0]!.newParentUuid).toBe(p2.uuid);
    expect(plan([f, p1, p2, i, tail], i).rebaseSteps[0]!.newParentUuid).toBe(p1.uuid);
  });

  it('storage order: of two children at one position the provider rebases the first listed; plan-delete refuses', () => {
    const f = rec('0');
    const i1 = rec('1');
    const c1 = rec('2');
    const c2 = rec('2');
    expect(provider([f, i1, c2, c1], i1).rebaseSteps[0]!.childBackupId).toBe(c2.id);
    expect(provider([f, i1, c1, c2], i1).rebaseSteps[0]!.childBackupId).toBe(c1.id);
    expect(plan([f, i1, c1, c2], i1)).toMatchObject({
      proceed: false,
      code: 'CHAIN_WOULD_ORPHAN',
      reason: `Cannot delete ${i1.uuid}: 2 backups (${c1.uuid}, ${c2.uuid}) share chain_position=2 after it; only the first would be rebased and the others left backing onto the deleted backup. Fix nas.chain_position first`,
    });
  });

  it('forced: descendants newest first, ties in storage order; ignored for a middle or a tail', () => {
    const f = rec('0');
    const a = rec('2');
    const b = rec('1');
    const c = rec('2');
    expect(uuids(plan([a, f, b, c], f, true))).toEqual([a.uuid, c.uuid, b.uuid, f.uuid]);
    expect(uuids(plan([c, f, b, a], f, true))).toEqual([c.uuid, a.uuid, b.uuid, f.uuid]);
    const g = rec('0');
    const i1 = rec('1');
    const i2 = rec('2');
    expect(plan([g, i1, i2], i1, true)).toEqual(plan([g, i1, i2], i1, false));
    expect(plan([g, i1, i2], i2, true)).toEqual(plan([g, i1, i2], i2, false));
  });

  it('an empty chain_id is a chain like any other; a missing one is a legacy backup', () => {
    const f = rec('0', { chain: '' });
    const i1 = rec('1', { chain: '' });
    expect(plan([f, i1], f)).toMatchObject({ proceed: false, code: 'CHAIN_REFUSED', reason: expect.stringContaining('1 incremental(s)') });
    const g = rec('0', { chain: '' });
    const j1 = rec('1', { chain: '' });
    const j2 = rec('2', { chain: '' });
    expect(plan([g, j1, j2], j1)).toMatchObject({ proceed: true, shiftPositionsBelow: { chainId: '', afterPosition: 1 } });
    const legacy = rec('0', { chain: false });
    expect(plan([legacy, rec('1', { chain: false })], legacy)).toMatchObject({ proceed: true, toDelete: [{ uuid: legacy.uuid }] });
  });

  it('a gap: the nearest descendant is the child (0, 1, 3: delete 1 rebases 3 onto 0 at position 2)', () => {
    const f = rec('0');
    const i1 = rec('1', { parent: 'x' });
    const i3 = rec('3');
    expect(plan([f, i1, i3], i1)).toMatchObject({
      proceed: true,
      rebaseSteps: [{ childBackupId: i3.id, newParentUuid: f.uuid, newChainPosition: 2 }],
      shiftPositionsBelow: { chainId: 'c', afterPosition: 1 },
    });
  });

  it('a backup whose parent id names a deleted backup: refused (the provider would proceed)', () => {
    const f = rec('0');
    const i1 = rec('1', { parent: '' });
    const i2 = rec('2', { parent: '' });
    i1.details.push({ name: PARENT, value: f.uuid });
    i2.details.push({ name: PARENT, value: i1.uuid });
    const stray = rec('1', { chain: 'other', parent: i2.uuid }); // another chain id, but built on i2
    expect(provider([f, i1, i2, stray], i2)).toMatchObject({ proceed: true, toDelete: [{ uuid: i2.uuid }] });
    expect(plan([f, i1, i2, stray], i2)).toMatchObject({
      proceed: false,
      code: 'CHAIN_WOULD_ORPHAN',
      reason: `Cannot delete ${i2.uuid}: backup ${stray.uuid} names ${i2.uuid} as its parent (nas.parent_backup_id), and the plan would delete that parent without rebasing it. Fix the chain metadata first`,
    });
    // Not when the rows' first parent value is empty (as the provider writes after a rebase), nor for the rebased child.
    expect(plan([f, i1, i2], i1)).toMatchObject({ proceed: true, rebaseSteps: [{ childBackupId: i2.id }] });
    // Nor another VM's backup: the provider never sees it.
    const elsewhere = rec('1', { chain: 'c', parent: i2.uuid, vm: OTHER_VM });
    expect(plan([f, i1, i2, elsewhere], i2)).toMatchObject({ proceed: true });
  });

  it('cyclic parent ids: refused wherever a kept backup names a deleted one', () => {
    const a = rec('0');
    const b = rec('1');
    a.details.push({ name: PARENT, value: b.uuid });
    b.details.push({ name: PARENT, value: a.uuid });
    expect(plan([a, b], b)).toMatchObject({ proceed: false, code: 'CHAIN_WOULD_ORPHAN' });
    expect(plan([a, b], a, true)).toMatchObject({ proceed: true, toDelete: [{ uuid: b.uuid }, { uuid: a.uuid }] });
  });

  it('a middle delete with a chain member of unreadable position: refused (the provider would proceed)', () => {
    const f = rec('0');
    const i1 = rec('1');
    const i2 = rec('2');
    const lost = rec('oops');
    expect(provider([f, i1, i2, lost], i1)).toMatchObject({ proceed: true, rebaseSteps: [{ childBackupId: i2.id }] });
    expect(plan([f, i1, i2, lost], i1)).toMatchObject({
      proceed: false,
      code: 'CHAIN_WOULD_ORPHAN',
      reason: expect.stringContaining(`backup(s) ${lost.uuid} of its chain have no readable chain_position`),
    });
    // A tail or a forced full is not concerned: the tail has no readable-position descendant, the full removes them all.
    expect(plan([f, i1, i2, lost], f, true)).toMatchObject({ proceed: true });
  });
});
