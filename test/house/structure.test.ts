// The house rules of lib/ the code can check itself: operations never start a process
// nor read a raw process result (only clients hold the Runner), what several operations
// share never imports an operation or the CLI, and operation folders do not import
// each other.
import { readdirSync, readFileSync } from 'node:fs';
import { join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';

const LIB = fileURLToPath(new URL('../../lib/', import.meta.url));

function files(dir: string): string[] {
  return readdirSync(join(LIB, dir), { withFileTypes: true }).flatMap((e) =>
    e.isDirectory() ? files(join(dir, e.name)) : e.name.endsWith('.ts') ? [join(dir, e.name)] : [],
  );
}

/** Imports of a lib file, as paths relative to lib/ (e.g. "exec.js", "ops/backup/index.js"). */
function imports(file: string): string[] {
  const src = readFileSync(join(LIB, file), 'utf8');
  return [...src.matchAll(/(?:from |import\()'(\.[^']+)'/g)].map((m) => relative(LIB, join(LIB, file, '..', m[1]!)));
}

describe('lib/ structure', () => {
  it('operations get clients, never the Runner or a process result', () => {
    expect(imports('ops/backup/running.ts')).toEqual(expect.arrayContaining(['clients/virsh.js', 'ops/undo.js', 'store/safety.js']));
    for (const f of files('ops')) {
      const src = readFileSync(join(LIB, f), 'utf8');
      expect(
        imports(f).filter((p) => p === 'exec.js'),
        f,
      ).toEqual([]);
      expect(src, f).not.toMatch(/\brunner\b|RunResult|succeeded\(|child_process|execa/);
    }
  });

  it('only the clients and the install probes start programs (through the Runner)', () => {
    const starters = [...files('.')].filter((f) => /\.run\(|runner\.run/.test(readFileSync(join(LIB, f), 'utf8')));
    expect(starters).toEqual(expect.arrayContaining(['clients/virsh.ts', 'clients/qemu-img.ts', 'clients/mount.ts', 'clients/host.ts']));
    expect(starters.filter((f) => !f.startsWith('clients/') && !f.startsWith('install/')).sort()).toEqual([]);
    for (const f of files('.')) {
      if (f === 'exec.ts') continue;
      expect(readFileSync(join(LIB, f), 'utf8'), f).not.toMatch(/from 'node:child_process'|from 'execa'|import\('execa'\)/);
    }
  });

  it('lib/store imports no operation and no CLI; client parsers are not exported', () => {
    for (const f of files('store'))
      expect(
        imports(f).filter((p) => p.startsWith('ops/') || p.startsWith('cli/')),
        f,
      ).toEqual([]);
    for (const f of files('clients')) expect(readFileSync(join(LIB, f), 'utf8'), f).not.toMatch(/export function parse/);
  });

  it('the backup and chain operation folders do not import each other', () => {
    for (const f of files('ops/backup'))
      expect(
        imports(f).filter((p) => p.startsWith('ops/chain/')),
        f,
      ).toEqual([]);
    for (const f of files('ops/chain'))
      expect(
        imports(f).filter((p) => p.startsWith('ops/backup/')),
        f,
      ).toEqual([]);
  });
});
