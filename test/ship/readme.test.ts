// The operator docs stay complete: every error code has a troubleshooting row (cause and
// fix), every environment variable a configuration row, and the ship sections exist.
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { ERROR_CODES } from '../../lib/errors.js';
import { envVars, REPO } from './ship.js';

const README = readFileSync(join(REPO, 'README.md'), 'utf8');

/** The rows of the first table under a `## <title>` heading: cells of each row. */
function table(title: string): string[][] {
  const at = README.indexOf(`\n## ${title}\n`);
  expect(at, `README section "## ${title}"`).toBeGreaterThan(-1);
  const next = README.indexOf('\n## ', at + 1);
  const section = README.slice(at, next === -1 ? undefined : next);
  return section
    .split('\n')
    .filter((l) => l.startsWith('|') && !/^\|[-| ]+\|$/.test(l))
    .slice(1) // header
    .map((l) =>
      l
        .slice(1, -1)
        .split(' | ')
        .map((c) => c.trim()),
    );
}

describe('README', () => {
  it('Troubleshooting: one row per error code of lib/errors.ts, each with a cause and a fix, none unknown', () => {
    const rows = table('Troubleshooting');
    const codes = rows.map((r) => /^`([A-Z0-9_]+)`$/.exec(r[0]!)?.[1]);
    expect(codes.filter((c) => c === undefined)).toEqual([]);
    expect([...codes].sort()).toEqual(Object.keys(ERROR_CODES).sort());
    for (const r of rows) {
      expect(r, r[0]).toHaveLength(3);
      expect(r[1]!.length, `cause of ${r[0]}`).toBeGreaterThan(3);
      expect(r[2]!.length, `fix of ${r[0]}`).toBeGreaterThan(0);
    }
  });

  it('Configuration: every NASBACKUP_* variable the program reads has a row', () => {
    const documented = table('Configuration')
      .map((r) => r[0]!)
      .join(' ');
    for (const v of envVars()) expect(documented, v).toContain(`\`${v}\``);
  });

  it('has the operator sections', () => {
    for (const h of ['Install on a KVM host', 'Roll back', 'Usage', 'Configuration', 'Logs', 'Troubleshooting']) {
      expect(README).toContain(`\n## ${h}\n`);
    }
    for (const s of [
      'npm run bundle',
      'dist/nasbackup.cjs',
      'npm pack',
      'install-agent-hook --uninstall',
      '--json',
      '--version',
      'NASBACKUP_AGENT_PROFILE',
    ]) {
      expect(README).toContain(s);
    }
  });
});
