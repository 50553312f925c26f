// Per-operation argument checks that need no mount and no host: they run before
// anything else, so bad input changes nothing anywhere.
import { NasbackupError } from '../errors.js';
import { validateDeleteArgs } from '../ops/delete.js';
import { validateRebaseArgs } from '../ops/rebase.js';
import { validateBackupArgs } from '../ops/backup/index.js';
import type { CliArgs, Operation } from './args.js';

export function validateOperationArgs(op: Operation, a: CliArgs): void {
  if (!a.type || !a.storage) {
    throw new NasbackupError('MISSING_ARGUMENT', 'The NAS must be given with -t <storage type> and -s <storage address>');
  }
  switch (op) {
    case 'rebase':
      validateRebaseArgs(a);
      return;
    case 'delete':
      validateDeleteArgs(a);
      return;
    case 'backup':
      validateBackupArgs(a, { type: a.type, address: a.storage, options: a.mount ?? '' }, 'rebase-era');
      return;
    case 'stats':
      return;
  }
}
