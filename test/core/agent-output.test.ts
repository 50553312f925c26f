// The backup stdout formats, read the way each agent generation reads them (docs/agent-contract.md
// §5.2): the rebase-era and merged wrappers take the LAST line as the size of a
// running-VM backup and sum EVERY remaining line of a stopped-VM backup; the newest
// reads BACKUP_SIZE_TOTAL=. A format any of them cannot parse fails the backup on the
// management server, so these are checked as properties, not only by example.
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import {
  AGENT_PROFILES,
  runningBackupText,
  STOPPED_FALLBACK_REASON,
  stoppedBackupText,
  type AgentProfile,
  type BackupReport,
} from '../../lib/agent-output.js';

/** Java's Long.parseLong: an optional sign and decimal digits, within 64 bits. */
function parseLong(s: string): bigint {
  if (!/^[+-]?\d+$/.test(s)) throw new Error(`NumberFormatException: For input string: "${s}"`);
  const v = BigInt(s);
  if (v > 2n ** 63n - 1n || v < -(2n ** 63n)) throw new Error(`NumberFormatException: For input string: "${s}"`);
  return v;
}

/** What the wrapper keeps of stdout before parsing the size (trim, drop its marker lines, trim). */
function kept(profile: AgentProfile, stdout: string): string[] {
  const markers = profile === 'rebase-era' ? ['BITMAP_CREATED=', 'BITMAP_RECREATED=', 'INCREMENTAL_FALLBACK='] : ['INCREMENTAL_FALLBACK'];
  const lines = stdout
    .trim()
    .split('\n')
    .filter((l) => !markers.some((m) => l.trim().startsWith(m)));
  return lines.join('\n').trim().split('\n');
}

/** The size each generation takes from a successful backup's stdout. */
function agentSize(profile: AgentProfile, stdout: string, stopped: boolean): bigint {
  if (profile === 'newest') {
    const line = stdout.split('\n').find((l) => l.startsWith('BACKUP_SIZE_TOTAL='));
    if (!line) throw new Error('no BACKUP_SIZE_TOTAL=');
    return parseLong(line.slice('BACKUP_SIZE_TOTAL='.length));
  }
  const lines = kept(profile, stdout);
  if (!stopped) return parseLong(lines.at(-1)!.trim());
  return lines.reduce((sum, l) => sum + parseLong(l.split(' ')[0]!.trim()), 0n);
}

const report = (o: Partial<BackupReport> = {}): BackupReport => ({
  profile: 'rebase-era',
  fallbackReason: null,
  bitmapCreated: null,
  warnings: [],
  totalBytes: 1775942n,
  ...o,
});

const JOB =
  'Job type:         Completed   \nOperation:        Backup      \nTime elapsed:     133          ms\n' +
  'File processed:   16.000 MiB\nFile remaining:   0.000 B\nFile total:       16.000 MiB\n\n';

describe('running-VM backup text', () => {
  it('rebase-era, as the original prints it: the job block, the du total, BITMAP_CREATED last', () => {
    expect(runningBackupText(report({ bitmapCreated: 'backup-1736035200' }), JOB)).toBe(
      JOB + '1775942\nBITMAP_CREATED=backup-1736035200\n',
    );
  });
  it('markers and warnings first; merged has no BITMAP_CREATED; newest adds BACKUP_SIZE_TOTAL= before the total', () => {
    const r = {
      fallbackReason: 'parent bitmap b missing on disk vdb',
      bitmapCreated: 'n',
      warnings: ['Quiesce failed, backup is crash-consistent: x'],
    };
    expect(runningBackupText(report(r), JOB)).toBe(
      'INCREMENTAL_FALLBACK=full (parent bitmap b missing on disk vdb)\nQuiesce failed, backup is crash-consistent: x\n' +
        JOB +
        '1775942\nBITMAP_CREATED=n\n',
    );
    expect(runningBackupText(report({ ...r, profile: 'merged' }), JOB)).toBe(
      'INCREMENTAL_FALLBACK=true\nQuiesce failed, backup is crash-consistent: x\n' + JOB + '1775942\n',
    );
    expect(runningBackupText(report({ ...r, profile: 'newest' }), JOB)).toBe(
      'INCREMENTAL_FALLBACK=true\nQuiesce failed, backup is crash-consistent: x\n' + JOB + 'BACKUP_SIZE_TOTAL=1775942\n1775942\n',
    );
  });
  it('a job block without its final newline still ends its line', () => {
    expect(runningBackupText(report(), 'Job type:         Completed   ')).toBe('Job type:         Completed   \n1775942\n');
  });
});

describe('stopped-VM backup text', () => {
  const ROOT = 'root.b3f4c2a0-6d1e-4f7a-9c2b-1e5d8a7f3c01.qcow2';
  const DATA = 'datadisk.c9e8d7f6-2a3b-4c5d-8e9f-0a1b2c3d4e02.qcow2';
  // -d order (root first), as the backup wrote them; the lines come in `ls` order.
  const files = [
    { name: ROOT, size: 1769472n },
    { name: DATA, size: 917504n },
  ];
  it('one integer per line, no empty line (the original printed one, from ls)', () => {
    expect(stoppedBackupText(report(), files)).toBe('917504\n1769472\n');
    expect(stoppedBackupText(report({ fallbackReason: STOPPED_FALLBACK_REASON, bitmapCreated: 'backup-1736035200' }), files)).toBe(
      'INCREMENTAL_FALLBACK=full (VM stopped — incremental requires running VM)\nBITMAP_CREATED=backup-1736035200\n917504\n1769472\n',
    );
    expect(
      stoppedBackupText(report({ profile: 'merged', fallbackReason: STOPPED_FALLBACK_REASON, bitmapCreated: 'b' }), [
        { name: 'root.x', size: 1n },
        { name: 'datadisk.y', size: 2n },
      ]),
    ).toBe('INCREMENTAL_FALLBACK=true\n2\n1\n');
    expect(stoppedBackupText(report({ profile: 'newest', totalBytes: 2690880n }), files)).toBe(
      'BACKUP_SIZE_TOTAL=2690880\n917504\n1769472\n',
    );
  });

  it('sizes in the order `ls` lists the folder in the C locale: byte order of the names, whatever order they were written in', () => {
    const many = [
      { name: 'root.b.qcow2', size: 1n },
      { name: 'datadisk.c.qcow2', size: 2n },
      { name: 'datadisk.a.qcow2', size: 3n },
      { name: 'datadisk.B.qcow2', size: 4n }, // upper case sorts before lower case in C
      { name: 'datadisk.é.qcow2', size: 5n }, // UTF-8 bytes above every ASCII letter
    ];
    expect(stoppedBackupText(report(), many)).toBe('4\n3\n2\n5\n1\n');
    expect(stoppedBackupText(report(), [...many].reverse())).toBe('4\n3\n2\n5\n1\n');
  });
});

// ---------------------------------------------------------------- properties

const profile = fc.constantFrom<AgentProfile>(...AGENT_PROFILES);
const bytes = fc.bigInt({ min: 0n, max: 2n ** 53n });
/** One line of operator text: no newline, not starting like a marker. */
const line = fc
  .string({ minLength: 0, maxLength: 60 })
  .filter((s) => !/[\r\n]/.test(s) && !/^\s*(BITMAP_|INCREMENTAL_|BACKUP_SIZE)/.test(s));
const name = fc.stringMatching(/^[A-Za-z0-9][A-Za-z0-9._:+-]{0,30}$/);
/** A domjobinfo --completed block: `Key:  value` lines, then virsh's empty line. */
const jobBlock = fc
  .array(fc.tuple(fc.stringMatching(/^[A-Z][a-z ]{0,15}$/), fc.stringMatching(/^[\w. ]{0,20}$/)), { minLength: 1, maxLength: 8 })
  .map((kvs) => kvs.map(([k, v]) => `${`${k}:`.padEnd(17)} ${v}`).join('\n') + '\n\n');
const anyReport = fc.record({
  profile,
  fallbackReason: fc.option(line, { nil: null }),
  bitmapCreated: fc.option(name, { nil: null }),
  warnings: fc.array(line, { maxLength: 3 }),
  totalBytes: bytes,
});

describe('properties', () => {
  it('running VM: every generation reads the decimal total; merged and newest find it on the very last line', () => {
    fc.assert(
      fc.property(anyReport, jobBlock, (r, block) => {
        const out = runningBackupText(r, block);
        expect(out.endsWith('\n')).toBe(true);
        expect(agentSize(r.profile, out, false)).toBe(r.totalBytes);
        const last = out.trimEnd().split('\n').at(-1)!;
        if (r.profile !== 'rebase-era' || r.bitmapCreated === null) expect(last).toBe(String(r.totalBytes));
        else expect(last).toBe(`BITMAP_CREATED=${r.bitmapCreated}`);
        if (r.profile === 'newest') {
          const lines = out.trimEnd().split('\n');
          expect(lines.at(-2)).toBe(`BACKUP_SIZE_TOTAL=${r.totalBytes}`);
          expect(lines.filter((l) => l.startsWith('BACKUP_SIZE_TOTAL='))).toHaveLength(1);
        }
        // Fallback detection: any INCREMENTAL_FALLBACK= line (rebase-era), the literal =true (later ones).
        const fell = r.profile === 'rebase-era' ? /^INCREMENTAL_FALLBACK=/m.test(out) : out.includes('INCREMENTAL_FALLBACK=true');
        expect(fell).toBe(r.fallbackReason !== null);
      }),
      { numRuns: 500 },
    );
  });

  it('stopped VM: every line a rebase-era or merged wrapper keeps is an integer, and they sum to the file sizes', () => {
    fc.assert(
      fc.property(anyReport, fc.array(bytes, { minLength: 1, maxLength: 6 }), (r, sizes) => {
        const out = stoppedBackupText(
          r,
          sizes.map((size, i) => ({ name: `${i === 0 ? 'root' : 'datadisk'}.v${i}.qcow2`, size })),
        );
        expect(out).not.toContain('\n\n');
        expect(out.startsWith('\n')).toBe(false);
        const total = sizes.reduce((a, b) => a + b, 0n);
        if (r.profile === 'newest') {
          expect(agentSize('newest', out, true)).toBe(r.totalBytes);
        } else {
          for (const l of kept(r.profile, out)) expect(() => parseLong(l.split(' ')[0]!.trim())).not.toThrow();
          expect(agentSize(r.profile, out, true)).toBe(total);
        }
        // The newest wrapper's size line never confuses the older ones' sum: it is only there for newest.
        expect(out.includes('BACKUP_SIZE_TOTAL=')).toBe(r.profile === 'newest');
        expect(out.includes('BITMAP_CREATED=')).toBe(r.profile === 'rebase-era' && r.bitmapCreated !== null);
      }),
      { numRuns: 500 },
    );
  });
});
