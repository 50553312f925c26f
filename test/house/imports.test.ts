// The import rules the one-way argument pipeline relies on: operations import nothing from
// the CLI (they take checked arguments and return results); compat/ reaches outside only for
// the contract's constants in lib/protocol.ts, itself a leaf.
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';

const ROOT = fileURLToPath(new URL('../..', import.meta.url));
const imports = (file: string): string[] => [...readFileSync(file, 'utf8').matchAll(/^import[^;]*?from '([^']+)'/gms)].map((m) => m[1]!);
const tsFiles = (dir: string): string[] =>
  readdirSync(join(ROOT, dir), { recursive: true, encoding: 'utf8' })
    .filter((f) => f.endsWith('.ts'))
    .map((f) => join(ROOT, dir, f));

describe('layers', () => {
  it('lib/ops imports nothing from lib/cli', () => {
    const files = tsFiles('lib/ops');
    expect(files.length).toBeGreaterThan(3);
    for (const f of files) for (const i of imports(f)) expect(i, f).not.toMatch(/(^|\/)cli\//);
  });

  it('compat/ imports only itself; compat/protocol.ts imports nothing', () => {
    for (const f of tsFiles('compat')) for (const i of imports(f)) expect(i.startsWith('./'), `${f}: ${i}`).toBe(true);
    expect(imports(join(ROOT, 'compat/protocol.ts'))).toEqual([]);
  });

  it('nothing but lib/output.ts (and the agent formats it uses) builds the JSON envelope', () => {
    for (const f of [...tsFiles('lib/cli'), ...tsFiles('lib/ops')])
      expect(readFileSync(f, 'utf8'), f).not.toMatch(/JSON\.stringify\(\{\s*ok:/);
  });
});
