// The layer rules are executable: the repository's own eslint.config.js, run on small
// sources placed (in memory) at the paths they govern, fails on each kind of forbidden
// import and passes the allowed ones. Type information is switched off here because the
// sources are not on disk; the layer rule needs none.
import { fileURLToPath } from 'node:url';
import { ESLint } from 'eslint';
import tseslint from 'typescript-eslint';
import { describe, expect, it } from 'vitest';

const ROOT = fileURLToPath(new URL('../..', import.meta.url));

const eslint = new ESLint({
  cwd: ROOT,
  overrideConfig: tseslint.configs.disableTypeChecked,
  ruleFilter: ({ ruleId }) => ruleId === 'layers/imports',
});

async function layerFindings(file: string, code: string): Promise<string[]> {
  const [result] = await eslint.lintText(code, { filePath: `${ROOT}${file}` });
  expect(result?.messages.filter((m) => m.ruleId !== 'layers/imports')).toEqual([]);
  return (result?.messages ?? []).map((m) => m.message);
}

describe('layer rules (eslint layers/imports)', () => {
  it.each([
    ['lib/qcow2/x.ts', "import { rebase } from '../ops/rebase.js';", 'qcow2 engine'],
    ['lib/qcow2/x.ts', "import { errorCode } from '../errors.js';", 'qcow2 engine'],
    ['lib/qcow2/x.ts', "import { execa } from 'execa';", 'qcow2 engine'],
    ['lib/qcow2/x.ts', "export * from '../paths.js';", 'qcow2 engine'],
    ['lib/qcow2/x.ts', "export const load = () => import('../cli/main.js');", 'qcow2 engine'],
    ['compat/x.ts', "import type { CliArgs } from '../lib/cli/args.js';", 'compat imports nothing'],
    ['compat/sub/x.ts', "import { NasbackupError } from '../../lib/errors.js';", 'compat imports nothing'],
    ['lib/clients/x.ts', "import { runBackup } from '../ops/backup.js';", 'clients never import'],
    ['lib/clients/x.ts', "import { main } from '../cli/main.js';", 'clients never import'],
    ['lib/ops/x.ts', "import type { CliArgs } from '../cli/args.js';", 'ops never import cli'],
    ['lib/ops/deep/x.ts', "import { main } from '../../../lib/cli/main.js';", 'ops never import cli'],
    ['lib/store/x.ts', "import { chainCommand } from '../ops/chain/index.js';", 'domain modules'],
    ['lib/engine/x.ts', "export const load = () => import('../ops/rebase.js');", 'domain modules'],
    ['lib/paths.ts', "import { main } from './cli/main.js';", 'domain modules'],
    ['lib/agent-output.ts', "import type { Ctx } from './ops/context.js';", 'domain modules'],
  ])('%s may not: %s', async (file, code, why) => {
    const found = await layerFindings(file, code);
    expect(found).toHaveLength(1);
    expect(found[0]).toContain(why);
  });

  it.each([
    ['lib/qcow2/x.ts', "import { readHeader } from './header.js';\nimport { open } from 'node:fs/promises';\nimport { join } from 'path';"],
    ['compat/x.ts', "import { parseJson } from './json.js';\nimport { format } from 'node:util';"],
    ['lib/clients/x.ts', "import { type Runner } from '../exec.js';"],
    [
      'lib/ops/x.ts',
      "import { Virsh } from '../clients/virsh.js';\nimport { readChain } from '../qcow2/chain.js';\nimport type { Ctx } from './context.js';",
    ],
    ['lib/store/x.ts', "import { diskPaths } from './disks.js';\nimport { javaParseInt } from '../../compat/java.js';"],
    ['lib/cli/x.ts', "export const load = () => import('../ops/backup.js');\nexport { main } from './main.js';"],
    ['test/x.test.ts', "import { main } from '../lib/cli/main.js';\nimport { rebase } from '../lib/ops/rebase.js';"],
  ])('%s: its allowed imports pass', async (file, code) => {
    expect(await layerFindings(file, code)).toEqual([]);
  });

  it('the repository config turns the layer rule and the promise rules on for the real sources', async () => {
    const full = new ESLint({ cwd: ROOT });
    for (const file of [
      'lib/qcow2/rebase.ts',
      'compat/index.ts',
      'lib/ops/backup/index.ts',
      'lib/clients/virsh.ts',
      'lib/store/safety.ts',
    ]) {
      const { rules } = (await full.calculateConfigForFile(`${ROOT}${file}`)) as { rules: Record<string, unknown[]> };
      expect(rules['layers/imports']?.[0], file).toBe(2);
      expect(rules['@typescript-eslint/no-floating-promises']?.[0], file).toBe(2);
      expect(rules['@typescript-eslint/no-misused-promises']?.[0], file).toBe(2);
    }
  });
});
