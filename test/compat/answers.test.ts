// (exit code, stdout) → answer, per wrapper generation (docs/agent-contract.md §4.2, §5.2, §5.3),
// table-driven on the original script's observed outputs (golden transcripts).
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import {
  answerFor,
  encodeAnswers,
  PROFILES,
  type BackupCommand,
  type ExecResult,
  type ProfileName,
  type TakeBackupCommand,
  type WireAnswer,
} from '../../compat/index.js';
import * as EX from './examples.js';

const take = (over: Partial<TakeBackupCommand> = {}): TakeBackupCommand => ({
  cls: 'TakeBackupCommand',
  vmName: 'i-2-10-VM',
  backupPath: 'i-2-10-VM/2025.01.04.00.00.00',
  backupRepoType: 'nfs',
  backupRepoAddress: '10.10.0.5:/export/backup',
  mode: 'full',
  bitmapNew: 'backup-1736035200',
  wait: 0,
  bypassHostMaintenance: false,
  ...over,
});
const PROFILE_NAMES = Object.keys(PROFILES) as ProfileName[];

const JOB16 =
  'Job type:         Completed   \nOperation:        Backup      \nTime elapsed:     133          ms\nFile processed:   16.000 MiB\nFile remaining:   0.000 B\nFile total:       16.000 MiB\n';
const JOB_EMPTY_INC = 'Job type:         Completed   \nOperation:        Backup      \nTime elapsed:     133          ms\n';

/** A BackupAnswer's interesting fields, or the Java exception a wrapper throws (→ plain Answer). */
type Expect =
  { size: bigint; details: string; bitmapCreated?: string; bitmapRecreated?: string; incrementalFallback: boolean } | { throws: string };

type Row = [name: string, stdout: string, stoppedVm: boolean, expected: Record<ProfileName, Expect>];

const rows: Row[] = [
  [
    'golden backup-running-full-bitmap: size, then BITMAP_CREATED= last',
    `${JOB16}\n1775942\nBITMAP_CREATED=backup-1736035200\n`,
    false,
    {
      // details: the whole stdout trimmed once, the marker included (§5.2); only the size ignores it.
      'rebase-era': {
        size: 1775942n,
        details: `${JOB16}\n1775942\nBITMAP_CREATED=backup-1736035200`,
        bitmapCreated: 'backup-1736035200',
        incrementalFallback: false,
      },
      // G3 does not strip BITMAP_CREATED=, so the last line is no number.
      merged: { throws: 'java.lang.NumberFormatException: For input string: "BITMAP_CREATED=backup-1736035200"' },
      newest: {
        size: 0n,
        details: `${JOB16}\n1775942\nBITMAP_CREATED=backup-1736035200`,
        bitmapCreated: 'backup-1736035200',
        incrementalFallback: false,
      },
    },
  ],
  [
    'golden backup-running-incremental-recreate-checkpoint: BITMAP_RECREATED= first',
    `BITMAP_RECREATED=backup-1735689600\n${JOB_EMPTY_INC}\n203086\nBITMAP_CREATED=backup-1736035200\n`,
    false,
    {
      'rebase-era': {
        size: 203086n,
        details: `BITMAP_RECREATED=backup-1735689600\n${JOB_EMPTY_INC}\n203086\nBITMAP_CREATED=backup-1736035200`,
        bitmapCreated: 'backup-1736035200',
        bitmapRecreated: 'backup-1735689600',
        incrementalFallback: false,
      },
      merged: { throws: 'java.lang.NumberFormatException: For input string: "BITMAP_CREATED=backup-1736035200"' },
      newest: {
        size: 0n,
        details: `BITMAP_RECREATED=backup-1735689600\n${JOB_EMPTY_INC}\n203086\nBITMAP_CREATED=backup-1736035200`,
        bitmapCreated: 'backup-1736035200',
        incrementalFallback: false,
      },
    },
  ],
  [
    'golden backup-running-legacy: no markers at all',
    `${JOB16}\n1775942\n`,
    false,
    {
      'rebase-era': { size: 1775942n, details: `${JOB16}\n1775942`, incrementalFallback: false },
      merged: { size: 1775942n, details: `${JOB16}\n1775942`, bitmapCreated: 'backup-1736035200', incrementalFallback: false },
      newest: { size: 0n, details: `${JOB16}\n1775942`, bitmapCreated: 'backup-1736035200', incrementalFallback: false },
    },
  ],
  [
    'golden backup-stopped-full-bitmap: marker, empty line (ls "total"), one size per file',
    'BITMAP_CREATED=backup-1736035200\n\n917504\n1769472\n',
    true,
    {
      'rebase-era': {
        size: 2686976n,
        details: 'BITMAP_CREATED=backup-1736035200\n\n917504\n1769472',
        bitmapCreated: 'backup-1736035200',
        incrementalFallback: false,
      },
      merged: { throws: 'java.lang.NumberFormatException: For input string: "BITMAP_CREATED=backup-1736035200"' },
      newest: {
        size: 0n,
        details: 'BITMAP_CREATED=backup-1736035200\n\n917504\n1769472',
        bitmapCreated: 'backup-1736035200',
        incrementalFallback: false,
      },
    },
  ],
  [
    "golden backup-stopped-incremental-fallback: G2 fallback text is not G3's =true marker",
    'INCREMENTAL_FALLBACK=full (VM stopped — incremental requires running VM)\nBITMAP_CREATED=backup-1736035200\n\n917504\n1769472\n',
    true,
    {
      'rebase-era': {
        size: 2686976n,
        details:
          'INCREMENTAL_FALLBACK=full (VM stopped — incremental requires running VM)\nBITMAP_CREATED=backup-1736035200\n\n917504\n1769472',
        bitmapCreated: 'backup-1736035200',
        incrementalFallback: true,
      },
      merged: { throws: 'java.lang.NumberFormatException: For input string: "INCREMENTAL_FALLBACK=full"' },
      newest: {
        size: 0n,
        details:
          'INCREMENTAL_FALLBACK=full (VM stopped — incremental requires running VM)\nBITMAP_CREATED=backup-1736035200\n\n917504\n1769472',
        bitmapCreated: 'backup-1736035200',
        incrementalFallback: false,
      },
    },
  ],
  [
    'golden backup-stopped-legacy: the leading empty line survives only thanks to trim()',
    '\n917504\n1769472\n',
    true,
    {
      'rebase-era': { size: 2686976n, details: '917504\n1769472', incrementalFallback: false },
      merged: { size: 2686976n, details: '917504\n1769472', bitmapCreated: 'backup-1736035200', incrementalFallback: false },
      newest: { size: 0n, details: '917504\n1769472', bitmapCreated: 'backup-1736035200', incrementalFallback: false },
    },
  ],
  [
    'golden backup-stopped-unknown-vm: a paused VM\'s empty "backup" on the running path',
    '\n',
    false,
    {
      'rebase-era': { throws: 'java.lang.NumberFormatException: For input string: ""' },
      merged: { throws: 'java.lang.NumberFormatException: For input string: ""' },
      newest: { size: 0n, details: '', bitmapCreated: 'backup-1736035200', incrementalFallback: false },
    },
  ],
  [
    'G3 script: INCREMENTAL_FALLBACK=true first',
    `INCREMENTAL_FALLBACK=true\n${JOB16}\n1775942\n`,
    false,
    {
      'rebase-era': { size: 1775942n, details: `INCREMENTAL_FALLBACK=true\n${JOB16}\n1775942`, incrementalFallback: true },
      merged: {
        size: 1775942n,
        details: `INCREMENTAL_FALLBACK=true\n${JOB16}\n1775942`,
        bitmapCreated: 'backup-1736035200',
        incrementalFallback: true,
      },
      newest: {
        size: 0n,
        details: `INCREMENTAL_FALLBACK=true\n${JOB16}\n1775942`,
        bitmapCreated: 'backup-1736035200',
        incrementalFallback: true,
      },
    },
  ],
  [
    'the §5.2 all-generations layout: BACKUP_SIZE_TOTAL= before the size as last line',
    `${JOB16}\nBACKUP_SIZE_TOTAL=1775942\n1775942\n`,
    false,
    {
      'rebase-era': { size: 1775942n, details: `${JOB16}\nBACKUP_SIZE_TOTAL=1775942\n1775942`, incrementalFallback: false },
      merged: {
        size: 1775942n,
        details: `${JOB16}\nBACKUP_SIZE_TOTAL=1775942\n1775942`,
        bitmapCreated: 'backup-1736035200',
        incrementalFallback: false,
      },
      newest: {
        size: 1775942n,
        details: `${JOB16}\nBACKUP_SIZE_TOTAL=1775942\n1775942`,
        bitmapCreated: 'backup-1736035200',
        incrementalFallback: false,
      },
    },
  ],
  [
    'W4: an unparseable size marker is size 0, still success',
    'BACKUP_SIZE_TOTAL=12 MiB\n5\n',
    false,
    {
      'rebase-era': { size: 5n, details: 'BACKUP_SIZE_TOTAL=12 MiB\n5', incrementalFallback: false },
      merged: { size: 5n, details: 'BACKUP_SIZE_TOTAL=12 MiB\n5', bitmapCreated: 'backup-1736035200', incrementalFallback: false },
      newest: { size: 0n, details: 'BACKUP_SIZE_TOTAL=12 MiB\n5', bitmapCreated: 'backup-1736035200', incrementalFallback: false },
    },
  ],
  [
    'stopped path: the first space-separated token of each line counts',
    '917504 root.qcow2\n1769472 datadisk.qcow2\n',
    true,
    {
      'rebase-era': { size: 2686976n, details: '917504 root.qcow2\n1769472 datadisk.qcow2', incrementalFallback: false },
      merged: {
        size: 2686976n,
        details: '917504 root.qcow2\n1769472 datadisk.qcow2',
        bitmapCreated: 'backup-1736035200',
        incrementalFallback: false,
      },
      newest: {
        size: 0n,
        details: '917504 root.qcow2\n1769472 datadisk.qcow2',
        bitmapCreated: 'backup-1736035200',
        incrementalFallback: false,
      },
    },
  ],
  [
    'stopped path, apache/cloudstack#13643: another ls layout',
    '-rw-r--r-- 1 0 0 917504 Jul  4 root.qcow2\n',
    true,
    {
      'rebase-era': { throws: 'java.lang.NumberFormatException: For input string: "-rw-r--r--"' },
      merged: { throws: 'java.lang.NumberFormatException: For input string: "-rw-r--r--"' },
      newest: {
        size: 0n,
        details: '-rw-r--r-- 1 0 0 917504 Jul  4 root.qcow2',
        bitmapCreated: 'backup-1736035200',
        incrementalFallback: false,
      },
    },
  ],
  [
    'stopped path: an empty line in the middle',
    '917504\n\n1769472\n',
    true,
    {
      'rebase-era': { throws: 'java.lang.NumberFormatException: For input string: ""' },
      merged: { throws: 'java.lang.NumberFormatException: For input string: ""' },
      newest: { size: 0n, details: '917504\n\n1769472', bitmapCreated: 'backup-1736035200', incrementalFallback: false },
    },
  ],
  [
    'stopped path: a blank line with a space has no first token',
    '917504\n \n1769472\n',
    true,
    {
      'rebase-era': { throws: 'java.lang.ArrayIndexOutOfBoundsException: Index 0 out of bounds for length 0' },
      merged: { throws: 'java.lang.ArrayIndexOutOfBoundsException: Index 0 out of bounds for length 0' },
      newest: { size: 0n, details: '917504\n \n1769472', bitmapCreated: 'backup-1736035200', incrementalFallback: false },
    },
  ],
  [
    'stopped path: Java long addition wraps',
    '9223372036854775807\n1\n',
    true,
    {
      'rebase-era': { size: -9223372036854775808n, details: '9223372036854775807\n1', incrementalFallback: false },
      merged: {
        size: -9223372036854775808n,
        details: '9223372036854775807\n1',
        bitmapCreated: 'backup-1736035200',
        incrementalFallback: false,
      },
      newest: { size: 0n, details: '9223372036854775807\n1', bitmapCreated: 'backup-1736035200', incrementalFallback: false },
    },
  ],
];

describe.each(PROFILE_NAMES)('TakeBackupCommand, exit 0, profile %s', (name) => {
  it.each(rows)('%s', (_n, stdout, stoppedVm, expected) => {
    const want = expected[name];
    const { answer, notes } = answerFor(PROFILES[name], take(), { exitCode: 0, stdout }, stoppedVm);
    if ('throws' in want) {
      // What the agent sends when the wrapper throws: a plain Answer with the stack trace (§2.3).
      expect(answer.cls).toBe('Answer');
      expect(answer.result).toBe(false);
      expect(answer.details).toBe(
        `${want.throws}\n\tat com.cloud.hypervisor.kvm.resource.wrapper.LibvirtTakeBackupCommandWrapper.execute(LibvirtTakeBackupCommandWrapper.java)\n`,
      );
      expect(notes.join('\n')).toMatch(/cannot parse this stdout/);
      return;
    }
    expect(answer.cls).toBe('BackupAnswer');
    const { size, details, bitmapCreated, bitmapRecreated, incrementalFallback } = answer as WireAnswer & Record<string, unknown>;
    expect({ result: answer.result, size, details, bitmapCreated, bitmapRecreated, incrementalFallback }).toEqual({
      result: true,
      bitmapCreated: undefined,
      bitmapRecreated: undefined,
      ...want,
    });
    if (name === 'newest' && want.size === 0n) expect(notes.join('\n')).toMatch(/BACKUP_SIZE_TOTAL=/);
  });
});

describe('bitmapCreated of a legacy-full backup', () => {
  it.each(PROFILE_NAMES)('%s: never a bitmap, even when the command carries bitmapNew', (name) => {
    const { answer } = answerFor(PROFILES[name], take({ mode: 'legacy-full' }), { exitCode: 0, stdout: `${JOB16}\n1775942\n` }, false);
    expect(answer).toMatchObject({ cls: 'BackupAnswer', result: true });
    expect(answer).not.toHaveProperty('bitmapCreated');
  });
  it("merged: full and incremental report the command's bitmapNew", () => {
    for (const mode of ['full', 'incremental']) {
      const { answer } = answerFor(PROFILES.merged, take({ mode }), { exitCode: 0, stdout: `${JOB16}\n1775942\n` }, false);
      expect(answer).toMatchObject({ bitmapCreated: 'backup-1736035200' });
    }
  });
});

describe('TakeBackupCommand failures: same in every generation', () => {
  const failures: Array<[string, ExecResult, { details: string; needsCleanup?: boolean }]> = [
    [
      'exit 1, message',
      { exitCode: 1, stdout: 'full mode requires --bitmap-new (the bitmap to create for the next incremental)\n' },
      { details: 'full mode requires --bitmap-new (the bitmap to create for the next incremental)' },
    ],
    ['exit 1, empty stdout (#10049)', { exitCode: 1, stdout: '' }, { details: '' }],
    [
      'exit 32, mount error',
      { exitCode: 32, stdout: 'mount.nfs: access denied by server while mounting 10.10.0.5:/export/backup\n' },
      { details: 'mount.nfs: access denied by server while mounting 10.10.0.5:/export/backup' },
    ],
    [
      'exit 20: needs cleanup',
      { exitCode: 20, stdout: 'Virsh backup job failed\nFailed to unmount /tmp/csbackup.Ab3xZ\nBackup cleanup failed\n' },
      { details: 'Virsh backup job failed\nFailed to unmount /tmp/csbackup.Ab3xZ\nBackup cleanup failed', needsCleanup: true },
    ],
    ['exit 21 is plain failure outside W2', { exitCode: 21, stdout: 'x\n' }, { details: 'x' }],
    ['agent timeout (-1, "timeout")', { exitCode: -1, stdout: 'timeout' }, { details: 'timeout' }],
  ];
  it.each(PROFILE_NAMES.flatMap((p) => failures.map((f) => [p, ...f] as const)))('%s: %s', (name, _n, exec, want) => {
    const { answer } = answerFor(PROFILES[name], take(), exec, false);
    expect(answer).toMatchObject({ cls: 'BackupAnswer', result: false, details: want.details });
    expect((answer as { needsCleanup?: boolean }).needsCleanup).toBe(want.needsCleanup);
    expect(answer).not.toHaveProperty('size');
  });
});

describe('wire answers equal the contract §8.3 examples for the golden outputs (rebase-era)', () => {
  it('golden backup-running-incremental-ok → the successful-incremental example', () => {
    const stdout =
      'Job type:         Completed   \nOperation:        Backup      \nTime elapsed:     133          ms\nFile processed:   128.000 KiB\nFile remaining:   0.000 B\nFile total:       128.000 KiB\n\n465222\nBITMAP_CREATED=backup-1736035200\n';
    const { answer } = answerFor(PROFILES['rebase-era'], take({ mode: 'incremental' }), { exitCode: 0, stdout });
    expect(encodeAnswers([answer])).toBe(EX.ANSWER_INCREMENTAL_OK);
  });

  it('exit 20 → the cleanup-failed example', () => {
    const { answer } = answerFor(PROFILES['rebase-era'], take(), {
      exitCode: 20,
      stdout: 'Virsh backup job failed\nFailed to unmount /tmp/csbackup.Ab3xZ\nBackup cleanup failed\n',
    });
    expect(encodeAnswers([answer])).toBe(EX.ANSWER_CLEANUP_FAILED);
  });

  it('golden stats-ok → the stats example, result=false included', () => {
    const stats: BackupCommand = {
      cls: 'GetBackupStorageStatsCommand',
      backupRepoType: 'nfs',
      backupRepoAddress: 'h:/e',
      wait: 0,
      bypassHostMaintenance: false,
    };
    const { answer } = answerFor(PROFILES['rebase-era'], stats, { exitCode: 0, stdout: '/tmp/csbackup.Ab3xZ\n104857600 52428800\n' });
    expect(encodeAnswers([answer])).toBe(EX.STATS_ANSWER);
  });
});

describe('Delete, Rebase and Stats wrappers', () => {
  const nas = { backupRepoType: 'nfs', backupRepoAddress: 'h:/e', wait: 0, bypassHostMaintenance: false };
  const del: BackupCommand = { cls: 'DeleteBackupCommand', backupPath: 'v/t', ...nas };
  const reb: BackupCommand = { cls: 'RebaseBackupCommand', targetPath: 'v/t2/root.x.qcow2', newBackingPath: 'v/t0/root.x.qcow2', ...nas };
  const stats: BackupCommand = { cls: 'GetBackupStorageStatsCommand', ...nas };

  it.each(PROFILE_NAMES)('%s: delete/rebase success carries no details (removed … lines are ignored)', (name) => {
    for (const cmd of [del, reb]) {
      const { answer } = answerFor(PROFILES[name], cmd, { exitCode: 0, stdout: "removed 'x'\n" });
      expect(encodeAnswers([answer])).toBe(EX.ANSWER_REBASE_OR_DELETE_OK);
    }
  });

  it('delete/rebase failure: the raw stdout, not trimmed; exit 20 is no special case', () => {
    for (const cmd of [del, reb]) {
      const { answer, notes } = answerFor(PROFILES['rebase-era'], cmd, {
        exitCode: 20,
        stdout: 'Failed to delete x\nBackup cleanup failed\n',
      });
      expect(answer).toEqual(
        expect.objectContaining({ cls: 'BackupAnswer', result: false, details: 'Failed to delete x\nBackup cleanup failed\n' }),
      );
      expect(answer).not.toHaveProperty('needsCleanup');
      if (cmd.cls === 'RebaseBackupCommand')
        expect(notes).toEqual([
          `Failed to rebase backup file v/t2/root.x.qcow2 onto v/t0/root.x.qcow2: Failed to delete x\nBackup cleanup failed\n`,
        ]);
    }
  });

  const statsRows: Array<[string, ExecResult, { total?: bigint; used?: bigint; details?: string } | { throws: string }]> = [
    [
      '1K blocks, unconverted; details: stdout as read',
      { exitCode: 0, stdout: '/tmp/csbackup.Ab3xZ\n104857600 52428800\n' },
      { total: 104857600n, used: 52428800n, details: '/tmp/csbackup.Ab3xZ\n104857600 52428800\n' },
    ],
    [
      'success: details keep trailing blanks (untrimmed)',
      { exitCode: 0, stdout: '/mp\n7 3 \n \n' },
      { total: 7n, used: 3n, details: '/mp\n7 3 \n \n' },
    ],
    [
      'failure: zero sizes, stdout as details',
      { exitCode: 32, stdout: 'mount.nfs: Connection timed out\n' },
      { total: 0n, used: 0n, details: 'mount.nfs: Connection timed out\n' },
    ],
    [
      'a mount warning shifts the tokens',
      { exitCode: 0, stdout: 'mount: warning\n/tmp/csbackup.Ab3xZ\n1 2\n' },
      { throws: 'java.lang.NumberFormatException: For input string: "warning"' },
    ],
    [
      'a leading empty line shifts them too',
      { exitCode: 0, stdout: '\n/tmp/csbackup.Ab3xZ\n1 2\n' },
      { throws: 'java.lang.NumberFormatException: For input string: "/tmp/csbackup.Ab3xZ"' },
    ],
    [
      'empty stdout',
      { exitCode: 0, stdout: '' },
      { throws: 'java.lang.ArrayIndexOutOfBoundsException: Index 1 out of bounds for length 1' },
    ],
    [
      'only one number',
      { exitCode: 0, stdout: '/mp\n7\n' },
      { throws: 'java.lang.ArrayIndexOutOfBoundsException: Index 2 out of bounds for length 2' },
    ],
  ];
  it.each(statsRows)('stats: %s', (_n, exec, want) => {
    const { answer } = answerFor(PROFILES.merged, stats, exec);
    if ('throws' in want) {
      expect(answer).toMatchObject({ cls: 'Answer', result: false });
      expect(answer.details).toBe(
        `${want.throws}\n\tat com.cloud.hypervisor.kvm.resource.wrapper.LibvirtGetBackupStatsCommandWrapper.execute(LibvirtGetBackupStatsCommandWrapper.java)\n`,
      );
      return;
    }
    expect(answer).toMatchObject({ cls: 'BackupStorageStatsAnswer', result: false, totalSize: want.total, usedSize: want.used });
    expect(answer.details).toBe(want.details);
  });
});

describe('properties', () => {
  const anyText = fc.oneof(
    fc.string({ unit: 'binary' }),
    fc
      .array(
        fc.oneof(
          fc.string(),
          fc.bigInt().map(String),
          fc.constantFrom('BITMAP_CREATED=b', 'INCREMENTAL_FALLBACK=true', 'BACKUP_SIZE_TOTAL=9', ''),
        ),
      )
      .map((l) => l.join('\n')),
  );
  const anyCmd = fc.constantFrom<BackupCommand>(
    take(),
    take({ mode: undefined, bitmapNew: undefined }),
    { cls: 'DeleteBackupCommand', backupPath: 'a/b', backupRepoType: 't', backupRepoAddress: 's', wait: 0, bypassHostMaintenance: false },
    {
      cls: 'RebaseBackupCommand',
      targetPath: 'a',
      newBackingPath: 'b',
      backupRepoType: 't',
      backupRepoAddress: 's',
      wait: 0,
      bypassHostMaintenance: false,
    },
    { cls: 'GetBackupStorageStatsCommand', backupRepoType: 't', backupRepoAddress: 's', wait: 0, bypassHostMaintenance: false },
  );

  it('output parsing never throws: every (exit code, stdout) gets an answer that serializes', () => {
    fc.assert(
      fc.property(
        fc.constantFrom(...PROFILE_NAMES),
        anyCmd,
        fc.integer({ min: -1, max: 255 }),
        anyText,
        fc.boolean(),
        (name, cmd, exitCode, stdout, stopped) => {
          const { answer } = answerFor(PROFILES[name], cmd, { exitCode, stdout }, stopped);
          expect(['BackupAnswer', 'BackupStorageStatsAnswer', 'Answer']).toContain(answer.cls);
          if (exitCode !== 0 || cmd.cls === 'GetBackupStorageStatsCommand') expect(answer.result).toBe(false);
          expect((answer as { needsCleanup?: boolean }).needsCleanup === true).toBe(cmd.cls === 'TakeBackupCommand' && exitCode === 20);
          expect(() => JSON.parse(encodeAnswers([answer]))).not.toThrow();
        },
      ),
    );
  });

  it('a successful BackupAnswer carries the whole stdout trimmed once as details, markers included, in every generation', () => {
    fc.assert(
      fc.property(fc.constantFrom(...PROFILE_NAMES), anyText, fc.boolean(), (name, stdout, stopped) => {
        const { answer } = answerFor(PROFILES[name], take(), { exitCode: 0, stdout }, stopped);
        if (answer.cls !== 'BackupAnswer') return; // the wrapper threw (§2.3)
        expect(answer.result).toBe(true);
        expect(answer.details).toBe(stdout.replace(/^[\x00-\x20]+/, '').replace(/[\x00-\x20]+$/, ''));
      }),
    );
  });

  it('the §5.2 running-VM layout (markers first, job block, BACKUP_SIZE_TOTAL=, size last) parses to the same size everywhere', () => {
    fc.assert(
      fc.property(
        fc.bigInt({ min: 0n, max: 2n ** 63n - 1n }),
        fc.constantFrom('', 'INCREMENTAL_FALLBACK=true\n'),
        fc.constantFrom(JOB16, JOB_EMPTY_INC),
        (size, marker, job) => {
          const stdout = `${marker}${job}\nBACKUP_SIZE_TOTAL=${size}\n${size}\n`;
          for (const name of PROFILE_NAMES) {
            const { answer } = answerFor(PROFILES[name], take(), { exitCode: 0, stdout }, false);
            expect(answer).toMatchObject({ cls: 'BackupAnswer', result: true, size, incrementalFallback: marker !== '' });
          }
        },
      ),
    );
  });

  it('stopped-VM integer lines sum in G1/G2/G3 like Java longs', () => {
    fc.assert(
      fc.property(fc.array(fc.bigInt({ min: 0n, max: 2n ** 40n }), { minLength: 1, maxLength: 5 }), (sizes) => {
        const stdout = `${sizes.join('\n')}\n`;
        const sum = sizes.reduce((a, b) => a + b, 0n);
        for (const name of ['rebase-era', 'merged'] as const) {
          expect(answerFor(PROFILES[name], take(), { exitCode: 0, stdout }, true).answer).toMatchObject({ size: sum });
        }
      }),
    );
  });
});
