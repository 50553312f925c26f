// `nasbackup chain …` arguments are checked once, in the CLI, before anything is mounted.
import { describe, expect, it } from 'vitest';
import { validateChainArgs } from '../../lib/cli/validate.js';

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
