// Command → argv per wrapper generation (docs/agent-contract.md §3), table-driven per profile.
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import {
  composeMonHosts,
  DEFAULT_SCRIPT_PATH as S,
  linstorDevicePath,
  prepare,
  PROFILES,
  rbdString,
  resolveProfile,
  volumeIdOf,
  type BackupCommand,
  type JsonObject,
  type Prepared,
  type ProfileName,
  type TakeBackupCommand,
} from '../../compat/index.js';

const VM = 'i-2-10-VM';
const NAS = ['-t', 'nfs', '-s', '10.10.0.5:/export/backup'];
const P1 = `${VM}/2025.01.01.00.00.00/root.b3f4.qcow2`;
const P2 = `${VM}/2025.01.01.00.00.00/datadisk.c9e8.qcow2`;

const take = (over: Partial<TakeBackupCommand> = {}): TakeBackupCommand => ({
  cls: 'TakeBackupCommand',
  vmName: VM,
  backupPath: `${VM}/2025.01.04.00.00.00`,
  backupRepoType: 'nfs',
  backupRepoAddress: '10.10.0.5:/export/backup',
  wait: 0,
  bypassHostMaintenance: false,
  ...over,
});
/** The fixed part every generation sends, in order. */
const fixed = (q = 'false', d = '', m = ''): string[] => [
  S,
  '-o',
  'backup',
  '-v',
  VM,
  ...NAS,
  '-m',
  m,
  '-p',
  `${VM}/2025.01.04.00.00.00`,
  '-q',
  q,
  '-d',
  d,
];

const argvOf = (p: Prepared): string[] => {
  if (p.kind !== 'run') throw new Error(`expected a run, got ${p.kind}`);
  return p.argv;
};
const pool = (o: Record<string, unknown>): JsonObject => new Map(Object.entries(o)) as JsonObject;

type Row = [string, TakeBackupCommand, Record<ProfileName, string[] | string>];
const INC = { mode: 'incremental', bitmapNew: 'backup-1736035200', bitmapParent: 'backup-1735689600' } as const;

const rows: Row[] = [
  ['legacy: no mode, nothing optional', take(), { 'rebase-era': fixed(), merged: fixed(), newest: fixed() }],
  [
    'incremental, both parent fields present',
    take({ ...INC, parentPath: P1, parentPaths: [P1, P2] }),
    {
      'rebase-era': [
        ...fixed(),
        '-M',
        'incremental',
        '--bitmap-new',
        INC.bitmapNew,
        '--bitmap-parent',
        INC.bitmapParent,
        '--parent-path',
        P1,
      ],
      merged: [
        ...fixed(),
        '-M',
        'incremental',
        '--bitmap-new',
        INC.bitmapNew,
        '--bitmap-parent',
        INC.bitmapParent,
        '--parent-paths',
        `${P1},${P2}`,
      ],
      newest: [
        ...fixed(),
        '-M',
        'incremental',
        '--bitmap-new',
        INC.bitmapNew,
        '--bitmap-parent',
        INC.bitmapParent,
        '--parent-paths',
        `${P1},${P2}`,
      ],
    },
  ],
  [
    'rebase-era command (parentPath only) to later wrappers: they refuse, having no parentPaths',
    take({ ...INC, parentPath: P1 }),
    {
      'rebase-era': [
        ...fixed(),
        '-M',
        'incremental',
        '--bitmap-new',
        INC.bitmapNew,
        '--bitmap-parent',
        INC.bitmapParent,
        '--parent-path',
        P1,
      ],
      merged: 'incremental mode requires parentPaths',
      newest: 'incremental mode requires parentPaths',
    },
  ],
  [
    'quiesce with a timeout, mount options, full mode',
    take({ quiesce: true, quiesceTimeout: 30, mountOptions: 'vers=4.1,timeo=600', mode: 'full', bitmapNew: 'backup-1' }),
    {
      'rebase-era': [...fixed('true', '', 'vers=4.1,timeo=600'), '-M', 'full', '--bitmap-new', 'backup-1'],
      merged: [...fixed('true', '', 'vers=4.1,timeo=600'), '-M', 'full', '--bitmap-new', 'backup-1'],
      newest: [...fixed('true', '', 'vers=4.1,timeo=600'), '-M', 'full', '--bitmap-new', 'backup-1', '--quiesce-timeout', '30'],
    },
  ],
  [
    'a timeout without quiescing, or of 0, is never sent',
    take({ quiesce: false, quiesceTimeout: 30 }),
    { 'rebase-era': fixed(), merged: fixed(), newest: fixed() },
  ],
  [
    'quiesceTimeout 0',
    take({ quiesce: true, quiesceTimeout: 0 }),
    { 'rebase-era': fixed('true'), merged: fixed('true'), newest: fixed('true') },
  ],
  [
    'blank tail values: isEmpty keeps them, isNotBlank (newest) drops them',
    take({ mode: 'full', bitmapNew: 'b', bitmapParent: '  ' }),
    {
      'rebase-era': [...fixed(), '-M', 'full', '--bitmap-new', 'b', '--bitmap-parent', '  '],
      merged: [...fixed(), '-M', 'full', '--bitmap-new', 'b', '--bitmap-parent', '  '],
      newest: [...fixed(), '-M', 'full', '--bitmap-new', 'b'],
    },
  ],
  [
    'empty strings are never sent',
    take({ mode: '', bitmapNew: '', bitmapParent: '', parentPath: '', parentPaths: [] }),
    { 'rebase-era': fixed(), merged: fixed(), newest: fixed() },
  ],
  [
    'legacy-full (feature switched off)',
    take({ mode: 'legacy-full' }),
    {
      'rebase-era': [...fixed(), '-M', 'legacy-full'],
      merged: [...fixed(), '-M', 'legacy-full'],
      newest: [...fixed(), '-M', 'legacy-full'],
    },
  ],
  [
    'unknown mode: the rebase-era wrapper passes it on, later ones refuse',
    take({ mode: 'differential', bitmapNew: 'b' }),
    {
      'rebase-era': [...fixed(), '-M', 'differential', '--bitmap-new', 'b'],
      merged: 'Unknown backup mode: differential',
      newest: 'Unknown backup mode: differential',
    },
  ],
  [
    'full without bitmapNew',
    take({ mode: 'full' }),
    {
      'rebase-era': [...fixed(), '-M', 'full'],
      merged: 'full mode requires bitmapNew (the bitmap to create for the next incremental)',
      newest: 'full mode requires bitmapNew (the bitmap to create for the next incremental)',
    },
  ],
  [
    'incremental without bitmapParent; blank bitmapNew',
    take({ mode: 'incremental', bitmapNew: ' ', parentPaths: [P1] }),
    {
      'rebase-era': [...fixed(), '-M', 'incremental', '--bitmap-new', ' '],
      merged: 'incremental mode requires bitmapParent',
      newest: 'incremental mode requires bitmapNew',
    },
  ],
  [
    'a null element in parentPaths is written "null" (String.join)',
    take({ ...INC, parentPaths: [P1, null] }),
    {
      'rebase-era': [...fixed(), '-M', 'incremental', '--bitmap-new', INC.bitmapNew, '--bitmap-parent', INC.bitmapParent],
      merged: [
        ...fixed(),
        '-M',
        'incremental',
        '--bitmap-new',
        INC.bitmapNew,
        '--bitmap-parent',
        INC.bitmapParent,
        '--parent-paths',
        `${P1},null`,
      ],
      newest: [
        ...fixed(),
        '-M',
        'incremental',
        '--bitmap-new',
        INC.bitmapNew,
        '--bitmap-parent',
        INC.bitmapParent,
        '--parent-paths',
        `${P1},null`,
      ],
    },
  ],
];

describe.each(Object.keys(PROFILES) as ProfileName[])('TakeBackupCommand, profile %s', (name) => {
  const profile = PROFILES[name];
  it.each(rows)('%s', (_n, cmd, expected) => {
    const want = expected[name];
    const p = prepare(profile, cmd);
    if (typeof want === 'string') {
      expect(p).toMatchObject({ kind: 'answer', answer: { cls: 'BackupAnswer', result: false, details: want } });
    } else {
      expect(argvOf(p)).toEqual(want);
    }
  });
});

describe('the contract §3.1 example (later wrapper, running VM, incremental)', () => {
  it.each(['merged', 'newest'] as const)('%s builds it exactly', (name) => {
    const cmd = take({
      vmName: 'i-2-10-VM',
      backupPath: 'i-2-10-VM/2025.01.04.00.00.00',
      backupRepoAddress: '10.10.0.5:/export/backup',
      quiesce: false,
      mode: 'incremental',
      bitmapNew: 'backup-1736035200',
      bitmapParent: 'backup-1735689600',
      parentPaths: ['i-2-10-VM/2025.01.01.00.00.00/root.<vol>.qcow2', 'i-2-10-VM/2025.01.01.00.00.00/datadisk.<vol2>.qcow2'],
    });
    expect(argvOf(prepare(PROFILES[name], cmd))).toEqual([
      S,
      '-o',
      'backup',
      '-v',
      'i-2-10-VM',
      '-t',
      'nfs',
      '-s',
      '10.10.0.5:/export/backup',
      '-m',
      '',
      '-p',
      'i-2-10-VM/2025.01.04.00.00.00',
      '-q',
      'false',
      '-d',
      '',
      '-M',
      'incremental',
      '--bitmap-new',
      'backup-1736035200',
      '--bitmap-parent',
      'backup-1735689600',
      '--parent-paths',
      'i-2-10-VM/2025.01.01.00.00.00/root.<vol>.qcow2,i-2-10-VM/2025.01.01.00.00.00/datadisk.<vol2>.qcow2',
    ]);
  });
});

describe('stopped VM: -d from volumePaths and volumePools', () => {
  const nfs = pool({ uuid: 'p-nfs', poolType: 'NetworkFilesystem', host: '10.0.0.9', path: '/export/primary' });
  const rbd = pool({ uuid: 'p-rbd', poolType: 'RBD', host: '10.0.0.1,10.0.0.2', port: 6789, path: 'cloudstack' });
  const linstor = pool({ uuid: 'p-lin', poolType: 'Linstor' });
  const cmd = take({
    volumePools: [nfs, rbd, linstor],
    volumePaths: ['/mnt/p-nfs/aaaa', 'cloudstack/bbbb', linstorDevicePath('cccc')],
  });
  const disks =
    '/mnt/p-nfs/aaaa,rbd:cloudstack/bbbb:mon_host=10.0.0.1\\:6789\\;10.0.0.2\\:6789:auth_supported=none:rbd_default_format=2:client_mount_timeout=30,/dev/drbd/by-res/cs-cccc/0';

  it.each(Object.keys(PROFILES) as ProfileName[])('%s: NFS and LINSTOR pass through, RBD becomes an rbd: string', (name) => {
    const p = prepare(PROFILES[name], cmd);
    expect(p).toMatchObject({ kind: 'run', stoppedVm: true });
    expect(argvOf(p).slice(15, 17)).toEqual(['-d', disks]);
  });

  it('a resolver supplies the cephx user, secret and data pool the agent reads from libvirt', () => {
    const p = prepare(PROFILES['rebase-era'], take({ volumePools: [rbd], volumePaths: ['cloudstack/bbbb'] }), {
      rbdPool: (v) => ({ monHost: v.host ?? null, monPort: v.port ?? 0, authUserName: 'admin', authSecret: 'AQB==', dataPool: 'ec' }),
    });
    expect(argvOf(p)[16]).toBe(
      'rbd:cloudstack/bbbb:mon_host=10.0.0.1\\:6789\\;10.0.0.2\\:6789:auth_supported=cephx:id=admin:key=AQB==:rbd_default_data_pool=ec:rbd_default_format=2:client_mount_timeout=30',
    );
  });

  it('an empty volumePaths list is a running VM: -d ""', () => {
    const p = prepare(PROFILES.merged, take({ volumePaths: [], volumePools: [] }));
    expect(p).toMatchObject({ kind: 'run', stoppedVm: false });
    expect(argvOf(p)[16]).toBe('');
  });

  it.each<[string, Partial<TakeBackupCommand>, string]>([
    [
      'fewer pools than paths',
      { volumePaths: ['a', 'b'], volumePools: [nfs] },
      'java.lang.IndexOutOfBoundsException: Index 1 out of bounds for length 1',
    ],
    ['no pools at all', { volumePaths: ['a'] }, 'java.lang.NullPointerException'],
    ['a null pool', { volumePaths: ['a'], volumePools: [null] }, 'java.lang.NullPointerException'],
  ])('%s: G1/G2/G3 wrappers throw (agent answers a plain Answer), W4 answers BackupAnswer(false)', (_n, over, exception) => {
    for (const name of ['rebase-era', 'merged'] as const) {
      const p = prepare(PROFILES[name], take(over));
      expect(p.kind).toBe('throw');
      if (p.kind === 'throw') expect(p.exception.toString()).toBe(exception);
    }
    const w4 = prepare(PROFILES.newest, take(over));
    expect(w4.kind).toBe('answer');
    if (w4.kind === 'answer') expect(w4.answer).toMatchObject({ cls: 'BackupAnswer', result: false });
  });

  it('composes monitors like KVMPhysicalDisk: IPv6 colons escaped, port optional', () => {
    expect(composeMonHosts('[2001:db8::1],10.0.0.1', 6789)).toBe('[2001\\:db8\\:\\:1]\\:6789\\;10.0.0.1\\:6789');
    expect(composeMonHosts('mon.example', 0)).toBe('mon.example');
    expect(rbdString({ monHost: 'm', monPort: 0 }, 'p/i')).toBe(
      'rbd:p/i:mon_host=m:auth_supported=none:rbd_default_format=2:client_mount_timeout=30',
    );
  });

  it.each([
    ['/mnt/p-nfs/aaaa', 'aaaa'],
    ['/var/lib/libvirt/images/dddd', 'dddd'],
    ['rbd:cloudstack/53d5c355-d726:mon_host=10.0.1.2', '53d5c355-d726'],
    ['/dev/drbd/by-res/cs-53d5c355-d726/0', '53d5c355-d726'],
  ])('volume id of %s is %s (contract §6)', (entry, id) => expect(volumeIdOf(entry)).toBe(id));
});

describe('DeleteBackupCommand, RebaseBackupCommand, GetBackupStorageStatsCommand', () => {
  const base = { wait: 0, bypassHostMaintenance: false, backupRepoType: 'nfs', backupRepoAddress: '10.10.0.5:/export/backup' };
  const del: BackupCommand = { cls: 'DeleteBackupCommand', ...base, backupPath: `${VM}/2025.01.02.00.00.00` };
  const reb: BackupCommand = {
    cls: 'RebaseBackupCommand',
    ...base,
    targetPath: 'a/b/root.x.qcow2',
    newBackingPath: 'a/c/root.x.qcow2',
    mountOptions: 'vers=4.1',
  };
  const stats: BackupCommand = { cls: 'GetBackupStorageStatsCommand', ...base };

  it.each(Object.keys(PROFILES) as ProfileName[])('%s: delete and stats argv (mount options "" when null)', (name) => {
    expect(argvOf(prepare(PROFILES[name], del))).toEqual([S, '-o', 'delete', ...NAS, '-m', '', '-p', `${VM}/2025.01.02.00.00.00`]);
    expect(argvOf(prepare(PROFILES[name], stats))).toEqual([S, '-o', 'stats', ...NAS, '-m', '']);
  });

  it('rebase-era: the rebase argv has no -p and no -v', () => {
    expect(argvOf(prepare(PROFILES['rebase-era'], reb, { scriptPath: '/opt/nasbackup.sh' }))).toEqual([
      '/opt/nasbackup.sh',
      '-o',
      'rebase',
      ...NAS,
      '-m',
      'vers=4.1',
      '--rebase-target',
      'a/b/root.x.qcow2',
      '--rebase-new-backing',
      'a/c/root.x.qcow2',
    ]);
  });

  it.each(['merged', 'newest'] as const)('%s: no rebase wrapper, refused without running', (name) => {
    const p = prepare(PROFILES[name], reb);
    expect(p).toMatchObject({ kind: 'answer', answer: { cls: 'BackupAnswer', result: false } });
    if (p.kind === 'answer') expect(p.answer.details).toMatch(/RebaseBackupCommand is not handled by the .* profile.*nothing was executed/);
  });
});

describe('profiles', () => {
  it('--profile wins over the environment, which wins over the default', () => {
    expect(resolveProfile(undefined, undefined).name).toBe('rebase-era');
    expect(resolveProfile('', 'merged').name).toBe('merged');
    expect(resolveProfile('newest', 'merged').name).toBe('newest');
    expect(() => resolveProfile(undefined, 'g9')).toThrow(/Unknown agent profile "g9" from NASBACKUP_AGENT_PROFILE/);
  });
});

describe('argv building never throws on arbitrary input (property)', () => {
  const s = fc.string({ unit: 'binary', maxLength: 12 });
  const o = <T>(a: fc.Arbitrary<T>) => fc.option(a, { nil: undefined });
  const anyPool = fc.option(
    fc
      .record({
        poolType: fc.constantFrom('RBD', 'NetworkFilesystem', 'Linstor', 'x'),
        host: o(s),
        port: o(fc.integer()),
        path: o(s),
        uuid: o(s),
      })
      .map((r) => pool(r)),
    { nil: null },
  );
  const anyTake = fc
    .record({
      vmName: s,
      backupPath: s,
      backupRepoType: s,
      backupRepoAddress: s,
      mountOptions: o(s),
      mode: o(fc.oneof(s, fc.constantFrom('full', 'incremental', 'legacy-full'))),
      bitmapNew: o(s),
      bitmapParent: o(s),
      parentPath: o(s),
      parentPaths: o(fc.array(fc.option(s, { nil: null }))),
      quiesce: o(fc.boolean()),
      quiesceTimeout: o(fc.integer()),
      volumePaths: o(fc.array(fc.option(s, { nil: null }), { maxLength: 3 })),
      volumePools: o(fc.array(anyPool, { maxLength: 3 })),
    })
    .map((r) => take(Object.fromEntries(Object.entries(r).filter(([, v]) => v !== undefined)) as Partial<TakeBackupCommand>));

  it('every profile: a run with the fixed part in place, a refusal, or a modelled Java exception', () => {
    fc.assert(
      fc.property(anyTake, fc.constantFrom(...(Object.keys(PROFILES) as ProfileName[])), (cmd, name) => {
        const p = prepare(PROFILES[name], cmd);
        if (p.kind === 'run') {
          expect(p.argv.slice(0, 5)).toEqual([S, '-o', 'backup', '-v', cmd.vmName]);
          expect(p.argv.every((a) => typeof a === 'string')).toBe(true);
          expect(p.argv.length % 2).toBe(1);
        }
      }),
    );
  });
});
