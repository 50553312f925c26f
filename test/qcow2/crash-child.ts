// Child process for crash injection: run the native rebase and SIGKILL ourselves right
// after the N-th write/sync of the target (N = 0: run to completion and print the op count).
import { nativeRebase } from '../../lib/qcow2/rebase.js';

const [target, newBacking, name, at, batch] = process.argv.slice(2);
const crashAt = Number(at);
const r = await nativeRebase({
  target: target!,
  newBacking: newBacking!,
  newBackingName: name!,
  batchBytes: Number(batch),
  hooks: {
    afterOp(n) {
      if (n === crashAt) process.kill(process.pid, 'SIGKILL');
    },
  },
});
process.stdout.write(JSON.stringify(r) + '\n');
