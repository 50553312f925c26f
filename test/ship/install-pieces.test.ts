// The parts of install-agent-hook on their own: the launcher text renders and is
// recognised as ours (and nothing else is), every probe goes through the Runner with its
// deadline, a failing probe is refused with the same words and changes nothing, and
// lib/install stays below lib/cli and lib/ops.
import { chmodSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import { wantsJson } from '../../lib/cli/args.js';
import { NasbackupError } from '../../lib/errors.js';
import { Runner, type RunResult } from '../../lib/exec.js';
import { isLauncher, LAUNCHER_MARKER, launcherText, ORIG_SUFFIX, type LauncherSpec } from '../../lib/install/launcher.js';
import { checkLaunch, checkNode, PROBE_TIMEOUT_MS, type ProbeRunner } from '../../lib/install/node-probe.js';
import { installAgentHook } from '../../lib/install/transaction.js';
import { createLogger } from '../../lib/log.js';
import { BIN } from '../helpers/cli.js';
import { scriptedRunner, type Call } from '../helpers/runner.js';
import { removeTempDirs, tempDir } from '../helpers/tmp.js';

afterAll(removeTempDirs);

/** A real Runner, with every call recorded. */
function recording(logFile: string): { runner: ProbeRunner; calls: Call[] } {
  const real = new Runner(createLogger(logFile));
  const calls: Call[] = [];
  return {
    calls,
    runner: { run: (command, args, opts) => (calls.push({ command, args, opts }), real.run(command, args, opts)) },
  };
}

/** A stand-in Runner that answers every call with `result` (failure injection). */
const answering = (result: Partial<RunResult>): ProbeRunner => scriptedRunner(() => result).runner;

async function refusal(p: Promise<unknown>): Promise<NasbackupError> {
  const e = await p.then(
    () => null,
    (err: unknown) => err,
  );
  expect(e).toBeInstanceOf(NasbackupError);
  return e as NasbackupError;
}

describe('the launcher: render and recognise', () => {
  const specs: LauncherSpec[] = [
    { node: '/usr/bin/node', entry: '/opt/nasbackup/nasbackup.cjs', target: '/usr/share/x/nasbackup.sh', version: '0.1.0' },
    { node: "/opt/it's node/bin/node", entry: '/opt/a b/"q" $HOME/n.cjs', target: '/srv/with space/nasbackup.sh', version: '1.2.3-rc.1' },
    { node: '/n', entry: '/e', target: '/t\nnewline.sh', version: '9' },
  ];

  it.each(specs)('a rendered launcher is ours, and renders identically again (%o)', (spec) => {
    const text = launcherText(spec);
    expect(isLauncher(text)).toBe(true);
    expect(launcherText({ ...spec })).toBe(text); // idempotent install compares texts
    expect(text.startsWith('#!/bin/sh\n')).toBe(true);
    expect(text.endsWith('"$@"\n')).toBe(true);
  });

  it('names the original beside it and tells how to roll back', () => {
    const text = launcherText(specs[0]!);
    expect(text.split('\n')[1]).toBe(`${LAUNCHER_MARKER} (nasbackup 0.1.0); the original script is nasbackup.sh${ORIG_SUFFIX} beside it.`);
    expect(text).toContain(`install-agent-hook --uninstall --target '/usr/share/x/nasbackup.sh'`);
  });

  it('a change of node, entry or version is a different text (so the launcher is rewritten)', () => {
    const base = launcherText(specs[0]!);
    for (const change of [{ node: '/usr/local/bin/node' }, { entry: '/opt/other.cjs' }, { version: '0.2.0' }]) {
      expect(launcherText({ ...specs[0]!, ...change })).not.toBe(base);
    }
  });

  it.each([
    ['an empty file', ''],
    ['one line', '#!/bin/sh'],
    ['the marker on line 1', `${LAUNCHER_MARKER}\n#!/bin/sh\n`],
    ['the marker on line 3', `#!/bin/sh\n# upstream\n${LAUNCHER_MARKER}\n`],
    ['the marker indented', `#!/bin/sh\n  ${LAUNCHER_MARKER}\n`],
    ['an upstream script', '#!/usr/bin/bash\n# nasbackup.sh\nset -e\n'],
  ])('%s is not ours', (_name, text) => {
    expect(isLauncher(text)).toBe(false);
  });
});

describe('the probes go through the Runner', () => {
  it('checkNode runs the Node.js given, with the probe deadline, and the Runner logs it', async () => {
    const log = join(tempDir('probe-log'), 'agent.log');
    const { runner, calls } = recording(log);
    const env = { PATH: '/usr/bin:/bin' };
    expect(await checkNode(runner, process.execPath, env)).toBe(process.versions.node);
    expect(calls).toHaveLength(1);
    expect(calls[0]).toMatchObject({
      command: process.execPath,
      args: ['-e', 'process.stdout.write(process.versions.node)'],
      opts: { timeoutMs: PROBE_TIMEOUT_MS, env },
    });
    expect(readFileSync(log, 'utf8')).toMatch(/> exec: \S+ -e process\.stdout\.write\(process\.versions\.node\) -> exit 0 \(\d+ ms\)\n$/);
  });

  it('checkLaunch runs `<node> <entry> --version` the way the launcher will', async () => {
    const log = join(tempDir('probe-launch'), 'agent.log');
    const { runner, calls } = recording(log);
    await checkLaunch(runner, process.execPath, BIN, { PATH: '/usr/bin:/bin' });
    expect(calls).toEqual([
      { command: process.execPath, args: [BIN, '--version'], opts: { timeoutMs: PROBE_TIMEOUT_MS, env: { PATH: '/usr/bin:/bin' } } },
    ]);
    expect(readFileSync(log, 'utf8')).toContain(' --version -> exit 0 ');
  });

  it.each<[string, Partial<RunResult>, string]>([
    ['times out', { exitCode: null, timedOut: true }, `(timed out after ${PROBE_TIMEOUT_MS / 1000} s)`],
    ['cannot start', { exitCode: null, spawnError: 'EACCES' }, `(spawn ${process.execPath} EACCES)`],
    ['is killed', { exitCode: null, signal: 'SIGKILL' }, '(killed by SIGKILL)'],
    ['exits 3', { exitCode: 3, stderr: 'boom\n' }, '(exit 3)'],
    ['prints no version', { exitCode: 0, stdout: 'hello' }, '(exit 0)'],
  ])('a Node.js probe that %s: NODE_MISSING, says why', async (_name, result, why) => {
    const e = await refusal(checkNode(answering(result), process.execPath, {}));
    expect(e.code).toBe('NODE_MISSING');
    expect(e.message).toBe(`${process.execPath} does not run as Node.js ${why}; pass --node <absolute path>`);
  });

  it('a launch probe that fails: INSTALL_FAILED with the last lines of its output', async () => {
    const stderr = ['1', '2', '3', '4', '5', '6', 'Error: cannot load'].join('\n');
    const e = await refusal(checkLaunch(answering({ exitCode: 1, stderr }), '/n', '/e', {}));
    expect(e.code).toBe('INSTALL_FAILED');
    expect(e.message).toBe('/n /e --version does not work (exit 1); nothing changed');
    expect(e.details).toBe('3\n4\n5\n6\nError: cannot load');
  });
});

describe('the transaction refuses before writing', () => {
  it('a launch probe that times out leaves the script folder exactly as it was', async () => {
    const dir = tempDir('probe-txn');
    const target = join(dir, 'nasbackup.sh');
    writeFileSync(target, '#!/bin/sh\necho upstream\n');
    chmodSync(target, 0o755);
    // The Node.js probe answers; the launch probe times out.
    const runner: ProbeRunner = {
      run: (command, args, opts) =>
        args[0] === '-e'
          ? answering({ stdout: process.versions.node }).run(command, args, opts)
          : answering({ exitCode: null, timedOut: true }).run(command, args, opts),
    };
    const e = await refusal(installAgentHook({ target, node: process.execPath, entry: BIN, version: '0.0.0', env: {}, runner }));
    expect(e.code).toBe('INSTALL_FAILED');
    expect(e.message).toMatch(/--version does not work \(timed out after 30 s\); nothing changed$/);
    expect(readdirSync(dir)).toEqual(['nasbackup.sh']);
    expect(readFileSync(target, 'utf8')).toBe('#!/bin/sh\necho upstream\n');
  });
});

describe('the command around it', () => {
  it('shares wantsJson: the value of --target/--node is a path, even "--json"', () => {
    const takesValue = (a: string): boolean => a === '--target' || a === '--node';
    expect(wantsJson(['--target', '--json'], takesValue)).toBe(false);
    expect(wantsJson(['--node', '/n', '--json'], takesValue)).toBe(true);
    expect(wantsJson(['--target=/x', '--json'], takesValue)).toBe(true);
    expect(wantsJson(['-m', '--json'], takesValue)).toBe(true); // -m is the agent CLI's, not install's
  });

  it('lib/install imports neither lib/cli nor lib/ops, and starts no process of its own', () => {
    const dir = fileURLToPath(new URL('../../lib/install/', import.meta.url));
    const files = readdirSync(dir).filter((f) => f.endsWith('.ts'));
    expect(files.sort()).toEqual(['launcher.ts', 'node-probe.ts', 'transaction.ts']);
    for (const f of files) {
      const src = readFileSync(join(dir, f), 'utf8');
      const from = [...src.matchAll(/from '([^']+)'/g)].map((m) => m[1]!);
      expect(
        from.filter((p) => p.startsWith('../cli') || p.startsWith('../ops')),
        f,
      ).toEqual([]);
      expect(
        from.filter((p) => p === 'node:child_process' || p === 'execa'),
        f,
      ).toEqual([]);
    }
  });
});
