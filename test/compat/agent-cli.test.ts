// `bin/nasbackup agent` end to end: wire command JSON on stdin, the operation run
// for real (qemu-img, a real bind mount of a local folder as the NAS), the wire
// answer on stdout, exit 0.
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { decodeAnswers } from '../../compat/index.js';
import { parseAgentArgs, runAgent } from '../../lib/cli/agent.js';
import { rootFile, seedChain, TS, VM, VOL } from '../helpers/chain.js';
import { BIN, leftovers, logText, makeSandbox, type RunOutcome, type Sandbox } from '../helpers/cli.js';
import { checkExitCode, contentSha256, info } from '../helpers/qemu.js';
import { removeTempDirs } from '../helpers/tmp.js';
import { snapshotTree } from '../helpers/tree.js';
import { ANSWER_REBASE_OR_DELETE_OK } from './examples.js';

afterAll(removeTempDirs);

const P = 'org.apache.cloudstack.backup.';

/** Like the agent's transport would hand it over: JSON on stdin, nothing else. */
function agent(sb: Sandbox, input: string, args: string[] = [], env: NodeJS.ProcessEnv = {}): Promise<RunOutcome> {
  const child = spawn(BIN, ['agent', ...args], { env: { ...sb.env, ...env }, stdio: ['pipe', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  child.stdin.end(input);
  return new Promise((res) => child.on('close', (code, signal) => res({ code, signal, stdout, stderr })));
}

/** The NAS as the management server describes it: a local folder bind-mounted. */
const nas = (sb: Sandbox) => ({ backupRepoType: 'none', backupRepoAddress: sb.nas, mountOptions: 'bind' });
const request = (cls: string, body: object): string =>
  JSON.stringify([{ [P + cls]: { ...body, contextMap: { logid: 'e2e' }, wait: 0, bypassHostMaintenance: false } }]);

function chained(tag: string): Sandbox {
  const sb = makeSandbox(tag);
  seedChain(sb.nas);
  return sb;
}

describe('nasbackup agent', () => {
  it('RebaseBackupCommand repairs a real chain and answers BackupAnswer(true) on the wire', async () => {
    const sb = chained('agent-rebase');
    const inc2 = join(sb.nas, rootFile(TS[2]));
    const before = contentSha256(inc2, sb.root);
    const r = await agent(sb, request('RebaseBackupCommand', { targetPath: rootFile(TS[2]), newBackingPath: rootFile(TS[0]), ...nas(sb) }));
    expect(r.stderr).toBe('');
    expect(r).toMatchObject({ code: 0, stdout: `${ANSWER_REBASE_OR_DELETE_OK}\n` });
    // The chain: relinked relative to the target's folder, same content, the middle backup now removable.
    expect(info(inc2)['backing-filename']).toBe(`../${TS[0]}/root.${VOL}.qcow2`);
    const del = await agent(sb, request('DeleteBackupCommand', { backupPath: `${VM}/${TS[1]}`, ...nas(sb) }));
    expect(del).toMatchObject({ code: 0, stdout: `${ANSWER_REBASE_OR_DELETE_OK}\n` });
    expect(existsSync(join(sb.nas, VM, TS[1]))).toBe(false);
    expect(contentSha256(inc2, sb.root)).toBe(before);
    expect(checkExitCode(inc2)).toBe(0);
    expect(leftovers(sb)).toEqual({ dirs: [], mounts: [] });
    const log = logText(sb);
    expect(log).toMatch(/> agent\[rebase-era\]: run -o rebase -t none -s \S+ -m bind --rebase-target i-2-10-VM\/2025\.01\.03\.00\.00\.00\/root\.\S+ --rebase-new-backing /);
    expect(log).toMatch(/> agent\[rebase-era\]: RebaseBackupCommand: answered BackupAnswer result=true/);
  });

  it('a failing rebase answers BackupAnswer(false) with the script stdout, and touches nothing', async () => {
    const sb = chained('agent-rebase-fail');
    const snap = snapshotTree(sb.nas);
    const missing = `${VM}/2099.01.01.00.00.00/root.${VOL}.qcow2`;
    const r = await agent(sb, request('RebaseBackupCommand', { targetPath: rootFile(TS[2]), newBackingPath: missing, ...nas(sb) }));
    expect(r.code).toBe(0);
    const [a] = decodeAnswers(r.stdout);
    expect(a).toMatchObject({ cls: 'BackupAnswer', result: false });
    expect(a!.details).toMatch(/^New backing file does not exist: \S+\/csbackup\.\w{5}\/i-2-10-VM\/2099\.01\.01\.00\.00\.00\/root\.\S+\.qcow2\n$/);
    expect(snapshotTree(sb.nas)).toEqual(snap);
    expect(leftovers(sb)).toEqual({ dirs: [], mounts: [] });
    expect(logText(sb)).toMatch(/agent\[rebase-era\]: RebaseBackupCommand: Failed to rebase backup file /);
  });

  it('GetBackupStorageStatsCommand answers the 1K-block sizes with result=false', async () => {
    const sb = makeSandbox('agent-stats');
    const r = await agent(sb, request('GetBackupStorageStatsCommand', nas(sb)), ['--profile', 'newest']);
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/^\[\{"org\.apache\.cloudstack\.backup\.BackupStorageStatsAnswer":\{"totalSize":\d+,"usedSize":\d+,"result":false,"contextMap":\{\},"wait":0,"bypassHostMaintenance":false\}\}\]\n$/);
    const [a] = decodeAnswers(r.stdout);
    expect((a as { totalSize: bigint }).totalSize).toBeGreaterThan(0n);
    expect(leftovers(sb)).toEqual({ dirs: [], mounts: [] });
  });

  it('NASBACKUP_AGENT_PROFILE=merged: no rebase wrapper there, so nothing is mounted or changed', async () => {
    const sb = chained('agent-merged');
    const snap = snapshotTree(sb.nas);
    const r = await agent(sb, request('RebaseBackupCommand', { targetPath: rootFile(TS[2]), newBackingPath: rootFile(TS[0]), ...nas(sb) }), [], { NASBACKUP_AGENT_PROFILE: 'merged' });
    expect(r.code).toBe(0);
    expect(decodeAnswers(r.stdout)).toEqual([expect.objectContaining({ cls: 'BackupAnswer', result: false, details: expect.stringMatching(/not handled by the merged agent profile/) })]);
    expect(snapshotTree(sb.nas)).toEqual(snap);
    expect(logText(sb)).not.toMatch(/mount/);
  });

  const bad: Array<[string, string, string[], RegExp]> = [
    ['malformed JSON', '[{"org.apache', [], /Malformed JSON/],
    ['unknown class', '[{"com.cloud.agent.api.StartCommand":{}}]', [], /Unknown command class/],
    ['missing field', `[{"${P}DeleteBackupCommand":{"backupRepoType":"none"}}]`, [], /missing the required field "backupPath"/],
    ['unknown profile', '[]', ['--profile', 'g7'], /Unknown agent profile "g7"/],
    ['unknown agent option', '[]', ['--frobnicate'], /Invalid agent option: --frobnicate/],
  ];
  it.each(bad)('bad input (%s): exit 0, BackupAnswer(false) with a clear details, nothing run', async (_n, input, args, details) => {
    const sb = makeSandbox('agent-bad');
    const r = await agent(sb, input, args);
    expect(r.code).toBe(0);
    const answers = decodeAnswers(r.stdout);
    expect(answers).toEqual([expect.objectContaining({ cls: 'BackupAnswer', result: false })]);
    expect(answers[0]!.details).toMatch(details);
    expect(answers[0]!.details).toMatch(/nothing was executed$/);
    expect(logText(sb)).not.toMatch(/exec: /);
  });
});

describe('lib/cli/agent', () => {
  it.each<[string[], ReturnType<typeof parseAgentArgs>]>([
    [[], {}],
    [['--profile', 'merged'], { profile: 'merged' }],
    [['--profile=newest'], { profile: 'newest' }],
    [['--profile'], { error: 'Option --profile requires a value' }],
    [['-x'], { error: expect.stringMatching(/^Invalid agent option: -x/) as unknown as string }],
  ])('parseAgentArgs(%j)', (args, out) => expect(parseAgentArgs(args)).toEqual(out));

  it('runAgent in-process: bad input is answered on the answer channel (exit 0) without running anything', async () => {
    const sb = makeSandbox('agent-inproc');
    const r = await runAgent('not json', { env: { NASBACKUP_LOG_FILE: sb.logFile }, scriptName: '/x/nasbackup.sh' });
    expect(r.exitCode).toBe(0);
    expect(r.stdout).toMatch(/^\[\{"org\.apache\.cloudstack\.backup\.BackupAnswer":\{"result":false,"details":"nasbackup agent: Malformed JSON at offset 0: /);
    expect(r.stdout.endsWith('}}]\n')).toBe(true);
    expect(logText(sb)).toMatch(/agent\[rebase-era\]: request: nasbackup agent: Malformed JSON/);
  });
});
