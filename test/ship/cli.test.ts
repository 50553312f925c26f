// --version, --help covering everything, and --json for the agent-style CLI: one object
// per run, the same error codes and exit codes as the text output, and no change at all
// to the agent's bytes when --json is absent.
import { afterAll, describe, expect, it } from 'vitest';
import { usageText } from '../../lib/agent-output.js';
import { BOOLEAN_FLAGS, JSON_FLAG, OPERATIONS, parseArgs, VALUE_FLAGS, wantsJson } from '../../lib/cli/args.js';
import { OPERATOR_COMMANDS } from '../../lib/cli/entry.js';
import { CHAIN_SUBCOMMANDS } from '../../lib/cli/tools.js';
import { rootFile, seedChain, TS, VM } from '../helpers/chain.js';
import { bindNas, leftovers, makeSandbox, run, writeShim } from '../helpers/cli.js';
import { removeTempDirs } from '../helpers/tmp.js';
import { envVars, PKG } from './ship.js';

afterAll(removeTempDirs);

describe('--version', () => {
  it('prints "nasbackup <package.json version>", exit 0, nothing else', async () => {
    const sb = makeSandbox('ship-ver');
    expect(await run(sb, ['--version'])).toMatchObject({ code: 0, stdout: `nasbackup ${PKG.version}\n`, stderr: '' });
    const j = await run(sb, ['--version', '--json']);
    expect(JSON.parse(j.stdout)).toEqual({
      ok: true,
      command: 'version',
      name: 'nasbackup',
      version: PKG.version,
      errors: [],
      warnings: [],
    });
  });
});

describe('--help', () => {
  const text = usageText('S');

  it('keeps the original first three lines', () => {
    expect(text.split('\n').slice(0, 3)).toEqual([
      '',
      'Usage: S -o <operation> -v|--vm <domain name> -t <storage type> -s <storage address> -m <mount options> -p <backup path> -d <disks path> -q|--quiesce <true|false>',
      '         [-M|--mode <full|incremental>] [--bitmap-new <name>] [--bitmap-parent <name>] [--parent-paths <p1,p2,...>]',
    ]);
  });

  it('names every flag the parser knows, long and short', () => {
    for (const [short, long] of [...VALUE_FLAGS, ...BOOLEAN_FLAGS, [null, JSON_FLAG.slice(2)] as const]) {
      expect(text, `--${long}`).toMatch(new RegExp(`(^|[\\s|\\[])--${long}\\b`, 'm'));
      if (short) expect(text, `-${short}`).toContain(`-${short}|--${long}`);
    }
  });

  it('names every operation, operator command and environment variable', () => {
    for (const op of OPERATIONS) expect(text).toMatch(new RegExp(`^  ${op} `, 'm'));
    for (const c of OPERATOR_COMMANDS) expect(text).toContain(`nasbackup ${c}`);
    expect(text).toContain('nasbackup --version');
    for (const v of envVars()) expect(text, v).toContain(v);
  });

  it("-h still exits 1 (the contract); an operator command --help exits 0 with that command's own usage", async () => {
    const sb = makeSandbox('ship-help');
    const h = await run(sb, ['--help'], { NASBACKUP_SCRIPT_NAME: 'S' });
    expect(h).toMatchObject({ code: 1, stdout: text, stderr: '' });
    for (const c of OPERATOR_COMMANDS) {
      const r = await run(sb, [c, '--help'], { NASBACKUP_SCRIPT_NAME: 'S' });
      expect(r, c).toMatchObject({ code: 0, stderr: '' });
      expect(r.stdout, c).toMatch(new RegExp(`^Usage:[\\s\\S]*nasbackup ${c}`));
      expect(r.stdout, c).not.toContain('-o <operation>'); // not the agent's usage
    }
    for (const sub of CHAIN_SUBCOMMANDS) {
      const r = await run(sb, ['chain', sub, '--help']);
      expect(r, sub).toMatchObject({ code: 0, stderr: '' });
      expect(r.stdout, sub).toMatch(new RegExp(`^Usage: nasbackup chain ${sub} `));
      expect(
        r.stdout.split('\n').filter((l) => l.startsWith('Usage:')),
        sub,
      ).toHaveLength(1);
    }
    expect((await run(sb, ['chain', 'delete', '--help'])).stdout).toContain('--yes');
  });
});

describe('--json on the agent-style CLI', () => {
  it('is a flag only where the parser sees one', () => {
    expect(wantsJson(['-o', 'stats', '--json'])).toBe(true);
    expect(wantsJson(['--json', '-o', 'stats'])).toBe(true);
    expect(wantsJson(['-o', 'stats', '-m', '--json'])).toBe(false);
    expect(wantsJson(['-o', 'stats'])).toBe(false);
    expect(parseArgs(['-o', 'stats', '--json']).json).toBe(true);
    // Taken out before parsing: the rest parses exactly as without it.
    expect(parseArgs(['-o', 'stats', '--json', '-t', 'nfs'])).toEqual({ ...parseArgs(['-o', 'stats', '-t', 'nfs']), json: true });
    expect(parseArgs(['-o', 'stats', '-m', '--json'])).toMatchObject({ json: false, mount: '--json' });
    expect(() => parseArgs(['-o', 'stats', '--json', '-m'])).toThrow(/Option -m requires a value/);
    expect(() => parseArgs(['-o', 'stats', '--no-json'])).toThrow(/Invalid option: --no-json/);
  });

  it('stats: {ok, command, storage, totalKiB, usedKiB, errors, warnings}; exit 0; nothing left', async () => {
    const sb = makeSandbox('ship-json-stats');
    const r = await run(sb, ['--json', '-o', 'stats', ...bindNas(sb)]);
    expect(r).toMatchObject({ code: 0, stderr: '' });
    expect(r.stdout.endsWith('\n') && r.stdout.split('\n')).toHaveLength(2);
    const o = JSON.parse(r.stdout);
    expect(Object.keys(o)).toEqual(['ok', 'command', 'storage', 'totalKiB', 'usedKiB', 'errors', 'warnings']);
    // The NAS by its address: the temporary mount point is gone when anyone reads this.
    expect(o).toMatchObject({ ok: true, command: 'stats', storage: sb.nas, errors: [], warnings: [] });
    expect(r.stdout).not.toContain('csbackup.');
    expect(o.totalKiB).toBeGreaterThan(0);
    expect(leftovers(sb)).toEqual({ dirs: [], mounts: [] });
  });

  it('rebase and delete (and a delete already done)', async () => {
    const sb = makeSandbox('ship-json-chain');
    seedChain(sb.nas);
    const rb = await run(sb, [
      '-o',
      'rebase',
      ...bindNas(sb),
      '--rebase-target',
      rootFile(TS[2]),
      '--rebase-new-backing',
      rootFile(TS[0]),
      '--json',
    ]);
    expect(rb.code).toBe(0);
    expect(JSON.parse(rb.stdout)).toEqual({
      ok: true,
      command: 'rebase',
      target: rootFile(TS[2]),
      newBacking: rootFile(TS[0]),
      changed: true,
      errors: [],
      warnings: [],
    });
    const del = await run(sb, ['-o', 'delete', ...bindNas(sb), '-p', `${VM}/${TS[1]}`, '--json']);
    expect(del.code).toBe(0);
    const d = JSON.parse(del.stdout);
    expect(d).toMatchObject({ ok: true, command: 'delete', path: `${VM}/${TS[1]}`, alreadyGone: false, errors: [], warnings: [] });
    expect(d.removedFiles).toHaveLength(5);
    // NAS-relative, as the operator knows them (the agent's text keeps rm -v's absolute lines).
    expect(d.removedDirectories).toEqual([`${VM}/${TS[1]}`]);
    for (const f of d.removedFiles) expect(f.startsWith(`${VM}/${TS[1]}/`)).toBe(true);
    const again = await run(sb, ['-o', 'delete', ...bindNas(sb), '-p', `${VM}/${TS[1]}`, '--json']);
    expect(JSON.parse(again.stdout)).toMatchObject({ ok: true, removedFiles: [], removedDirectories: [], alreadyGone: true });
  });

  it.each([
    [['-o', 'stats', '-x', 'y'], 'INVALID_OPTION'],
    [['-o', 'nonsense', '-t', 'nfs', '-s', 'h:/e'], 'UNKNOWN_OPERATION'],
    [['-t', 'nfs', '-s', 'h:/e'], 'MISSING_ARGUMENT'],
    [['-o', 'delete', '-t', 'nfs', '-s', 'h:/e', '-m', '', '-p', '../x'], 'PATH_TRAVERSAL'],
    [['-o', 'stats', '-t', 'nfs', '-s', 'h:/e', '-m', '', '-e', '/k'], 'UNSUPPORTED_OPTION'],
    [['-o', 'stats', '-t', 'none', '-s', '/nonexistent/nas', '-m', 'bind'], 'NAS_MOUNT_FAILED'],
  ])('%j --json: {"ok":false,"errors":[{code: %s, …}]}, the same exit code as without --json', async (argv, code) => {
    const sb = makeSandbox('ship-json-err');
    const text = await run(sb, argv);
    const r = await run(sb, [...argv, '--json']);
    expect(r.code).toBe(text.code);
    expect(r.code).toBe(1);
    expect(r.stdout.split('\n')).toHaveLength(2);
    const o = JSON.parse(r.stdout);
    expect(o).toMatchObject({ ok: false, errors: [{ code, exitCode: 1, message: expect.any(String) }], warnings: [] });
    expect(o.command).toBe(argv.includes('stats') ? 'stats' : argv.includes('delete') ? 'delete' : 'nasbackup');
    expect(o.errors).toHaveLength(1);
    expect(text.stdout).toContain(o.errors[0].message);
    expect(leftovers(sb)).toEqual({ dirs: [], mounts: [] });
  });

  it('libvirt down: the error carries virsh’s text in details', async () => {
    const sb = makeSandbox('ship-json-virsh');
    writeShim(sb, 'virsh', "echo 'error: failed to connect to the hypervisor' >&2; exit 1");
    const r = await run(sb, ['-o', 'stats', ...bindNas(sb), '--json']);
    expect(r.code).toBe(1);
    expect(JSON.parse(r.stdout)).toEqual({
      ok: false,
      command: 'stats',
      warnings: [],
      errors: [
        {
          code: 'LIBVIRT_UNAVAILABLE',
          message: 'Cannot query the QEMU/libvirt versions (virsh exited with code 1); is libvirtd running?',
          details: 'error: failed to connect to the hypervisor',
          exitCode: 1,
        },
      ],
    });
  });
});
