import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import yargsFactory from 'yargs/yargs';
import { BOOLEAN_FLAGS, PARSER_CONFIGURATION, parseArgs, parseFlags, UsageRequested, VALUE_FLAGS } from '../../lib/cli/args.js';
import { type NasbackupError } from '../../lib/errors.js';

const code = (f: () => unknown): string => {
  try {
    f();
  } catch (e) {
    return (e as NasbackupError).code;
  }
  return 'no error';
};

describe('parseArgs', () => {
  it('parses the backup argv of the agent, empty values included', () => {
    const a = parseArgs([
      '-o',
      'backup',
      '-v',
      'i-2-10-VM',
      '-t',
      'nfs',
      '-s',
      '10.0.0.5:/export',
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
      'backup-2',
      '--bitmap-parent',
      'backup-1',
      '--parent-paths',
      'a/b/root.x.qcow2,a/b/datadisk.y.qcow2',
    ]);
    expect(a).toMatchObject({
      operation: 'backup',
      vm: 'i-2-10-VM',
      type: 'nfs',
      storage: '10.0.0.5:/export',
      mount: '',
      path: 'i-2-10-VM/2025.01.04.00.00.00',
      quiesce: 'false',
      diskpaths: '',
      mode: 'incremental',
      bitmapNew: 'backup-2',
      bitmapParent: 'backup-1',
      parentPaths: 'a/b/root.x.qcow2,a/b/datadisk.y.qcow2',
    });
  });

  it('accepts long names and the G1 --parent-path spelling', () => {
    const a = parseArgs([
      '--operation',
      'backup',
      '--vm',
      'v',
      '--type',
      'cifs',
      '--storage',
      '//h/s',
      '--mount',
      'vers=3.0',
      '--path',
      'v/t',
      '--quiesce',
      'true',
      '--diskpaths',
      '/a,/b',
      '--mode',
      'full',
      '--parent-path',
      'v/p/root.a.qcow2',
    ]);
    expect(a).toMatchObject({
      operation: 'backup',
      vm: 'v',
      type: 'cifs',
      storage: '//h/s',
      mount: 'vers=3.0',
      path: 'v/t',
      quiesce: 'true',
      diskpaths: '/a,/b',
      mode: 'full',
      parentPaths: 'v/p/root.a.qcow2',
    });
  });

  it('parses the rebase argv', () => {
    const a = parseArgs([
      '-o',
      'rebase',
      '-t',
      'nfs',
      '-s',
      'h:/e',
      '-m',
      '',
      '--rebase-target',
      'v/2/r.qcow2',
      '--rebase-new-backing',
      'v/1/r.qcow2',
    ]);
    expect(a).toMatchObject({ operation: 'rebase', rebaseTarget: 'v/2/r.qcow2', rebaseNewBacking: 'v/1/r.qcow2', mount: '' });
  });

  it('takes the next element verbatim as a value, even when it looks like a flag', () => {
    expect(parseArgs(['-o', 'stats', '-m', '-x']).mount).toBe('-x');
  });

  it('reports the first unknown option', () => {
    expect(() => parseArgs(['-o', 'stats', '-x', 'y'])).toThrow('Invalid option: -x');
    expect(code(() => parseArgs(['-o', 'stats', 'stray']))).toBe('INVALID_OPTION');
    expect(code(() => parseArgs(['--bogus']))).toBe('INVALID_OPTION');
  });

  it('refuses a value flag without a value instead of exiting silently', () => {
    for (const f of ['-m', '-p', '--rebase-target', '--bitmap-new', '-d']) {
      expect(code(() => parseArgs(['-o', 'stats', f]))).toBe('MISSING_OPTION_VALUE');
    }
  });

  it('recognises -h/--help', () => {
    expect(() => parseArgs(['-h'])).toThrow(UsageRequested);
    expect(() => parseArgs(['--help'])).toThrow(UsageRequested);
  });

  it('reads argv in order, like the original: -h before a bad option is the usage, after it the error', () => {
    expect(() => parseArgs(['-o', 'stats', '-h', '--bogus'])).toThrow(UsageRequested);
    expect(() => parseArgs(['-o', 'stats', '--help', '-m'])).toThrow(UsageRequested);
    expect(code(() => parseArgs(['-o', 'stats', '--bogus', '-h']))).toBe('INVALID_OPTION');
  });

  it('recognises the later upstream flags', () => {
    const a = parseArgs(['-o', 'backup', '-c', '--verify', '-b', '10', '-e', '/k', '--quiesce-timeout', '30', '-w', '20']);
    expect(a).toMatchObject({ compress: true, verify: true, bandwidth: '10', encrypt: '/k', quiesceTimeout: '30', mountTimeout: '20' });
  });
});

/** How the agent CLI parsed with yargs itself (before yargs-parser was called directly): the oracle. */
function parseWithYargs(argv: readonly string[]): unknown {
  let y = yargsFactory([...argv])
    .help(false)
    .version(false)
    .exitProcess(false)
    .strict(false)
    .parserConfiguration(PARSER_CONFIGURATION)
    .fail((msg: string) => {
      throw new Error(msg);
    });
  for (const [short, long] of BOOLEAN_FLAGS) y = y.option(short ?? long, { ...(short ? { alias: long } : {}), type: 'boolean' });
  for (const [short, long] of VALUE_FLAGS) y = y.option(short ?? long, { ...(short ? { alias: long } : {}), type: 'string', nargs: 1 });
  try {
    const { $0: _, ...rest } = y.parseSync() as Record<string, unknown>;
    return rest;
  } catch (e) {
    return { error: (e as Error).message };
  }
}

function parseDirect(argv: readonly string[]): unknown {
  try {
    return { ...parseFlags(argv) };
  } catch (e) {
    return { error: (e as Error).message };
  }
}

describe('the agent CLI parser is yargs-parser with the options yargs gives it', () => {
  const flags = [...BOOLEAN_FLAGS, ...VALUE_FLAGS].flatMap(([short, long]) => [`--${long}`, ...(short ? [`-${short}`] : [])]);
  const odd = ['-x', '--bogus', '--', '-', '--operation=stats', '-o=stats', '-ostats', '-oc', '--no-compress', '--verify=false'];
  const values = ['', 'a', 'stats', '-1', '1', '0x10', '1e3', 'a b', 'true', 'i-2-10-VM/2025.01.01.00.00.00', '--help=x', '-c=1'];
  const token = fc.oneof(fc.constantFrom(...flags, ...odd, ...values), fc.string({ maxLength: 6 }));

  it('equals yargs on the agent argv and on random argv', () => {
    const agent = [
      '-o',
      'backup',
      '-v',
      'i-2-10-VM',
      '-t',
      'nfs',
      '-s',
      '10.0.0.5:/e',
      '-m',
      '',
      '-p',
      'i/t',
      '-q',
      'false',
      '-d',
      '',
      '-c',
      '--verify',
    ];
    expect(parseDirect(agent)).toEqual(parseWithYargs(agent));
    fc.assert(
      fc.property(fc.array(token, { maxLength: 10 }), (argv) => {
        expect(parseDirect(argv)).toEqual(parseWithYargs(argv));
      }),
      { numRuns: 600 },
    );
  });
});
