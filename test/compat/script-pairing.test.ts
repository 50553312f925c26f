// The two halves of the contract meet here: what our script prints for a backup
// (lib/agent-output.ts, per NASBACKUP_AGENT_PROFILE) must be read by the paired
// wrapper model (compat) as the size, fallback and bitmap the script meant.
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { answerFor, PROFILES, type ProfileName, type TakeBackupCommand } from '../../compat/index.js';
import { runningBackupText, stoppedBackupText, type BackupReport } from '../../lib/agent-output.js';

const cmd: TakeBackupCommand = {
  cls: 'TakeBackupCommand',
  vmName: 'i-2-10-VM',
  backupPath: 'i-2-10-VM/2025.01.04.00.00.00',
  backupRepoType: 'nfs',
  backupRepoAddress: 'h:/e',
  mode: 'incremental',
  bitmapNew: 'backup-1736035200',
  wait: 0,
  bypassHostMaintenance: false,
};
const JOB = 'Job type:         Completed   \nOperation:        Backup      \nTime elapsed:     133          ms\n\n';

const report = (profile: ProfileName) =>
  fc.record({
    profile: fc.constant(profile),
    fallbackReason: fc.option(fc.constantFrom('VM stopped — incremental requires running VM', 'parent checkpoint missing on a disk'), {
      nil: null,
    }),
    bitmapCreated: fc.option(fc.constant('backup-1736035200'), { nil: null }),
    warnings: fc.array(fc.constantFrom('Quiesce failed: guest agent not responding; the backup is crash-consistent'), { maxLength: 1 }),
    totalBytes: fc.constant(0n),
  });

describe.each(Object.keys(PROFILES) as ProfileName[])('script output for profile %s, read by the %s wrapper model', (name) => {
  const expectedBitmap = (r: BackupReport): string | undefined => (name === 'rebase-era' ? (r.bitmapCreated ?? undefined) : cmd.bitmapNew);

  it('running VM', () => {
    fc.assert(
      fc.property(report(name), fc.bigInt({ min: 0n, max: 2n ** 62n }), (r, total) => {
        const rep: BackupReport = { ...r, totalBytes: total };
        const { answer } = answerFor(PROFILES[name], cmd, { exitCode: 0, stdout: runningBackupText(rep, JOB) }, false);
        expect(answer).toMatchObject({ cls: 'BackupAnswer', result: true, size: total, incrementalFallback: rep.fallbackReason !== null });
        expect((answer as { bitmapCreated?: string }).bitmapCreated).toBe(expectedBitmap(rep));
      }),
    );
  });

  it('stopped VM', () => {
    fc.assert(
      fc.property(report(name), fc.array(fc.bigInt({ min: 0n, max: 2n ** 40n }), { minLength: 1, maxLength: 4 }), (r, sizes) => {
        const total = sizes.reduce((a, b) => a + b, 0n);
        const rep: BackupReport = { ...r, warnings: [], totalBytes: total };
        const { answer } = answerFor(
          PROFILES[name],
          cmd,
          {
            exitCode: 0,
            stdout: stoppedBackupText(
              rep,
              sizes.map((size, i) => ({ name: `disk${i}`, size })),
            ),
          },
          true,
        );
        expect(answer).toMatchObject({ cls: 'BackupAnswer', result: true, size: total, incrementalFallback: rep.fallbackReason !== null });
        expect((answer as { bitmapCreated?: string }).bitmapCreated).toBe(expectedBitmap(rep));
      }),
    );
  });
});
