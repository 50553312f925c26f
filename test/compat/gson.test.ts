// Gson wire format: escaping, member order, null omission, FQCN arrays, and the
// docs/agent-contract.md §8.3 examples byte for byte.
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import {
  backupAnswer,
  decodeAnswers,
  decodeCommands,
  encodeAnswers,
  encodeCommands,
  gsonQuote,
  gsonStringify,
  parseJson,
  statsAnswer,
  type BackupCommand,
  type WireAnswer,
} from '../../compat/index.js';
import * as EX from './examples.js';

describe('gsonQuote: JsonWriter with HTML-safe escaping', () => {
  const cases: Array<[string, string, string]> = [
    ['HTML-sensitive characters', `<a href='x'>&=</a>`, String.raw`"\u003ca href\u003d\u0027x\u0027\u003e\u0026\u003d\u003c/a\u003e"`],
    ['quote and backslash', 'a"b\\c', String.raw`"a\"b\\c"`],
    ['short escapes', '\b\t\n\f\r', String.raw`"\b\t\n\f\r"`],
    ['other controls as lower-case \\u', '\u0000\u0001\u001b\u001f', String.raw`"\u0000\u0001\u001b\u001f"`],
    ['JavaScript line terminators', 'a\u2028b\u2029c', String.raw`"a\u2028b\u2029c"`],
    ['non-ASCII verbatim', 'é — 日本 😀', '"é — 日本 😀"'],
    ['DEL verbatim', '\u007f', '"\u007f"'],
    ['slash not escaped', 'a/b', '"a/b"'],
  ];
  it.each(cases)('%s', (_n, input, wire) => {
    expect(gsonQuote(input)).toBe(wire);
  });

  it('without HTML safety only the JSON-mandatory escapes remain', () => {
    expect(gsonQuote(`<'=&>\u2028`, false)).toBe(String.raw`"<'=&>\u2028"`);
  });

  it('always yields a JSON string that reads back to the input (property)', () => {
    fc.assert(
      fc.property(fc.string({ unit: 'binary' }), (s) => {
        const q = gsonQuote(s);
        expect(JSON.parse(q)).toBe(s);
        expect(parseJson(q)).toBe(s);
        // Never any of the characters Gson escapes, raw.
        expect(q.slice(1, -1)).not.toMatch(/[<>&='\u0000-\u001f\u2028\u2029]/);
      }),
    );
  });
});

describe('gsonStringify', () => {
  it('omits null members (beans and maps), keeps nulls in arrays, writes bigints exactly', () => {
    const v = new Map<string, unknown>([
      ['a', null],
      ['b', [null, 1, 'x']],
      [
        'c',
        new Map([
          ['k', null],
          ['l', 'v'],
        ]),
      ],
      ['d', 2n ** 63n - 1n],
    ]);
    expect(gsonStringify(v as never)).toBe('{"b":[null,1,"x"],"c":{"l":"v"},"d":9223372036854775807}');
  });
});

describe('the contract §8.3 examples', () => {
  const commands: Array<[string, string]> = [
    ['TakeBackupCommand', EX.TAKE_BACKUP],
    ['RebaseBackupCommand', EX.REBASE_BACKUP],
    ['DeleteBackupCommand', EX.DELETE_BACKUP],
  ];
  it.each(commands)('%s decodes and re-encodes byte for byte', (_n, wire) => {
    expect(encodeCommands(decodeCommands(wire))).toBe(wire);
  });

  const answers: Array<[string, string]> = [
    ['successful incremental', EX.ANSWER_INCREMENTAL_OK],
    ['cleanup failed', EX.ANSWER_CLEANUP_FAILED],
    ['escaped details', EX.ANSWER_ESCAPED_DETAILS],
    ['rebase/delete success', EX.ANSWER_REBASE_OR_DELETE_OK],
    ['stats', EX.STATS_ANSWER],
  ];
  it.each(answers)('answer (%s) decodes and re-encodes byte for byte', (_n, wire) => {
    expect(encodeAnswers(decodeAnswers(wire))).toBe(wire);
  });

  it('answers built from scratch serialize to the examples', () => {
    const ok = backupAnswer(
      true,
      'Job type:         Completed   \nOperation:        Backup      \nTime elapsed:     133          ms\nFile processed:   128.000 KiB\nFile remaining:   0.000 B\nFile total:       128.000 KiB\n\n465222\nBITMAP_CREATED=backup-1736035200',
    );
    ok.size = 465222n;
    ok.bitmapCreated = 'backup-1736035200';
    ok.incrementalFallback = false;
    expect(encodeAnswers([ok])).toBe(EX.ANSWER_INCREMENTAL_OK);

    const cleanup = backupAnswer(false, 'Virsh backup job failed\nFailed to unmount /tmp/csbackup.Ab3xZ\nBackup cleanup failed');
    cleanup.needsCleanup = true;
    expect(encodeAnswers([cleanup])).toBe(EX.ANSWER_CLEANUP_FAILED);

    const escaped = backupAnswer(
      false,
      "qemu-img: Could not open '/tmp/csbackup.Ab3xZ/i-2-10-VM/2025.01.03.00.00.00/root.b3f4.qcow2': Unsupported qcow2 version 9",
    );
    expect(encodeAnswers([escaped])).toBe(EX.ANSWER_ESCAPED_DETAILS);

    expect(encodeAnswers([backupAnswer(true, null)])).toBe(EX.ANSWER_REBASE_OR_DELETE_OK);

    const stats = statsAnswer(false, '/tmp/csbackup.Ab3xZ\n104857600 52428800\n');
    stats.totalSize = 104857600n;
    stats.usedSize = 52428800n;
    expect(encodeAnswers([stats])).toBe(EX.STATS_ANSWER);
  });

  it('the rebase example carries mountOptions escaped (vers\\u003d4.1) and decodes it to vers=4.1', () => {
    const [cmd] = decodeCommands(EX.REBASE_BACKUP);
    expect(cmd).toMatchObject({ cls: 'RebaseBackupCommand', mountOptions: 'vers=4.1' });
  });

  it('the take-backup example: mountOptions absent (null), fields typed', () => {
    const [cmd] = decodeCommands(EX.TAKE_BACKUP);
    expect(cmd).toMatchObject({
      cls: 'TakeBackupCommand',
      vmName: 'i-2-10-VM',
      quiesce: false,
      mode: 'incremental',
      wait: 0,
      bypassHostMaintenance: false,
    });
    expect(cmd).not.toHaveProperty('mountOptions');
    expect((cmd as { contextMap: Map<string, string> }).contextMap.get('logid')).toBe('a1b2c3d4');
  });
});

// Arbitraries for round trips: every field of every class, absent or present.
const str = fc.string({ unit: 'binary', maxLength: 20 });
const opt = <T>(a: fc.Arbitrary<T>): fc.Arbitrary<T | undefined> => fc.option(a, { nil: undefined });
const long = fc.bigInt({ min: -(2n ** 63n), max: 2n ** 63n - 1n });
const int = fc.integer({ min: -(2 ** 31), max: 2 ** 31 - 1 });
const ctx = opt(fc.array(fc.tuple(str, str), { maxLength: 3 }).map((e) => new Map<string, string | null>(e)));
const base = { contextMap: ctx, wait: int, bypassHostMaintenance: fc.boolean() };
const strList = opt(fc.array(fc.option(str, { nil: null }), { maxLength: 3 }));

const command: fc.Arbitrary<BackupCommand> = fc.oneof(
  fc.record(
    {
      cls: fc.constant('TakeBackupCommand' as const),
      vmName: str,
      backupPath: str,
      backupRepoType: str,
      backupRepoAddress: str,
      volumePaths: strList,
      quiesce: opt(fc.boolean()),
      mountOptions: opt(str),
      mode: opt(str),
      bitmapNew: opt(str),
      bitmapParent: opt(str),
      parentPath: opt(str),
      parentPaths: strList,
      quiesceTimeout: opt(int),
      ...base,
    },
    { requiredKeys: ['cls', 'vmName', 'backupPath', 'backupRepoType', 'backupRepoAddress', 'wait', 'bypassHostMaintenance'] },
  ),
  fc.record(
    {
      cls: fc.constant('DeleteBackupCommand' as const),
      backupPath: str,
      backupRepoType: str,
      backupRepoAddress: str,
      mountOptions: opt(str),
      ...base,
    },
    { requiredKeys: ['cls', 'backupPath', 'backupRepoType', 'backupRepoAddress', 'wait', 'bypassHostMaintenance'] },
  ),
  fc.record(
    {
      cls: fc.constant('RebaseBackupCommand' as const),
      targetPath: str,
      newBackingPath: str,
      backupRepoType: str,
      backupRepoAddress: str,
      mountOptions: opt(str),
      ...base,
    },
    { requiredKeys: ['cls', 'targetPath', 'newBackingPath', 'backupRepoType', 'backupRepoAddress', 'wait', 'bypassHostMaintenance'] },
  ),
  fc.record(
    {
      cls: fc.constant('GetBackupStorageStatsCommand' as const),
      backupRepoType: str,
      backupRepoAddress: str,
      mountOptions: opt(str),
      ...base,
    },
    { requiredKeys: ['cls', 'backupRepoType', 'backupRepoAddress', 'wait', 'bypassHostMaintenance'] },
  ),
);

const answer: fc.Arbitrary<WireAnswer> = fc.oneof(
  fc.record(
    {
      cls: fc.constant('BackupAnswer' as const),
      size: opt(long),
      virtualSize: opt(long),
      needsCleanup: opt(fc.boolean()),
      bitmapCreated: opt(str),
      incrementalFallback: opt(fc.boolean()),
      bitmapRecreated: opt(str),
      result: fc.boolean(),
      details: opt(str),
      ...base,
    },
    { requiredKeys: ['cls', 'result', 'wait', 'bypassHostMaintenance'] },
  ),
  fc.record(
    {
      cls: fc.constant('BackupStorageStatsAnswer' as const),
      totalSize: opt(long),
      usedSize: opt(long),
      result: fc.boolean(),
      details: opt(str),
      ...base,
    },
    { requiredKeys: ['cls', 'result', 'wait', 'bypassHostMaintenance'] },
  ),
  fc.record(
    { cls: fc.constant('Answer' as const), result: fc.boolean(), details: opt(str), ...base },
    { requiredKeys: ['cls', 'result', 'wait', 'bypassHostMaintenance'] },
  ),
);

/** Drop undefined members so objects compare as the wire sees them. */
const defined = (o: object): Record<string, unknown> => Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined));

describe('round trips (properties)', () => {
  it('commands: decode(encode(c)) == c and encode is a fixed point', () => {
    fc.assert(
      fc.property(fc.array(command, { minLength: 1, maxLength: 3 }), (cmds) => {
        const wire = encodeCommands(cmds);
        const back = decodeCommands(wire);
        expect(back.map(defined)).toEqual(cmds.map(defined));
        expect(encodeCommands(back)).toBe(wire);
      }),
    );
  });

  it('answers: decode(encode(a)) == a and encode is a fixed point', () => {
    fc.assert(
      fc.property(fc.array(answer, { minLength: 1, maxLength: 3 }), (as) => {
        const wire = encodeAnswers(as);
        const back = decodeAnswers(wire);
        expect(back.map(defined)).toEqual(as.map(defined));
        expect(encodeAnswers(back)).toBe(wire);
      }),
    );
  });

  it('the wire is plain JSON that JSON.parse reads, with no raw HTML-sensitive characters', () => {
    fc.assert(
      fc.property(answer, (a) => {
        const wire = encodeAnswers([a]);
        expect(() => JSON.parse(wire)).not.toThrow();
        expect(wire).not.toMatch(/[<>&'\u2028\u2029]/);
        expect(wire.replace(/"(?:[^"\\]|\\.)*"/g, '""')).not.toMatch(/=/); // '=' only ever escaped inside strings
      }),
    );
  });
});
