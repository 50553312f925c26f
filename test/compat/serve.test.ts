// A whole agent request through compat with a fake script runner: what is run,
// what is answered, and that bad input runs nothing.
import fc from 'fast-check';
import { describe, expect, it, vi } from 'vitest';
import { decodeAnswers, DEFAULT_SCRIPT_PATH as S, PROFILES, serveRequest, type ExecResult, type ProfileName } from '../../compat/index.js';
import * as EX from './examples.js';

const P = 'org.apache.cloudstack.backup.';

function fakeRunner(results: ExecResult[] = []) {
  const queue = [...results];
  return vi.fn(async (_argv: readonly string[]): Promise<ExecResult> => queue.shift() ?? { exitCode: 0, stdout: '' });
}

const INC_OK_STDOUT =
  'Job type:         Completed   \nOperation:        Backup      \nTime elapsed:     133          ms\nFile processed:   128.000 KiB\nFile remaining:   0.000 B\nFile total:       128.000 KiB\n\n465222\nBITMAP_CREATED=backup-1736035200\n';

describe('serveRequest', () => {
  it('rebase-era: the contract TakeBackup example runs without parents (that wrapper only knows parentPath) and answers the example', async () => {
    const run = fakeRunner([{ exitCode: 0, stdout: INC_OK_STDOUT }]);
    const r = await serveRequest(EX.TAKE_BACKUP, { profile: PROFILES['rebase-era'], run });
    expect(run).toHaveBeenCalledTimes(1);
    expect(run.mock.calls[0]![0]).toEqual([
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
    ]);
    expect(r.wire).toBe(EX.ANSWER_INCREMENTAL_OK);
    expect(r.served[0]!.notes).toContain('profile rebase-era: the G1/G2 wrapper only knows parentPath; parentPaths ignored');
  });

  it('merged: the same command carries --parent-paths; G3 output is parsed the G3 way', async () => {
    const run = fakeRunner([{ exitCode: 0, stdout: 'INCREMENTAL_FALLBACK=true\nJob type:         Completed   \n\n1024\n' }]);
    const r = await serveRequest(EX.TAKE_BACKUP, { profile: PROFILES.merged, run, scriptPath: '/opt/s.sh' });
    expect(run.mock.calls[0]![0].slice(0, 1)).toEqual(['/opt/s.sh']);
    expect(run.mock.calls[0]![0].slice(-2)).toEqual([
      '--parent-paths',
      'i-2-10-VM/2025.01.01.00.00.00/root.b3f4c2a0-6d1e-4f7a-9c2b-1e5d8a7f3c01.qcow2',
    ]);
    expect(decodeAnswers(r.wire)).toEqual([
      expect.objectContaining({
        cls: 'BackupAnswer',
        result: true,
        size: 1024n,
        bitmapCreated: 'backup-1736035200',
        incrementalFallback: true,
        details: 'INCREMENTAL_FALLBACK=true\nJob type:         Completed   \n\n1024',
      }),
    ]);
  });

  it('the script stdout reaches the wrapper as readLine saw it (CRLF, no final newline)', async () => {
    const run = fakeRunner([{ exitCode: 1, stdout: 'a\r\nb' }]);
    const r = await serveRequest(EX.DELETE_BACKUP, { profile: PROFILES['rebase-era'], run });
    expect(r.served[0]!.exec).toEqual({ exitCode: 1, stdout: 'a\nb\n' });
    expect(decodeAnswers(r.wire)[0]).toMatchObject({ result: false, details: 'a\nb\n' });
  });

  it('several commands run in order and are answered in order', async () => {
    const text = `[${[EX.DELETE_BACKUP, EX.REBASE_BACKUP].map((t) => t.slice(1, -1)).join(',')},{"${P}GetBackupStorageStatsCommand":{"backupRepoType":"nfs","backupRepoAddress":"h:/e"}}]`;
    const run = fakeRunner([
      { exitCode: 0, stdout: '' },
      { exitCode: 1, stdout: 'Rebase target file does not exist: x\n' },
      { exitCode: 0, stdout: '/mp\n10 5\n' },
    ]);
    const r = await serveRequest(text, { profile: PROFILES['rebase-era'], run });
    expect(run.mock.calls.map((c) => c[0][2])).toEqual(['delete', 'rebase', 'stats']);
    expect(run.mock.calls[1]![0]).toContain('vers=4.1'); // \u003d decoded
    expect(decodeAnswers(r.wire)).toEqual([
      expect.objectContaining({ cls: 'BackupAnswer', result: true }),
      expect.objectContaining({ cls: 'BackupAnswer', result: false, details: 'Rebase target file does not exist: x\n' }),
      expect.objectContaining({ cls: 'BackupStorageStatsAnswer', result: false, totalSize: 10n, usedSize: 5n }),
    ]);
  });

  it.each(['merged', 'newest'] as const)('%s: a RebaseBackupCommand is refused and nothing runs', async (name) => {
    const run = fakeRunner();
    const r = await serveRequest(EX.REBASE_BACKUP, { profile: PROFILES[name], run });
    expect(run).not.toHaveBeenCalled();
    expect(decodeAnswers(r.wire)).toEqual([
      expect.objectContaining({ cls: 'BackupAnswer', result: false, details: expect.stringMatching(/not handled by the .* profile/) }),
    ]);
  });

  it('a wrapper that throws before running (short pool list) runs nothing and answers a plain Answer', async () => {
    const text = `[{"${P}TakeBackupCommand":{"vmName":"v","backupPath":"v/t","backupRepoType":"nfs","backupRepoAddress":"h:/e","volumePaths":["/mnt/p/a","/mnt/p/b"],"volumePools":[{"poolType":"NetworkFilesystem"}]}}]`;
    const run = fakeRunner();
    const r = await serveRequest(text, { profile: PROFILES['rebase-era'], run });
    expect(run).not.toHaveBeenCalled();
    expect(r.wire).toMatch(
      /^\[\{"com\.cloud\.agent\.api\.Answer":\{"result":false,"details":"java\.lang\.IndexOutOfBoundsException: Index 1 out of bounds for length 1\\n\\tat /,
    );
  });

  it('a runner that fails becomes (-1, "execute.error")', async () => {
    const run = vi.fn(async () => {
      throw new Error('boom');
    });
    const r = await serveRequest(EX.DELETE_BACKUP, { profile: PROFILES['rebase-era'], run });
    expect(decodeAnswers(r.wire)[0]).toMatchObject({ result: false, details: 'execute.error' });
    expect(r.served[0]!.notes).toContain('running the operation failed: boom');
  });
});

describe('bad input: an answer with result=false, a clear details, nothing executed', () => {
  const cases: Array<[string, string, RegExp]> = [
    ['malformed JSON', '[{"', /^nasbackup agent: Malformed JSON at end of input: .*; nothing was executed$/],
    ['not an array', '{}', /Expected a JSON array of commands/],
    ['empty array', '[]', /The command array is empty/],
    [
      'unknown class',
      '[{"org.apache.cloudstack.backup.RestoreBackupCommand":{}}]',
      /Unknown command class "org\.apache\.cloudstack\.backup\.RestoreBackupCommand"/,
    ],
    [
      'missing field',
      `[{"${P}DeleteBackupCommand":{"backupRepoType":"nfs","backupRepoAddress":"h"}}]`,
      /DeleteBackupCommand is missing the required field "backupPath"/,
    ],
  ];
  it.each(cases)('%s', async (_n, text, details) => {
    const run = fakeRunner();
    const r = await serveRequest(text, { profile: PROFILES['rebase-era'], run });
    expect(run).not.toHaveBeenCalled();
    const answers = decodeAnswers(r.wire);
    expect(answers).toHaveLength(1);
    expect(answers[0]).toMatchObject({ cls: 'BackupAnswer', result: false });
    expect(answers[0]!.details).toMatch(details);
  });

  it('one bad element stops the whole request; a stats command still gets a stats answer', async () => {
    const text = `[{"${P}GetBackupStorageStatsCommand":{"backupRepoType":"nfs","backupRepoAddress":"h"}},{"${P}RebaseBackupCommand":{"targetPath":"a"}}]`;
    const run = fakeRunner();
    const r = await serveRequest(text, { profile: PROFILES['rebase-era'], run });
    expect(run).not.toHaveBeenCalled();
    expect(decodeAnswers(r.wire)).toEqual([
      expect.objectContaining({
        cls: 'BackupStorageStatsAnswer',
        result: false,
        totalSize: 0n,
        details: expect.stringMatching(/command 0 was not run because command 1 of the same request is invalid/),
      }),
      expect.objectContaining({
        cls: 'BackupAnswer',
        result: false,
        details: expect.stringMatching(/missing the required field "newBackingPath"/),
      }),
    ]);
  });

  it('never rejects, and runs something only for a valid request (property)', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.oneof(fc.string({ unit: 'binary' }), fc.json()),
        fc.constantFrom(...(Object.keys(PROFILES) as ProfileName[])),
        async (text, name) => {
          const run = fakeRunner();
          const r = await serveRequest(text, { profile: PROFILES[name], run });
          const answers = decodeAnswers(r.wire);
          expect(answers.length).toBeGreaterThan(0);
          if (run.mock.calls.length === 0)
            expect(answers.every((a) => a.result === false || a.cls === 'BackupStorageStatsAnswer')).toBe(true);
        },
      ),
    );
  });
});
