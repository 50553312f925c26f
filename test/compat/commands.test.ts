// Decoding the management server's commands: every class, absent nulls, unknown
// fields, the log view's stringly form, and every way input can be bad.
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { CompatError, decodeCommands, decodeRequest, parseJson, type TakeBackupCommand } from '../../compat/index.js';

const P = 'org.apache.cloudstack.backup.';
const wire = (cls: string, body: object): string => JSON.stringify([{ [P + cls]: body }]);

function compatError(f: () => unknown): CompatError {
  try {
    f();
  } catch (e) {
    if (e instanceof CompatError) return e;
    throw e;
  }
  throw new Error('expected a CompatError');
}

describe('decoding commands', () => {
  it('GetBackupStorageStatsCommand', () => {
    const [c] = decodeCommands(
      wire('GetBackupStorageStatsCommand', { backupRepoType: 'cifs', backupRepoAddress: '//h/s', mountOptions: 'username=u,password=p' }),
    );
    expect(c).toEqual({
      cls: 'GetBackupStorageStatsCommand',
      backupRepoType: 'cifs',
      backupRepoAddress: '//h/s',
      mountOptions: 'username=u,password=p',
      wait: 0,
      bypassHostMaintenance: false,
    });
  });

  it('TakeBackupCommand for a stopped VM: volumePaths and PrimaryDataStoreTOs kept as sent', () => {
    const [c] = decodeCommands(
      wire('TakeBackupCommand', {
        vmName: 'i-2-12-VM',
        backupPath: 'i-2-12-VM/2026.04.28.02.00.00',
        backupRepoType: 'nfs',
        backupRepoAddress: '10.0.0.5:/export',
        volumePools: [{ uuid: 'p1', poolType: 'RBD', host: '10.0.0.1', port: 6789, path: 'cloudstack', isManaged: false }, null],
        volumePaths: ['cloudstack/5f2c', '/dev/drbd/by-res/cs-77ab/0'],
        quiesce: true,
        quiesceTimeout: 60,
        volumePassphrases: { v: [1, 2, 3] },
      }),
    ) as TakeBackupCommand[];
    expect(c!.volumePaths).toEqual(['cloudstack/5f2c', '/dev/drbd/by-res/cs-77ab/0']);
    expect(c!.volumePools![0]!.get('poolType')).toBe('RBD');
    expect(c!.volumePools![1]).toBeNull();
    expect(c!.quiesceTimeout).toBe(60);
  });

  it('absent and null members are both null; unknown members are ignored', () => {
    const [a] = decodeCommands(
      wire('DeleteBackupCommand', {
        backupPath: 'x/y',
        backupRepoType: 'nfs',
        backupRepoAddress: 'h:/e',
        mountOptions: null,
        somethingNew: { deep: [1] },
      }),
    );
    expect(a).toEqual({
      cls: 'DeleteBackupCommand',
      backupPath: 'x/y',
      backupRepoType: 'nfs',
      backupRepoAddress: 'h:/e',
      wait: 0,
      bypassHostMaintenance: false,
    });
  });

  it('reads the log view too: unescaped "=", every value a string', () => {
    const text = `[{"${P}TakeBackupCommand":{"vmName":"i-1","backupPath":"i-1/t","backupRepoType":"nfs","backupRepoAddress":"h:/e","quiesce":"true","mountOptions":"vers=4.1","quiesceTimeout":"30","wait":"0","bypassHostMaintenance":"false"}}]`;
    const [c] = decodeCommands(text) as TakeBackupCommand[];
    expect(c).toMatchObject({ quiesce: true, mountOptions: 'vers=4.1', quiesceTimeout: 30, wait: 0, bypassHostMaintenance: false });
  });

  it('numbers where strings are expected bind as their text (Gson does the same)', () => {
    const [c] = decodeCommands(wire('GetBackupStorageStatsCommand', { backupRepoType: 'nfs', backupRepoAddress: 42, mountOptions: true }));
    expect(c).toMatchObject({ backupRepoAddress: '42', mountOptions: 'true' });
  });

  it('keeps contextMap order and big wait values are refused, not wrapped', () => {
    const [c] = decodeCommands(
      `[{"${P}DeleteBackupCommand":{"backupPath":"a/b","backupRepoType":"t","backupRepoAddress":"s","contextMap":{"2":"b","1":"a","logid":"x"}}}]`,
    );
    expect([...(c!.contextMap as Map<string, string>).keys()]).toEqual(['2', '1', 'logid']);
    expect(
      compatError(() =>
        decodeCommands(wire('DeleteBackupCommand', { backupPath: 'a', backupRepoType: 't', backupRepoAddress: 's', wait: 2 ** 31 })),
      ).code,
    ).toBe('INVALID_FIELD');
  });
});

describe('bad input', () => {
  const cases: Array<[string, string, string, RegExp]> = [
    ['not JSON', '{oops', 'MALFORMED_JSON', /Malformed JSON at offset 1/],
    ['empty stdin', '  \n', 'MALFORMED_JSON', /request is empty/],
    ['trailing garbage', '[] x', 'MALFORMED_JSON', /trailing data/],
    ['an object, not an array', `{"${P}DeleteBackupCommand":{}}`, 'NOT_A_COMMAND_ARRAY', /got BEGIN_OBJECT/],
    ['empty array', '[]', 'EMPTY_REQUEST', /empty/],
    ['element with two keys', '[{"a":{},"b":{}}]', 'NOT_A_COMMAND_ARRAY', /exactly one key/],
    ['element body not an object', `[{"${P}DeleteBackupCommand":"x"}]`, 'NOT_A_COMMAND_ARRAY', /got STRING/],
  ];
  it.each(cases)('%s: the whole request is refused (%s)', (_n, text, code, msg) => {
    const e = compatError(() => decodeRequest(text));
    expect(e.code).toBe(code);
    expect(e.message).toMatch(msg);
  });

  const perElement: Array<[string, string, string, RegExp]> = [
    [
      'unknown class',
      '[{"com.cloud.agent.api.ReadyCommand":{}}]',
      'UNKNOWN_CLASS',
      /Unknown command class "com\.cloud\.agent\.api\.ReadyCommand"/,
    ],
    [
      'missing required field',
      wire('RebaseBackupCommand', { targetPath: 'a', backupRepoType: 'nfs', backupRepoAddress: 'h' }),
      'MISSING_FIELD',
      /RebaseBackupCommand is missing the required field "newBackingPath"/,
    ],
    [
      'object for a string',
      wire('GetBackupStorageStatsCommand', { backupRepoType: {}, backupRepoAddress: 'h' }),
      'INVALID_FIELD',
      /backupRepoType: expected a string but was BEGIN_OBJECT/,
    ],
    [
      'number for a boolean',
      wire('TakeBackupCommand', { vmName: 'v', backupPath: 'p', backupRepoType: 't', backupRepoAddress: 'a', quiesce: 1 }),
      'INVALID_FIELD',
      /quiesce: expected a boolean/,
    ],
    [
      'string for a list',
      wire('TakeBackupCommand', { vmName: 'v', backupPath: 'p', backupRepoType: 't', backupRepoAddress: 'a', parentPaths: 'x' }),
      'INVALID_FIELD',
      /parentPaths: expected a list/,
    ],
    [
      'fraction for an int',
      wire('TakeBackupCommand', { vmName: 'v', backupPath: 'p', backupRepoType: 't', backupRepoAddress: 'a', quiesceTimeout: 1.5 }),
      'INVALID_FIELD',
      /quiesceTimeout/,
    ],
  ];
  it.each(perElement)('%s: reported per element (%s)', (_n, text, code, msg) => {
    const [el] = decodeRequest(text);
    expect(el!.ok).toBe(false);
    if (el!.ok) return;
    expect(el!.error.code).toBe(code);
    expect(el!.error.message).toMatch(msg);
  });

  it('a known class with a bad field still names its class (so it can get its own answer type)', () => {
    const [el] = decodeRequest(wire('GetBackupStorageStatsCommand', { backupRepoType: 'nfs' }));
    expect(el).toMatchObject({ ok: false, commandClass: 'GetBackupStorageStatsCommand' });
  });

  it('never throws anything but a CompatError on arbitrary text (property)', () => {
    fc.assert(
      fc.property(fc.oneof(fc.string({ unit: 'binary' }), fc.json()), (text) => {
        try {
          decodeRequest(text);
        } catch (e) {
          expect(e).toBeInstanceOf(CompatError);
        }
      }),
    );
  });

  it('the JSON reader agrees with JSON.parse on valid JSON (property)', () => {
    fc.assert(
      fc.property(fc.json(), (text) => {
        const toPlain = (v: unknown): unknown =>
          v instanceof Map
            ? Object.fromEntries([...v].map(([k, x]) => [k, toPlain(x)]))
            : Array.isArray(v)
              ? v.map(toPlain)
              : typeof v === 'bigint'
                ? Number(v)
                : v;
        expect(toPlain(parseJson(text))).toEqual(JSON.parse(text));
      }),
    );
  });

  it('refuses pathological nesting instead of overflowing the stack', () => {
    expect(compatError(() => parseJson('['.repeat(100000))).code).toBe('MALFORMED_JSON');
  });
});
