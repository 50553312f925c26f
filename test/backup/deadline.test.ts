// Deadlines that follow the data (apache/cloudstack#13883), heartbeats, the free-space
// estimates and the decision to resume a paused VM: pure functions, no process.
import { execFileSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { loadConfig } from '../../lib/config.js';
import { copyDeadline, deadlinePolicy, fmtBytes, Heartbeat, type DeadlinePolicy } from '../../lib/ops/backup/deadline.js';
import { allocatedBytes, needed, runningEstimate, total } from '../../lib/ops/backup/space.js';
import { pauseDecision } from '../../lib/ops/backup/running.js';
import { makeImage } from '../helpers/qemu.js';
import { removeTempDirs, tempDir } from '../helpers/tmp.js';

afterAll(removeTempDirs);

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;
const policy = (o: Partial<DeadlinePolicy> = {}): DeadlinePolicy => ({
  baseMs: 600_000,
  minRateBytesPerSec: 10 * MiB,
  capMs: null,
  agentTimeoutMs: null,
  ...o,
});

describe('copyDeadline', () => {
  it('grows with the data: base + bytes at the minimum rate, no fixed ceiling (a 2 TiB disk gets its 58 h)', () => {
    expect(copyDeadline(0, policy()).ms).toBe(600_000);
    expect(copyDeadline(10 * GiB, policy()).ms).toBe(600_000 + 1024_000);
    const big = copyDeadline(2 * 1024 * GiB, policy());
    expect(big.ms).toBe(600_000 + 209_715_200);
    expect(big.ms).toBeGreaterThan(58 * 3600_000); // not the 2 h cmds.timeout, not the 1 h of #13883
    expect(big.why).toBe('2.0 TiB at 10.0 MiB/s + 10 min 0 s');
  });

  it('an unknown size: the base alone (the job then reports its total)', () => {
    expect(copyDeadline(null, policy()).ms).toBe(600_000);
  });

  it("bounded by the agent's timeout less cleanup time, when the operator gives it", () => {
    const d = copyDeadline(2 * 1024 * GiB, policy({ agentTimeoutMs: 7200_000 }));
    expect(d.ms).toBe(7200_000 - 60_000);
    expect(d.why).toMatch(/^the agent's timeout of 2 h 0 min less cleanup time \(2\.0 TiB at 10\.0 MiB\/s/);
    // A short agent timeout keeps a tenth for cleanup.
    expect(copyDeadline(10 * GiB, policy({ agentTimeoutMs: 300_000 })).ms).toBe(270_000);
    // A small copy well inside the agent's timeout keeps its own deadline.
    expect(copyDeadline(MiB, policy({ agentTimeoutMs: 7200_000 })).ms).toBe(600_000 + 100);
  });

  it('NASBACKUP_JOB_TIMEOUT caps it when set', () => {
    expect(copyDeadline(10 * GiB, policy({ capMs: 2000 })).ms).toBe(2000);
    expect(copyDeadline(0, policy({ capMs: 7200_000 })).ms).toBe(600_000);
  });

  it('from the configuration: defaults and knobs', () => {
    expect(deadlinePolicy(loadConfig({}))).toEqual(policy());
    const c = loadConfig({
      NASBACKUP_JOB_MIN_RATE: '2.5',
      NASBACKUP_JOB_BASE: '30',
      NASBACKUP_AGENT_TIMEOUT: '3600',
      NASBACKUP_JOB_TIMEOUT: '',
      NASBACKUP_HEARTBEAT_INTERVAL: '0.5',
      NASBACKUP_SPACE_CHECK: 'false',
      NASBACKUP_SPACE_MARGIN: '0',
    });
    expect(deadlinePolicy(c)).toEqual({ baseMs: 30_000, minRateBytesPerSec: 2.5 * MiB, capMs: null, agentTimeoutMs: 3600_000 });
    expect(c).toMatchObject({ heartbeatMs: 500, spaceCheck: false, spaceMarginPct: 0 });
    expect(loadConfig({})).toMatchObject({ heartbeatMs: 60_000, spaceCheck: true, spaceMarginPct: 10, jobTimeoutMs: null });
    for (const [k, v] of [
      ['NASBACKUP_JOB_MIN_RATE', '0'],
      ['NASBACKUP_JOB_MIN_RATE', 'fast'],
      ['NASBACKUP_SPACE_MARGIN', '-1'],
      ['NASBACKUP_SPACE_CHECK', 'maybe'],
      ['NASBACKUP_AGENT_TIMEOUT', '0'],
    ] as const) {
      expect(() => loadConfig({ [k]: v })).toThrow(new RegExp(`Invalid ${k}`));
    }
  });
});

describe('Heartbeat', () => {
  it('one line per interval: bytes done of the total, the rate since the last one, the ETA at that rate', () => {
    let t = 0;
    const lines: string[] = [];
    const hb = new Heartbeat(
      'Backup of vm',
      10_000,
      (l) => lines.push(l),
      () => t,
    );
    t = 4000;
    hb.update(40 * MiB, 400 * MiB); // not due yet
    expect(lines).toEqual([]);
    t = 10_000;
    hb.update(100 * MiB, 400 * MiB);
    t = 15_000;
    hb.tick(); // not due
    t = 20_000;
    hb.update(150 * MiB, 400 * MiB);
    expect(lines).toEqual([
      'Backup of vm: 100.0 MiB of 400.0 MiB (25%) after 10 s, 10.0 MiB/s, ETA 30 s',
      'Backup of vm: 150.0 MiB of 400.0 MiB (37%) after 20 s, 5.0 MiB/s, ETA 50 s',
    ]);
  });

  it('no numbers from the job: still a line, ETA unknown', () => {
    let t = 0;
    const lines: string[] = [];
    const hb = new Heartbeat(
      'Copy',
      1000,
      (l) => lines.push(l),
      () => t,
    );
    t = 1500;
    hb.tick();
    expect(lines).toEqual(['Copy: 0 B after 2 s, 0 B/s, ETA unknown']);
  });
});

describe('free-space estimates', () => {
  it('a qcow2 disk: the data of its whole chain (what a flattening copy writes), natively', async () => {
    const dir = tempDir('estimate');
    const base = join(dir, 'base.qcow2');
    const top = join(dir, 'top.qcow2');
    makeImage(base, { size: 64 * MiB, writes: [{ pattern: 0x11, offset: 0, length: 4 * MiB }] });
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', top]);
    execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x22 2M 4M', top], { stdio: 'ignore' });
    // Union of [0, 4M) and [2M, 6M): 6 MiB.
    expect(await allocatedBytes(top)).toMatchObject({ bytes: 6 * MiB, how: 'qcow2: data of a 2-layer chain' });
    const raw = join(dir, 'raw.img');
    writeFileSync(raw, Buffer.alloc(MiB, 1));
    execFileSync('truncate', ['-s', '1G', raw]);
    expect(await allocatedBytes(raw)).toMatchObject({ bytes: MiB, how: 'raw: allocated blocks' });
    expect(await allocatedBytes('rbd:pool/vol')).toMatchObject({ bytes: null });
  });

  it('a running disk: the parent bitmap count for an incremental, else the chain allocation from query-block (capped)', async () => {
    const entry = {
      file: '/x',
      bitmaps: [{ name: 'b1', count: 3 * MiB }],
      image: { virtualSize: 10 * MiB, actualSizes: [6 * MiB, 8 * MiB] },
    };
    expect((await runningEstimate('/x', entry, 'b1')).bytes).toBe(3 * MiB);
    expect((await runningEstimate('/x', entry, null)).bytes).toBe(10 * MiB);
    expect((await runningEstimate('/x', { ...entry, image: { virtualSize: GiB, actualSizes: [6 * MiB, 8 * MiB] } }, 'b2')).bytes).toBe(
      14 * MiB,
    );
  });

  it('needed = estimate + margin + a fixed headroom; an unknown disk makes the total unknown', () => {
    expect(needed(100 * MiB, 10)).toBe(110 * MiB + 16 * MiB);
    expect(needed(0, 10)).toBe(16 * MiB);
    expect(
      total([
        { disk: 'a', bytes: 1, how: '' },
        { disk: 'b', bytes: 2, how: '' },
      ]),
    ).toBe(3);
    expect(
      total([
        { disk: 'a', bytes: 1, how: '' },
        { disk: 'b', bytes: null, how: '' },
      ]),
    ).toBeNull();
    expect(fmtBytes(1536)).toBe('1.5 KiB');
  });
});

describe('pauseDecision: resume only what our full NAS paused', () => {
  it.each([
    [{ state: 'running', reason: 'booted', failure: null, nasFull: false }, 'none'],
    [{ state: 'paused', reason: 'I/O error', failure: 'NAS_FULL', nasFull: false }, 'resume'],
    [{ state: 'paused', reason: 'I/O error', failure: 'BACKUP_JOB_FAILED', nasFull: true }, 'resume'],
    [{ state: 'paused', reason: 'I/O error', failure: 'IO_ERROR', nasFull: false }, 'leave'],
    [{ state: 'paused', reason: 'I/O error', failure: null, nasFull: false }, 'leave'],
    [{ state: 'paused', reason: 'user', failure: 'NAS_FULL', nasFull: true }, 'leave'],
    [{ state: 'paused', reason: 'migrating', failure: 'NAS_FULL', nasFull: true }, 'leave'],
    [{ state: 'paused', reason: '', failure: 'NAS_FULL', nasFull: false }, 'resume'],
    [{ state: 'paused', reason: '', failure: null, nasFull: false }, 'leave'],
  ] as const)('%j → %s', (p, want) => {
    expect(pauseDecision(p)).toBe(want);
  });
});
