// Threat: hostile wire JSON handed to `nasbackup agent` (the management server's command
// array): nesting meant to exhaust the stack, prototype keys, numbers out of range, wrong
// shapes. Each gets a BackupAnswer(false) naming the problem, and nothing is executed: no
// mount, no program, no file on the share.
import { afterAll, describe, expect, it } from 'vitest';
import { decodeAnswers } from '../../compat/index.js';
import { seedChain } from '../helpers/chain.js';
import { leftovers, makeSandbox, spawnAgent, type RunOutcome, type Sandbox } from '../helpers/cli.js';
import { removeTempDirs } from '../helpers/tmp.js';
import { snapshotTree } from '../helpers/tree.js';

afterAll(removeTempDirs);

const agent = (sb: Sandbox, input: string): Promise<RunOutcome> => spawnAgent(sb, input);

const P = 'org.apache.cloudstack.backup.';
const del = (body: string): string => `[{"${P}DeleteBackupCommand":${body}}]`;

const CASES: Array<[string, (nas: string) => string, RegExp]> = [
  ['nesting 100 000 deep', () => '['.repeat(100_000), /nesting deeper than/],
  ['an object instead of the command array', () => '{"__proto__":{"polluted":true}}', /Expected a JSON array of commands/],
  ['a number instead of a command', () => '[1e999999]', /must be an object with exactly one key/],
  ['not JSON at all', () => 'rm -rf /', /Malformed JSON/],
  [
    'truncated',
    (nas) => del(`{"backupPath":"i-2-10-VM/2025.01.01.00.00.00","backupRepoType":"none","backupRepoAddress":"${nas}"`),
    /Malformed JSON/,
  ],
  ['an unknown command class', () => `[{"${P}FormatDiskCommand":{}}]`, /FormatDiskCommand/],
  [
    'a wait that does not fit a Java int',
    (nas) =>
      del(
        `{"backupPath":"i-2-10-VM/2025.01.01.00.00.00","backupRepoType":"none","backupRepoAddress":"${nas}","mountOptions":"bind","wait":99999999999}`,
      ),
    /wait/,
  ],
];

describe('hostile wire JSON', () => {
  it.each(CASES)('%s: refused, nothing executed', async (_name, input, msg) => {
    const sb = makeSandbox('hostile-json');
    seedChain(sb.nas);
    const before = snapshotTree(sb.nas);
    const r = await agent(sb, input(sb.nas));
    expect(r.code).toBe(0); // the agent transport always gets an answer
    const [answer] = decodeAnswers(r.stdout.trim());
    expect(answer?.cls).toBe('BackupAnswer');
    expect(answer?.result).toBe(false);
    expect(answer?.details).toMatch(msg);
    expect(snapshotTree(sb.nas)).toEqual(before);
    expect(leftovers(sb)).toEqual({ dirs: [], mounts: [] });
  });

  it('a __proto__ key inside a command does not reach any object prototype', async () => {
    const sb = makeSandbox('hostile-proto');
    seedChain(sb.nas);
    const r = await agent(
      sb,
      del(
        `{"backupPath":"../../etc","backupRepoType":"none","backupRepoAddress":"${sb.nas}","mountOptions":"bind","__proto__":{"backupPath":"x"}}`,
      ),
    );
    const [answer] = decodeAnswers(r.stdout.trim());
    expect(answer?.result).toBe(false);
    expect(({} as Record<string, unknown>).backupPath).toBeUndefined();
    expect(leftovers(sb)).toEqual({ dirs: [], mounts: [] });
  });
});
