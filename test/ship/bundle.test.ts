// The single-file bundle (scripts/bundle.mjs) alone in an empty folder: no node_modules
// anywhere above it, no dist/lib, a decoy package.json and decoy yargs locale files
// beside it (it must read neither). Every operation and operator tool, run for real.
import { existsSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { dirname, join, parse } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { rootFile, seedChain, TS, VM, VOL } from '../helpers/chain.js';
import { BIN, bindNas, leftovers, logText, makeSandbox, type Sandbox } from '../helpers/cli.js';
import { checkExitCode, contentSha256, info } from '../helpers/qemu.js';
import { removeTempDirs } from '../helpers/tmp.js';
import { ANSWER_REBASE_OR_DELETE_OK } from '../compat/examples.js';
import { backupArgv, FAST_POLL, fullFlags, scenario } from '../backup/scenario.js';
import { NODE_FLAGS } from '../../lib/install/launcher.js';
import { buildBundle, PKG, runProgram } from './ship.js';

afterAll(removeTempDirs);

let bundle: string;

beforeAll(() => {
  bundle = buildBundle('ship-bundle');
  const folder = dirname(bundle);
  // Decoys: a bundle that looked beside itself would report 9.9.9 or choke on the locales.
  writeFileSync(join(folder, 'package.json'), JSON.stringify({ name: 'nasbackup', version: '9.9.9' }));
  mkdirSync(join(dirname(folder), 'locales'), { recursive: true });
  for (const l of ['C', 'C.UTF-8', 'en', 'en_US', 'en_US.UTF-8'])
    writeFileSync(join(dirname(folder), 'locales', `${l}.json`), '{ not json');
}, 120_000);

/**
 * Run the bundle as the launcher would: `node <bundle> …`, from a cwd that is not the repository.
 * NASBACKUP_TEST_NODE runs it with another Node.js (e.g. 18.x: the oldest the bundle targets).
 */
const NODE = process.env.NASBACKUP_TEST_NODE || process.execPath;
const nb = (sb: Sandbox, args: string[], env: NodeJS.ProcessEnv = {}, stdin?: string) =>
  runProgram(NODE, [bundle, ...args], { ...sb.env, ...env }, { cwd: sb.root, ...(stdin === undefined ? {} : { stdin }) });
const viaBin = (sb: Sandbox, args: string[], env: NodeJS.ProcessEnv = {}) => runProgram(BIN, args, { ...sb.env, ...env }, { cwd: sb.root });

describe('the bundle runs alone', () => {
  it('is one executable file with no node_modules above it', () => {
    expect(readdirSync(dirname(bundle)).sort()).toEqual(['nasbackup.cjs', 'package.json']);
    for (let d = dirname(bundle); d !== parse(d).root; d = dirname(d)) expect(existsSync(join(d, 'node_modules'))).toBe(false);
  });

  it('--version prints the inlined version, exit 0', async () => {
    const sb = makeSandbox('ship-version');
    expect(await nb(sb, ['--version'])).toMatchObject({ code: 0, stdout: `nasbackup ${PKG.version}\n`, stderr: '' });
    const j = await nb(sb, ['--version', '--json']);
    expect(JSON.parse(j.stdout)).toEqual({
      ok: true,
      command: 'version',
      name: 'nasbackup',
      version: PKG.version,
      errors: [],
      warnings: [],
    });
  });

  it('bin/nasbackup and the bundle, run by their shebang, start without NODE_EXTRA_CA_CERTS (no TLS; Node would parse it on every start)', async () => {
    const sb = makeSandbox('ship-ca');
    // A CA bundle that cannot load makes Node warn on stderr, so an empty stderr shows the variable was dropped.
    const env = { NODE_EXTRA_CA_CERTS: join(sb.root, 'no-such-ca.pem') };
    expect(await runProgram(NODE, ['-e', '0'], { ...sb.env, ...env })).toMatchObject({ stderr: expect.stringContaining('no-such-ca.pem') });
    for (const program of [BIN, bundle])
      expect(await runProgram(program, ['--version'], { ...sb.env, ...env }, { cwd: sb.root })).toMatchObject({
        code: 0,
        stdout: `nasbackup ${PKG.version}\n`,
        stderr: '',
      });
  });

  it("the bundle's shebang is bin/nasbackup's, and both pass Node the launcher's V8 flags", () => {
    const first = (f: string): string => readFileSync(f, 'utf8').split('\n', 1)[0]!;
    expect(first(bundle)).toBe(first(BIN));
    expect(/^#!\/usr\/bin\/env -S (?:-u \S+ )*node (.*)$/.exec(first(BIN))?.[1]?.split(' ')).toEqual(NODE_FLAGS);
  });

  it.each([
    [['-h']],
    [['--help']],
    [['-o', 'stats', '-x', 'y']],
    [['-o', 'stats', '-t', 'nfs', '-s', 'h:/e', '-m']],
    [['-o', 'nonsense', '-t', 'nfs', '-s', 'h:/e']],
    [['install-agent-hook', '--help']],
    [['chain', 'list', '-t', 'none', '--vm', 'x']],
  ])('%j: the same bytes and exit code as bin/nasbackup', async (args) => {
    const sb = makeSandbox('ship-same');
    const env = { NASBACKUP_SCRIPT_NAME: '/usr/share/x/nasbackup.sh' };
    const a = await nb(sb, args, env);
    const b = await viaBin(sb, args, env);
    expect(a.stderr).toBe('');
    expect({ code: a.code, stdout: a.stdout }).toEqual({ code: b.code, stdout: b.stdout });
    expect(a.stdout).not.toBe('');
  });

  it('-o stats on a bind-mounted folder: mount point, then "<total> <used>"; --json; nothing left mounted', async () => {
    const sb = makeSandbox('ship-stats');
    const r = await nb(sb, ['-o', 'stats', ...bindNas(sb)]);
    expect(r).toMatchObject({ code: 0, stderr: '' });
    expect(r.stdout).toMatch(new RegExp(`^${sb.tmp}/csbackup\\.\\w+\\n\\d+ \\d+\\n$`));
    const j = await nb(sb, ['-o', 'stats', ...bindNas(sb), '--json']);
    expect(j.code).toBe(0);
    expect(JSON.parse(j.stdout)).toMatchObject({
      ok: true,
      command: 'stats',
      errors: [],
      totalKiB: expect.any(Number),
      usedKiB: expect.any(Number),
    });
    expect(leftovers(sb)).toEqual({ dirs: [], mounts: [] });
    expect(logText(sb)).toMatch(/> exec: df -P /);
  });

  it('rebase and delete on a real qemu-img chain, then chain list and verify', async () => {
    const sb = makeSandbox('ship-chain');
    seedChain(sb.nas);
    const inc2 = join(sb.nas, rootFile(TS[2]));
    const before = contentSha256(inc2, sb.root);
    const rb = await nb(sb, ['-o', 'rebase', ...bindNas(sb), '--rebase-target', rootFile(TS[2]), '--rebase-new-backing', rootFile(TS[0])]);
    expect(rb).toMatchObject({ code: 0, stdout: '', stderr: '' });
    expect(info(inc2)['backing-filename']).toBe(`../${TS[0]}/root.${VOL}.qcow2`);
    const del = await nb(sb, ['-o', 'delete', ...bindNas(sb), '-p', `${VM}/${TS[1]}`]);
    expect(del.code).toBe(0);
    expect(del.stdout.trimEnd().split('\n').at(-1)).toMatch(new RegExp(`^removed directory '.*/${VM}/${TS[1].replace(/\./g, '\\.')}'$`));
    expect(contentSha256(inc2, sb.root)).toBe(before);
    expect(checkExitCode(inc2)).toBe(0);

    const list = await nb(sb, ['chain', 'list', ...bindNas(sb), '--vm', VM]);
    expect(list).toMatchObject({ code: 0, stderr: '' });
    expect(list.stdout).toMatch(new RegExp(`^${VM}: 2 backup\\(s\\)\\n`));
    const verify = await nb(sb, ['chain', 'verify', ...bindNas(sb), '--vm', VM, '--json']);
    expect(verify.code).toBe(0);
    expect(JSON.parse(verify.stdout)).toMatchObject({ ok: true, command: 'chain verify', vm: VM, errors: [] });
    expect(leftovers(sb)).toEqual({ dirs: [], mounts: [] });
  });

  it('yargs messages come out in English without locale files (the decoys are never read)', async () => {
    const sb = makeSandbox('ship-yargs');
    const r = await nb(sb, ['chain', 'list', '-t', 'none', '--vm', 'x'], { LC_ALL: 'en_US.UTF-8' });
    expect(r).toMatchObject({ code: 1, stdout: 'Missing required argument: s\n', stderr: '' });
  });

  it('nasbackup agent: a wire RebaseBackupCommand on stdin, the wire answer on stdout (compat/ inside the bundle)', async () => {
    const sb = makeSandbox('ship-agent');
    seedChain(sb.nas);
    const cmd = JSON.stringify([
      {
        'org.apache.cloudstack.backup.RebaseBackupCommand': {
          targetPath: rootFile(TS[2]),
          newBackingPath: rootFile(TS[0]),
          backupRepoType: 'none',
          backupRepoAddress: sb.nas,
          mountOptions: 'bind',
          contextMap: {},
          wait: 0,
          bypassHostMaintenance: false,
        },
      },
    ]);
    const r = await nb(sb, ['agent'], {}, cmd);
    expect(r).toMatchObject({ code: 0, stdout: `${ANSWER_REBASE_OR_DELETE_OK}\n`, stderr: '' });
  });

  it.each(['running', 'shut off'])('-o backup of a %s VM (libvirt stand-in): the agent format and --json', async (state) => {
    const s = scenario('ship-backup', { dataDisk: true, state });
    const disks = state === 'running' ? '' : [s.rootDisk, s.dataDisk].join(',');
    const r = await nb(s.sb, backupArgv(s, { disks, extra: fullFlags() }), FAST_POLL);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(
      state === 'running' ? /^Job type: +Completed[\s\S]*\n\d+\nBITMAP_CREATED=backup-\d+\n$/ : /^BITMAP_CREATED=backup-\d+\n\d+\n\d+\n$/,
    );
    const j = await nb(s.sb, backupArgv(s, { disks, extra: fullFlags(), path: `${VM}/2025.01.05.00.00.00` }).concat('--json'), FAST_POLL);
    expect(j.code).toBe(0);
    expect(JSON.parse(j.stdout)).toMatchObject({
      ok: true,
      command: 'backup',
      errors: [],
      vm: VM,
      format: state === 'running' ? 'running' : 'stopped',
      bitmapCreated: expect.stringMatching(/^backup-\d+$/),
      ...(state === 'running'
        ? { totalBytes: expect.any(Number), job: { 'Job type': 'Completed' } }
        : { fileSizes: [expect.any(Number), expect.any(Number)] }),
    });
    expect(leftovers(s.sb)).toEqual({ dirs: [], mounts: [] });
  });
});
