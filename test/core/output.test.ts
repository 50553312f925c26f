// lib/output.ts: one renderer for every command. The agent's bytes come out exactly as
// lib/agent-output.ts formats them; operators get NAS-relative names; every --json run is
// one envelope; one exit-code precedence for several failures.
import { describe, expect, it } from 'vitest';
import { runningBackupText, stoppedBackupText, type BackupReport } from '../../lib/agent-output.js';
import { EXIT_CLEANUP_FAILED, EXIT_OK, exitCodeOf, NasbackupError, WARNING_CODES, withResult } from '../../lib/errors.js';
import {
  backupRenderer,
  deleteRenderer,
  envelope,
  NasNames,
  render,
  renderFailure,
  type BackupResult,
  type DeleteResult,
} from '../../lib/output.js';
import * as protocol from '../../compat/protocol.js';

const MP = '/tmp/csbackup.Ab12Cd';
const MOUNTS = [{ mountPoint: MP, address: '10.0.0.5:/export' }];
const FILE = 'i-2-10-VM/2025.01.03.00.00.00/root.5f1c.qcow2';

function capture(): { out: { write(t: string): void }; text: () => string } {
  let text = '';
  return { out: { write: (t) => void (text += t) }, text: () => text };
}

describe('exitCodeOf: one precedence for several failures', () => {
  const cleanup = new NasbackupError('NAS_CLEANUP_FAILED', 'umount failed');
  const op = new NasbackupError('CONVERT_FAILED', 'qemu-img convert failed');
  it.each([
    ['nothing failed', [], EXIT_OK],
    ['one failure', [op], 1],
    ['a mount left behind outranks the failure before it', [op, cleanup], EXIT_CLEANUP_FAILED],
    ['… and after it', [cleanup, op], EXIT_CLEANUP_FAILED],
  ])('%s', (_n, errors, code) => {
    expect(exitCodeOf(errors)).toBe(code);
  });

  it('the shared constants are defined once, in the leaf lib/protocol.ts', () => {
    expect(protocol.EXIT_CLEANUP_FAILED).toBe(20);
    expect(EXIT_CLEANUP_FAILED).toBe(protocol.EXIT_CLEANUP_FAILED);
    expect(protocol.AGENT_PROFILES).toEqual(['rebase-era', 'merged', 'newest']);
  });
});

describe('the JSON envelope', () => {
  it('success: ok, command, the fields, empty errors and warnings', () => {
    expect(JSON.parse(envelope('stats', { storage: 'h:/e' }, [], []))).toEqual({
      ok: true,
      command: 'stats',
      storage: 'h:/e',
      errors: [],
      warnings: [],
    });
  });

  it('failure: ok false, every error with code/message/details/exitCode, one line', () => {
    const text = envelope(
      'delete',
      {},
      [new NasbackupError('DELETE_FAILED', 'Failed', { details: 'EBUSY' })],
      [{ code: 'LEAKED_CLUSTERS', message: 'm' }],
    );
    expect(text.split('\n')).toHaveLength(2);
    expect(JSON.parse(text)).toEqual({
      ok: false,
      command: 'delete',
      errors: [{ code: 'DELETE_FAILED', message: 'Failed', details: 'EBUSY', exitCode: 1 }],
      warnings: [{ code: 'LEAKED_CLUSTERS', message: 'm' }],
    });
  });

  it('a failure before anything ran has the same shape', () => {
    const c = capture();
    expect(renderFailure(c.out, 'json', 'nasbackup', [new NasbackupError('INVALID_SETTING', 'Invalid NASBACKUP_LOCK_WAIT: x')])).toBe(1);
    expect(JSON.parse(c.text())).toMatchObject({ ok: false, command: 'nasbackup', errors: [{ code: 'INVALID_SETTING' }], warnings: [] });
  });
});

describe('NAS-relative names for operators', () => {
  const nas = new NasNames(MOUNTS);
  it('a path below the mount point is named on the NAS', () => {
    expect(nas.rel(`${MP}/${FILE}`)).toBe(FILE);
    expect(nas.rel('/elsewhere/x')).toBe('/elsewhere/x');
    expect(nas.text(`Rebase target file does not exist: ${MP}/${FILE}`)).toBe(
      `Rebase target file does not exist: ${FILE} on 10.0.0.5:/export`,
    );
    expect(nas.text(`Refusing to delete ${MP}/${FILE}: it is a symbolic link.`)).toBe(
      `Refusing to delete ${FILE} on 10.0.0.5:/export: it is a symbolic link.`,
    );
  });

  it('operator text and JSON never name the mount point; the agent text keeps the contract bytes', () => {
    const err = new NasbackupError('FILE_NOT_FOUND', `Rebase target file does not exist: ${MP}/${FILE}`);
    const outcome = { errors: [err], mounts: MOUNTS };
    const r = { command: 'rebase', fields: () => ({}) };
    const agent = capture();
    render(agent.out, 'agent', r, outcome);
    expect(agent.text()).toBe(`Rebase target file does not exist: ${MP}/${FILE}\n`);
    const json = capture();
    render(json.out, 'json', r, outcome);
    expect(json.text()).not.toContain(MP);
    expect(JSON.parse(json.text()).errors[0].message).toBe(`Rebase target file does not exist: ${FILE} on 10.0.0.5:/export`);
  });

  it('a mount point left behind is named as it is (it still exists)', () => {
    const err = new NasbackupError('NAS_CLEANUP_FAILED', `Failed to remove mount point ${MP}/: busy`);
    const c = capture();
    expect(render(c.out, 'text', { command: 'chain list', fields: () => ({}) }, { errors: [err], mounts: MOUNTS })).toBe(20);
    expect(c.text()).toContain(MP);
  });
});

describe('the agent bytes come from the one renderer, unchanged', () => {
  const report: BackupReport = {
    profile: 'rebase-era',
    fallbackReason: null,
    bitmapCreated: 'backup-2',
    warnings: ['Quiesce skipped: VM v is paused, its disks are already quiet'],
    totalBytes: 465222n,
  };
  const job = 'Job type:         Completed   \nOperation:        Backup      \n\n';
  const files = [
    { name: 'root.a.qcow2', size: 851968n },
    { name: 'datadisk.b.qcow2', size: 1638400n },
  ];
  const result = (format: 'running' | 'stopped'): BackupResult => ({
    vm: 'v',
    path: 'v/2025.01.01.00.00.00',
    mode: 'full',
    format,
    report,
    warnings: [{ code: 'QUIESCE_SKIPPED', message: report.warnings[0]! }],
    jobBlock: job,
    files,
  });

  it.each(['running', 'stopped'] as const)('%s format', (format) => {
    const c = capture();
    expect(render(c.out, 'agent', backupRenderer, { result: result(format), errors: [], mounts: MOUNTS })).toBe(0);
    expect(c.text()).toBe(format === 'running' ? runningBackupText(report, job) : stoppedBackupText(report, files));
  });

  it('--json: the fields, and the warnings with their stable codes', () => {
    const c = capture();
    render(c.out, 'json', backupRenderer, { result: result('stopped'), errors: [], mounts: MOUNTS });
    const o = JSON.parse(c.text());
    expect(o).toMatchObject({
      ok: true,
      command: 'backup',
      format: 'stopped',
      bitmapCreated: 'backup-2',
      fileSizes: [1638400, 851968],
      totalBytes: 465222,
    });
    expect(o.warnings).toEqual([{ code: 'QUIESCE_SKIPPED', message: report.warnings[0] }]);
    for (const w of o.warnings) expect(WARNING_CODES).toContain(w.code);
  });

  it('a delete that failed half-way: the rm -v lines of what went, then the error (as before)', () => {
    const partial: DeleteResult = { path: 'v/t', removed: [{ path: `${MP}/v/t/a`, directory: false }] };
    const err = withResult(
      new NasbackupError('DELETE_FAILED', `Refusing to delete ${MP}/v/t/m: another filesystem is mounted there`),
      partial,
    );
    const c = capture();
    expect(render(c.out, 'agent', deleteRenderer, { errors: [err], mounts: MOUNTS })).toBe(1);
    expect(c.text()).toBe(`removed '${MP}/v/t/a'\nRefusing to delete ${MP}/v/t/m: another filesystem is mounted there\n`);
    const j = capture();
    render(j.out, 'json', deleteRenderer, { errors: [err], mounts: MOUNTS });
    expect(JSON.parse(j.text())).toMatchObject({
      ok: false,
      removedFiles: ['v/t/a'],
      errors: [{ code: 'DELETE_FAILED', message: 'Refusing to delete v/t/m on 10.0.0.5:/export: another filesystem is mounted there' }],
    });
  });
});
