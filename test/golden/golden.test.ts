// Golden parity: every recorded scenario of the original nasbackup.sh (fixtures/, or
// NASBACKUP_GOLDEN_DIR) replayed against bin/nasbackup, one test per scenario, judged
// by the recording and the declared divergences (divergences.json → DIVERGENCES.md).
// The sandbox paths are fixed (/tmp/nasbackup-golden), so scenarios run one by one.
import { readFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { argValue, EXTRA_FIXTURES, hasFlag, loadFixtures, PROJECT_FIXTURES, resolvePaths } from './fixture.js';
import { compare } from './compare.js';
import { KEEP, replay } from './harness.js';
import { callKey, matchesPattern, normArgv, normText } from './normalize.js';
import { DIVERGENCES_MD, renderDivergences } from './render.js';
import { FACTS, HOST_FACTS, loadTable, matches, ourCifsOptions, resolve, unsafeRelativePath } from './rules.js';
import { acquireSuiteLock, releaseSuiteLock, removeSandbox } from './sandbox.js';
import * as synth from './fakes/synth.js';

const table = loadTable();
const fixtures = loadFixtures();
const say = (line: string): void => void process.stdout.write(`${line}\n`);

describe('golden: the divergence table', () => {
  it('DIVERGENCES.md is generated from divergences.json (npm run golden:divergences)', () => {
    expect(readFileSync(DIVERGENCES_MD, 'utf8')).toBe(renderDivergences(table, loadFixtures(PROJECT_FIXTURES, EXTRA_FIXTURES)));
  });

  it('every rule explains itself, uses known conditions and applies to a project fixture', () => {
    const project = loadFixtures(PROJECT_FIXTURES, EXTRA_FIXTURES);
    const whenKeys = [
      'group',
      'exit',
      'recordedStdout',
      'recordedStderr',
      'recordedLeftovers',
      'recordedEffect',
      'recordedCall',
      'failedCall',
      'args',
      'host',
      'facts',
      'scenarios',
    ];
    const expectKeys = [
      'exit',
      'stdout',
      'stdoutContains',
      'stdoutExcludes',
      'stderr',
      'log',
      'calls',
      'nas',
      'primary',
      'checkpoints',
      'leftovers',
      'nasAdds',
    ];
    const ids = new Set<string>();
    for (const r of table.rules) {
      expect(ids.has(r.id), r.id).toBe(false);
      ids.add(r.id);
      for (const k of ['title', 'original', 'ours', 'why'] as const) expect(r[k], `${r.id}.${k}`).toMatch(/\S/);
      for (const k of Object.keys(r.when)) expect(whenKeys, `${r.id}: when.${k}`).toContain(k);
      for (const k of Object.keys(r.expect)) expect(expectKeys, `${r.id}: expect.${k}`).toContain(k);
      for (const h of [r.when.host ?? []].flat()) expect(Object.keys(HOST_FACTS), r.id).toContain(h.replace(/^!/, ''));
      for (const h of [r.when.facts ?? []].flat()) expect(Object.keys(FACTS), r.id).toContain(h.replace(/^!/, ''));
      expect(
        project.some((fx) => matches(r.when, fx, table.argv)),
        `${r.id} applies to no fixture`,
      ).toBe(true);
    }
    for (const a of table.argv) for (const k of ['original', 'ours', 'why'] as const) expect(a[k], `${a.id}.${k}`).toMatch(/\S/);
  });

  it('call keys and patterns: placeholders, our extra arguments, wildcards', () => {
    const key = callKey(
      'virsh',
      normArgv(
        'virsh',
        ['-c', 'qemu:///system', 'qemu-agent-command', 'vm', '--timeout', '60', '{"execute":"guest-fsfreeze-thaw"}'],
        table.argv,
      ),
    );
    expect(key).toBe('virsh qemu-agent-command vm {"execute":"guest-fsfreeze-thaw"}');
    const partial = normArgv(
      'virsh',
      ['backup-begin', '--backupxml', '/tmp/nasbackup-golden/tmp/csbackup.Ab3xZ/i-2-10-VM/2025.01.04.00.00.00.partial/backup.xml'],
      table.argv,
    );
    expect(partial[2]).toBe('<MOUNT_POINT>/i-2-10-VM/2025.01.04.00.00.00/backup.xml');
    expect(callKey('mount', ['-t', 'cifs', '//h/s', '<MOUNT_POINT>', '-o', ''])).toBe('mount -t cifs //h/s <MOUNT_POINT> -o ""');
    expect(matchesPattern('virsh checkpoint-create vm --xmlfile f --redefine', 'virsh checkpoint-create ** !--redefine')).toBe(false);
    expect(matchesPattern('virsh checkpoint-create vm --xmlfile f', 'virsh checkpoint-create ** !--redefine')).toBe(true);
    expect(matchesPattern('virsh domjobinfo vm --completed', 'virsh domjobinfo *')).toBe(false);
    expect(matchesPattern('virsh domjobinfo vm --completed', 'virsh domjobinfo **')).toBe(true);
    expect(matchesPattern('mount -t cifs //h/s <MOUNT_POINT> -o ""', 'mount ** -o ""')).toBe(true);
  });

  it('argv is read like the original reads it; the path and cifs facts follow the contract', () => {
    const argv = ['-o', 'backup', '--vm', 'a', '-m', '-p', '-p', 'x/y', '--parent-path', 'x/y/root.v.qcow2', '-v', 'b'];
    expect(argValue(argv, '-v')).toBe('b'); // long or short spelling, the last one wins
    expect(argValue(argv, '-m')).toBe('-p'); // a value flag consumes the next element
    expect(argValue(argv, '-p')).toBe('x/y');
    expect(argValue(argv, '--parent-paths', '--parent-path')).toBe('x/y/root.v.qcow2');
    expect(argValue(['-o', 'delete', '-p'], '-p')).toBeUndefined();
    expect([hasFlag(argv, '-o'), hasFlag(['-m', '-o'], '-o')]).toEqual([true, false]);
    expect(['', '/abs/x', 'a/../b', 'vm', './vm/.', 'vm/ts', 'vm//ts/'].map((p) => unsafeRelativePath(p, 2))).toEqual([
      true,
      true,
      true,
      true,
      true,
      false,
      false,
    ]);
    expect(['', 'vers=3.0', 'vers=3.0,nobrl', ',a,,b,'].map(ourCifsOptions)).toEqual([
      'nobrl',
      'vers=3.0,nobrl',
      'vers=3.0,nobrl',
      'a,b,nobrl',
    ]);
  });

  it('the fakes’ synthetic answers reproduce the recorded ones wherever both exist', () => {
    let checked = 0;
    for (const fx of fixtures) {
      const host = resolvePaths(fx.host);
      for (const c of fx.expect.calls) {
        if (c.cmd !== 'virsh' || c.exitCode !== 0) continue;
        const a = c.argv[0] === '-c' ? c.argv.slice(2) : c.argv;
        const dom = host.domains.find((d) => d.name === a[1]);
        let s: string | undefined;
        if (a[0] === 'version') s = synth.versionText(host.virsh.version);
        else if (a[0] === 'list') s = synth.listText(host.domains);
        else if (dom && a[0] === 'domblklist') s = synth.domblklistText(dom, a.includes('--details'));
        else if (dom && a[0] === 'domiflist') s = synth.domiflistText(dom);
        else if (dom && a[0] === 'dominfo') s = synth.dominfoText(dom);
        if (s === undefined) continue;
        expect(normText(s), `${fx.name} #${c.seq} virsh ${a.join(' ')}`).toBe(c.stdout);
        checked++;
      }
    }
    expect(checked).toBeGreaterThan(0);
  });
});

describe.sequential('golden: replay of the original nasbackup.sh', () => {
  let passed = 0;
  let failed = 0;
  beforeAll(() => acquireSuiteLock(15 * 60_000), 16 * 60_000);
  afterAll(async () => {
    try {
      if (!KEEP) await removeSandbox();
    } finally {
      releaseSuiteLock();
    }
    say(`golden: ${passed} passed, ${failed} failed`);
  });

  for (const fx of fixtures) {
    it(
      fx.name,
      async () => {
        const r = resolve(fx, table);
        const out = await replay(fx, table.argv);
        const diffs = compare(fx, out, r, table);
        const rules = r.rules.map((x) => x.id).join(', ') || 'as recorded';
        if (diffs.length === 0) passed++;
        else failed++;
        say(`golden ${diffs.length === 0 ? 'PASS' : 'FAIL'} ${fx.name} (${(out.ms / 1000).toFixed(1)} s; ${rules})`);
        expect(diffs.map((d) => `[${d.check}] ${d.message}`)).toEqual([]);
      },
      90_000,
    );
  }
});
