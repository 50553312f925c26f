// install-agent-hook in a temporary root: the launcher at the agent's script path, the
// original kept byte for byte, idempotent, --uninstall restores it exactly, and every
// refusal is one line, a stable code, exit 1 and nothing changed.
import { spawnSync } from 'node:child_process';
import {
  chmodSync,
  chownSync,
  lstatSync,
  mkdirSync,
  readdirSync,
  readFileSync,
  rmSync,
  statSync,
  symlinkSync,
  utimesSync,
  writeFileSync,
} from 'node:fs';
import { dirname, join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  compareVersions,
  DEFAULT_AGENT_SCRIPT,
  isLauncher,
  launcherText,
  LAUNCHER_MARKER,
  MIN_NODE_VERSION,
  NODE_FLAGS,
  parseInstallArgs,
  shQuote,
} from '../../lib/cli/install.js';
import { type ERROR_CODES } from '../../lib/errors.js';
import { BIN } from '../helpers/cli.js';
import { removeTempDirs, tempDir } from '../helpers/tmp.js';
import { buildBundle, PKG, runProgram } from './ship.js';

afterAll(removeTempDirs);

let bundle: string;
beforeAll(() => {
  bundle = buildBundle('ship-install');
}, 120_000);

/** The original script: not even valid UTF-8, odd mode, another owner, an old mtime. */
const ORIGINAL = Buffer.concat([
  Buffer.from('#!/usr/bin/bash\n# upstream nasbackup.sh\necho "$@"\n'),
  Buffer.from([0xff, 0xfe, 0x00, 0x0a]),
]);
const MODE = 0o750;
const UID = 1234;
const GID = 5678;
const MTIME = new Date('2024-03-01T12:00:00Z');

interface Root {
  root: string;
  dir: string;
  target: string;
  orig: string;
  log: string;
}

function agentRoot(tag: string): Root {
  const root = tempDir(tag);
  const target = join(root, DEFAULT_AGENT_SCRIPT);
  const dir = dirname(target);
  mkdirSync(dir, { recursive: true });
  writeFileSync(target, ORIGINAL);
  chmodSync(target, MODE);
  chownSync(target, UID, GID);
  utimesSync(target, MTIME, MTIME);
  return { root, dir, target, orig: `${target}.orig`, log: join(root, 'agent.log') };
}

/** Everything that must not change: names, bytes, mode, owner, mtime, inode. */
function fingerprint(dir: string): unknown[] {
  return readdirSync(dir)
    .sort()
    .map((name) => {
      const p = join(dir, name);
      const st = lstatSync(p);
      return {
        name,
        mode: st.mode,
        uid: st.uid,
        gid: st.gid,
        mtime: st.mtimeMs,
        ino: st.ino,
        bytes: st.isFile() ? readFileSync(p).toString('base64') : null,
      };
    });
}

const hook = (r: Root, args: string[], program: string[] = [process.execPath, bundle]) =>
  runProgram(program[0]!, [...program.slice(1), 'install-agent-hook', '--target', r.target, ...args], {
    PATH: process.env.PATH,
    NASBACKUP_LOG_FILE: r.log,
  });

function fakeNode(r: Root, version: string): string {
  const p = join(r.root, `node-${version}`);
  writeFileSync(p, `#!/bin/sh\nprintf '%s' '${version}'\n`);
  chmodSync(p, 0o755);
  return p;
}

describe('install-agent-hook', () => {
  it('installs the launcher, keeps the original as .orig (same inode), and the agent path runs nasbackup', async () => {
    const r = agentRoot('inst-ok');
    const origIno = statSync(r.target).ino;
    const res = await hook(r, []);
    expect(res).toMatchObject({ code: 0, stderr: '' });
    expect(res.stdout).toBe(
      `Installed: ${r.target} now runs ${process.execPath} (Node.js ${process.versions.node}) ${bundle}; the original is ${r.orig}\n`,
    );

    // The launcher: exactly our text, with the original's mode and owner.
    expect(readFileSync(r.target, 'utf8')).toBe(
      launcherText({ node: process.execPath, entry: bundle, target: r.target, version: PKG.version }),
    );
    const lst = statSync(r.target);
    expect({ mode: lst.mode & 0o7777, uid: lst.uid, gid: lst.gid }).toEqual({ mode: MODE, uid: UID, gid: GID });
    // The original: untouched, byte for byte, same inode, mode, owner, mtime.
    const ost = statSync(r.orig);
    expect(readFileSync(r.orig).equals(ORIGINAL)).toBe(true);
    expect({ ino: ost.ino, mode: ost.mode & 0o7777, uid: ost.uid, gid: ost.gid, mtime: ost.mtimeMs }).toEqual({
      ino: origIno,
      mode: MODE,
      uid: UID,
      gid: GID,
      mtime: MTIME.getTime(),
    });
    expect(readdirSync(r.dir).sort()).toEqual(['nasbackup.sh', 'nasbackup.sh.orig']);

    // Run the way the agent does: the script path itself, no shell, a PATH without our Node.js.
    // A CA bundle that cannot load would make Node warn on stderr: the launcher unsets the variable (no TLS here).
    const env = { PATH: '/usr/sbin:/usr/bin:/sbin:/bin', NASBACKUP_LOG_FILE: r.log, NODE_EXTRA_CA_CERTS: join(r.root, 'no-such-ca.pem') };
    expect(await runProgram(r.target, ['--version'], env)).toMatchObject({ code: 0, stdout: `nasbackup ${PKG.version}\n`, stderr: '' });
    const help = await runProgram(r.target, ['-h'], env);
    expect(help.code).toBe(1);
    expect(help.stdout.startsWith(`\nUsage: ${r.target} -o <operation>`)).toBe(true);
    // An empty argument stays one argument ("" after -p reaches the path guard, not "-p needs a value").
    const empty = await runProgram(r.target, ['-o', 'delete', '-t', 'nfs', '-s', 'h:/e', '-m', '', '-p', ''], env);
    expect(empty).toMatchObject({ code: 1, stdout: '-p must not be empty\n' });
    expect(readFileSync(r.log, 'utf8')).toMatch(/> install-agent-hook: Installed: /);
  });

  it('is idempotent: a second run changes nothing; a new --node rewrites the launcher only, never .orig', async () => {
    const r = agentRoot('inst-idem');
    expect((await hook(r, [])).code).toBe(0);
    const installed = fingerprint(r.dir);
    const again = await hook(r, []);
    expect(again).toMatchObject({ code: 0, stderr: '' });
    expect(again.stdout).toMatch(/^Already installed: .*; nothing changed\n$/);
    expect(fingerprint(r.dir)).toEqual(installed);

    const otherNode = join(r.root, 'node-link');
    symlinkSync(process.execPath, otherNode);
    const origBefore = fingerprint(r.dir).filter((e) => (e as { name: string }).name.endsWith('.orig'));
    const upd = await hook(r, ['--node', otherNode, '--json']);
    expect(upd.code).toBe(0);
    expect(JSON.parse(upd.stdout)).toMatchObject({
      ok: true,
      action: 'updated',
      target: r.target,
      orig: r.orig,
      node: otherNode,
      entry: bundle,
    });
    expect(readFileSync(r.target, 'utf8')).toContain(`exec ${shQuote(otherNode)} ${NODE_FLAGS.join(' ')} ${shQuote(bundle)} "$@"`);
    expect(fingerprint(r.dir).filter((e) => (e as { name: string }).name.endsWith('.orig'))).toEqual(origBefore);
    const lst = statSync(r.target);
    expect({ mode: lst.mode & 0o7777, uid: lst.uid, gid: lst.gid }).toEqual({ mode: MODE, uid: UID, gid: GID });
    expect(readdirSync(r.dir).sort()).toEqual(['nasbackup.sh', 'nasbackup.sh.orig']);
  });

  it('--uninstall restores the original byte for byte (inode, mode, owner, mtime); again: not installed, nothing changed', async () => {
    const r = agentRoot('inst-undo');
    const pristine = fingerprint(r.dir);
    expect((await hook(r, [])).code).toBe(0);
    const un = await hook(r, ['--uninstall']);
    expect(un).toMatchObject({ code: 0, stdout: `Restored the original ${r.target} from ${r.orig}\n`, stderr: '' });
    expect(fingerprint(r.dir)).toEqual(pristine);
    expect(readFileSync(r.target).equals(ORIGINAL)).toBe(true);

    const again = await hook(r, ['--uninstall', '--json']);
    expect(again.code).toBe(0);
    expect(JSON.parse(again.stdout)).toEqual({
      ok: true,
      command: 'install-agent-hook',
      action: 'not-installed',
      target: r.target,
      orig: r.orig,
      errors: [],
      warnings: [],
    });
    expect(fingerprint(r.dir)).toEqual(pristine);
  });

  it('a symbolic link at the script path is kept as .orig and restored as the same link', async () => {
    const r = agentRoot('inst-link');
    const real = join(r.root, 'real-nasbackup.sh');
    writeFileSync(real, ORIGINAL, { mode: 0o755 });
    rmSync(r.target);
    symlinkSync(real, r.target);
    const pristine = fingerprint(r.dir);
    expect((await hook(r, [])).code).toBe(0);
    expect(lstatSync(r.orig).isSymbolicLink()).toBe(true);
    expect(isLauncher(readFileSync(r.target, 'utf8'))).toBe(true);
    expect(readFileSync(real).equals(ORIGINAL)).toBe(true);
    expect((await hook(r, ['--uninstall'])).code).toBe(0);
    expect(fingerprint(r.dir)).toEqual(pristine);
  });

  it('works from bin/nasbackup too (the launcher then runs the checkout)', async () => {
    const r = agentRoot('inst-bin');
    const res = await hook(r, [], [BIN]);
    expect(res.code).toBe(0);
    expect(readFileSync(r.target, 'utf8')).toContain(`exec ${shQuote(process.execPath)} ${NODE_FLAGS.join(' ')} ${shQuote(BIN)} "$@"`);
    expect(await runProgram(r.target, ['--version'], { PATH: '/usr/bin:/bin' })).toMatchObject({
      code: 0,
      stdout: `nasbackup ${PKG.version}\n`,
    });
    expect((await hook(r, ['--uninstall'], [BIN])).code).toBe(0);
    expect(readFileSync(r.target).equals(ORIGINAL)).toBe(true);
  });
});

describe('refusals: one line, a stable code, exit 1, nothing changed', () => {
  type Setup = (r: Root) => Promise<string[]> | string[];
  const cases: Array<[string, keyof typeof ERROR_CODES, Setup, RegExp]> = [
    [
      'Node.js missing',
      'NODE_MISSING',
      () => ['--node', '/nonexistent/bin/node'],
      /^Node\.js not found at \/nonexistent\/bin\/node; install Node\.js >= 18\.19\.0 or pass --node <absolute path>$/,
    ],
    ['--node not absolute', 'INVALID_ARGUMENT', () => ['--node', 'node'], /^--node must be an absolute path/],
    [
      'Node.js 16',
      'NODE_TOO_OLD',
      (r) => ['--node', fakeNode(r, 'v16.20.2')],
      /^Node\.js 16\.20\.2 at .* is too old: nasbackup needs Node\.js >= 18\.19\.0$/,
    ],
    ['Node.js 18.18', 'NODE_TOO_OLD', (r) => ['--node', fakeNode(r, 'v18.18.2')], /^Node\.js 18\.18\.2 at .* is too old/],
    [
      'a "node" that cannot run the program',
      'INSTALL_FAILED',
      (r) => ['--node', fakeNode(r, 'v18.19.0')],
      /--version does not work .*; nothing changed$/,
    ],
    ['a directory as --node', 'NODE_MISSING', (r) => ['--node', r.dir], /^Node\.js not an executable file at /],
    [
      'script folder missing',
      'INSTALL_TARGET_MISSING',
      (r) => ['--target', join(r.root, 'no/such/dir/nasbackup.sh')],
      /^The folder of .* does not exist/,
    ],
    [
      'script missing',
      'INSTALL_TARGET_MISSING',
      (r) => ['--target', join(r.dir, 'other.sh')],
      /other\.sh does not exist: is the CloudStack KVM agent installed here\?/,
    ],
    ['a directory as target', 'INSTALL_TARGET_MISSING', (r) => ['--target', r.dir], /is a directory/],
    ['an unknown option', 'INVALID_OPTION', () => ['--force'], /^Invalid option: --force \(usage: /],
    ['--target without a value', 'MISSING_OPTION_VALUE', () => ['--target'], /^Option --target requires a value$/],
    [
      '.orig exists but the script was changed by someone else (agent upgrade)',
      'INSTALL_CONFLICT',
      async (r) => {
        expect((await hook(r, [])).code).toBe(0);
        writeFileSync(r.target, '#!/bin/bash\n# a newer upstream nasbackup.sh\n');
        return [];
      },
      /is not a nasbackup launcher but .*\.orig exists .*; nothing changed\. Compare /,
    ],
    [
      'our launcher without .orig',
      'INSTALL_CONFLICT',
      async (r) => {
        expect((await hook(r, [])).code).toBe(0);
        rmSync(r.orig);
        return [];
      },
      /is a nasbackup launcher but the original .* is missing/,
    ],
  ];

  it.each(cases)('%s -> %s', async (_name, code, setup, message) => {
    for (const json of [false, true]) {
      const r = agentRoot('inst-refuse');
      const args = await setup(r);
      const before = fingerprint(r.dir);
      const res = await hook(r, [...(json ? ['--json'] : []), ...args]);
      expect(res.code).toBe(1);
      expect(res.stderr).toBe('');
      if (json) {
        const out = JSON.parse(res.stdout) as { ok: boolean; errors: Array<{ code: string; exitCode: number; message: string }> };
        expect(out).toMatchObject({ ok: false, errors: [{ code, exitCode: 1 }] });
        expect(out.errors[0]!.message).toMatch(message);
      } else {
        expect(res.stdout.split('\n')[0]).toMatch(message);
        if (code !== 'INSTALL_FAILED') expect(res.stdout.endsWith('\n') && res.stdout.split('\n').length).toBe(2); // one line
      }
      expect(fingerprint(r.dir)).toEqual(before);
      expect(readFileSync(r.log, 'utf8')).toContain(`ERROR [${code}] install-agent-hook: `);
    }
  });

  it.each([
    [
      'the script was changed by someone else',
      (r: Root) => writeFileSync(r.target, '#!/bin/bash\n# newer upstream\n'),
      /is not a nasbackup launcher but .* exists/,
    ],
    ['.orig is gone', (r: Root) => rmSync(r.orig), /the original .* is missing/],
    ['the script is gone', (r: Root) => rmSync(r.target), /is missing but .* exists/],
  ])('--uninstall when %s: INSTALL_CONFLICT, nothing changed', async (_name, spoil, message) => {
    const r = agentRoot('inst-unrefuse');
    expect((await hook(r, [])).code).toBe(0);
    spoil(r);
    const before = fingerprint(r.dir);
    const res = await hook(r, ['--uninstall']);
    expect(res.code).toBe(1);
    expect(res.stdout).toMatch(message);
    expect(res.stdout.split('\n')).toHaveLength(2);
    expect(fingerprint(r.dir)).toEqual(before);
  });
});

describe('the launcher text', () => {
  it('passes every argument through unchanged (empty ones, spaces, quotes, globs) and names the script', () => {
    const root = tempDir('inst-argv');
    const node = join(root, "fake node's bin");
    writeFileSync(node, '#!/bin/sh\nprintf "%s\\n" "$NASBACKUP_SCRIPT_NAME"; for a in "$@"; do printf "[%s]\\n" "$a"; done\n');
    chmodSync(node, 0o755);
    const target = join(root, 'nasbackup.sh');
    const entry = join(root, 'it is "here" $HOME.cjs');
    writeFileSync(target, launcherText({ node, entry, target, version: '1.2.3' }));
    chmodSync(target, 0o755);
    const args = ['-o', 'backup', '-m', '', '-d', '', 'a b', "it's", '$HOME', '*', '\\n', '-q', 'false'];
    const r = spawnSync(target, args, { encoding: 'utf8', env: { PATH: '/usr/bin:/bin' }, cwd: root });
    expect(r.status).toBe(0);
    // Node gets its V8 flags first (NODE_FLAGS), then the program and every argument as given.
    expect(r.stdout).toBe([target, ...[...NODE_FLAGS, entry, ...args].map((a) => `[${a}]`)].join('\n') + '\n');
  });

  it('starts with #!/bin/sh and carries the marker on line 2; anything else is not ours', () => {
    const t = launcherText({
      node: '/usr/bin/node',
      entry: '/opt/nasbackup/nasbackup.cjs',
      target: DEFAULT_AGENT_SCRIPT,
      version: '0.1.0',
    });
    expect(t.split('\n')[0]).toBe('#!/bin/sh');
    expect(t.split('\n')[1]!.startsWith(LAUNCHER_MARKER)).toBe(true);
    expect(t.split('\n').at(-2)).toBe(
      `exec '/usr/bin/node' --max-semi-space-size=1 --v8-pool-size=1 --no-liftoff '/opt/nasbackup/nasbackup.cjs' "$@"`,
    );
    expect(isLauncher(t)).toBe(true);
    expect(isLauncher(`#!/bin/bash\n# mentions ${LAUNCHER_MARKER} later\n`)).toBe(false);
    expect(isLauncher(ORIGINAL.toString('utf8'))).toBe(false);
  });
});

describe('install-agent-hook pieces', () => {
  it('MIN_NODE_VERSION is package.json engines.node', () => {
    expect(PKG.engines.node).toBe(`>=${MIN_NODE_VERSION.replace(/\.0$/, '')}`);
  });

  it('compares versions numerically', () => {
    expect(compareVersions('18.19.0', '18.19.0')).toBe(0);
    expect(compareVersions('18.9.0', '18.19.0')).toBe(-1);
    expect(compareVersions('20.0.0', '18.19.0')).toBe(1);
  });

  it('parses its arguments', () => {
    expect(parseInstallArgs([])).toEqual({ target: DEFAULT_AGENT_SCRIPT, uninstall: false, json: false });
    expect(parseInstallArgs(['--target=/x/n.sh', '--node', '/n', '--uninstall', '--json'])).toEqual({
      target: '/x/n.sh',
      node: '/n',
      uninstall: true,
      json: true,
    });
    expect(() => parseInstallArgs(['--uninstall=yes'])).toThrow(/Invalid option/);
    expect(() => parseInstallArgs(['--node', ''])).toThrow(/needs a path/);
  });

  it('--help exits 0 with the full usage', async () => {
    const r = await runProgram(process.execPath, [bundle, 'install-agent-hook', '--help'], { PATH: process.env.PATH });
    expect(r.code).toBe(0);
    expect(r.stdout).toContain(
      'nasbackup install-agent-hook [--target <script path>] [--node <absolute node path>] [--uninstall] [--json]',
    );
  });
});
