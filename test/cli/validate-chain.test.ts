// `nasbackup chain …` arguments are checked once, in the CLI, before anything is mounted.
import { describe, expect, it } from 'vitest';
import { validateChainArgs } from '../../lib/cli/validate.js';
import fc from 'fast-check';
import { CHAIN_SUBCOMMANDS, plainChainFlags, yargsChainFlags } from '../../lib/cli/tools.js';

const NAS = { type: 'nfs', address: '10.0.0.5:/export', options: '' };
const base = { nas: NAS, vm: 'i-2-10-VM', force: false };

describe('validateChainArgs', () => {
  it('list/verify need only --vm; delete/plan-delete get the backup folder name', () => {
    expect(validateChainArgs('list', base)).toEqual({ nas: NAS, vm: 'i-2-10-VM', force: false });
    expect(validateChainArgs('delete', { ...base, backup: 'i-2-10-VM/2025.01.02.00.00.00' }).backup).toBe('2025.01.02.00.00.00');
    expect(validateChainArgs('plan-delete', { ...base, backup: '2025.01.02.00.00.00' }).backup).toBe('2025.01.02.00.00.00');
  });

  it.each([
    ['list', { ...base, vm: 'a/b' }, 'INVALID_ARGUMENT', /--vm must be an instance name/],
    ['verify', { ...base, vm: '../x' }, 'PATH_TRAVERSAL', /--vm/],
    ['delete', base, 'MISSING_ARGUMENT', /--backup <instance>\/<timestamp> is required/],
    ['delete', { ...base, backup: 'i-3-11-VM/2025.01.02.00.00.00' }, 'INVALID_ARGUMENT', /is not a backup of i-2-10-VM/],
    ['plan-delete', { ...base, backup: 'i-2-10-VM/t/x' }, 'INVALID_ARGUMENT', /must be <instance>\/<timestamp>/],
  ] as const)('%s %j: %s', (action, a, code, message) => {
    expect(() => validateChainArgs(action, a)).toThrow(message);
    try {
      validateChainArgs(action, a);
    } catch (e) {
      expect((e as { code: string }).code).toBe(code);
    }
  });
});

describe('chain flags without yargs', () => {
  const flags = [
    '-t',
    '--type',
    '-s',
    '--storage',
    '-m',
    '--mount',
    '--vm',
    '--backup',
    '--records',
    '--engine',
    '--force',
    '--yes',
    '--json',
  ];
  const odd = ['--no-force', '--force=false', '--vm=x', '-t=nfs', '--', '--bogus', '-x', '--no-vm', '--yes=1', '-', '--type=a'];
  const values = ['', 'nfs', 'none', '10.0.0.5:/e', 'i-2-10-VM', 'i-2-10-VM/2025.01.01.00.00.00', '1', '-1', 'true', 'a b'];
  const valueFlags = flags.filter((f) => !['--force', '--yes', '--json'].includes(f));
  // Mostly well-formed pieces (a flag and its value), so that many argv are plainly good.
  const token = fc.oneof(
    { arbitrary: fc.tuple(fc.constantFrom(...valueFlags), fc.constantFrom(...values)), weight: 4 },
    { arbitrary: fc.constantFrom('--force', '--yes', '--json').map((f) => [f]), weight: 2 },
    { arbitrary: fc.constantFrom(...CHAIN_SUBCOMMANDS, ...flags, ...odd, ...values).map((t) => [t]), weight: 1 },
    { arbitrary: fc.string({ maxLength: 5 }).map((t) => [t]), weight: 1 },
  );
  const viaYargs = async (argv: string[]): Promise<unknown> => yargsChainFlags(argv).catch((e: Error) => ({ error: e.message }));

  it('reads a plainly good argv exactly as yargs does, and leaves every other argv to yargs', async () => {
    const good = ['verify', '-t', 'nfs', '-s', '10.0.0.5:/e', '--vm', 'i-2-10-VM', '--json'];
    expect(plainChainFlags(good)).toEqual(await viaYargs(good));
    expect(plainChainFlags(['verify', '-t', 'nfs', '--vm', 'v'])).toBeNull(); // -s missing: yargs words it
    let plain = 0;
    await fc.assert(
      fc.asyncProperty(
        fc.constantFrom(...CHAIN_SUBCOMMANDS),
        fc.array(token, { maxLength: 6 }),
        fc.boolean(),
        async (action, pieces, complete) => {
          const argv = [action, ...(complete ? ['-t', 'nfs', '-s', 'h:/e', '--vm', 'v'] : []), ...pieces.flat()];
          const fast = plainChainFlags(argv);
          if (fast === null) return;
          plain++;
          expect(fast).toEqual(await viaYargs(argv));
        },
      ),
      { numRuns: 1000 },
    );
    expect(plain).toBeGreaterThan(100); // the property really compared reads
  });
});
