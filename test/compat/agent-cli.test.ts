// `bin/nasbackup agent` end to end: wire command JSON on stdin, the operation run
// for real (qemu-img, a real bind mount of a local folder as the NAS), the wire
// answer on stdout, exit 0.
import { existsSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { decodeAnswers } from '../../compat/index.js';
import { parseAgentArgs, runAgent } from '../../lib/cli/agent.js';
import { rootFile, seedChain, TS, VM, VOL } from '../helpers/chain.js';
import { leftovers, logText, makeSandbox, spawnAgent, type Sandbox } from '../helpers/cli.js';
import { checkExitCode, contentSha256, info } from '../helpers/qemu.js';
import { removeTempDirs } from '../helpers/tmp.js';
import { snapshotTree } from '../helpers/tree.js';
import { ANSWER_REBASE_OR_DELETE_OK } from './examples.js';
import {
  BACKUP_PATH,
  bitmapsIn,
  compareImages,
  DATA_VOL,
  duSb,
  expectClean,
  FAST_POLL,
  NEW_BITMAP,
  PARENT_BITMAP,
  PARENT_TS,
  POOL,
  ROOT_VOL,
  rootFile as vmRootFile,
  scenario,
  VM as SVM,
  type Scenario,
} from '../backup/scenario.js';

afterAll(removeTempDirs);

const P = 'org.apache.cloudstack.backup.';
const esc = (x: string): string => x.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');

const agent = spawnAgent;

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
    expect(log).toMatch(
      /> agent\[rebase-era\]: run -o rebase -t none -s \S+ -m bind --rebase-target i-2-10-VM\/2025\.01\.03\.00\.00\.00\/root\.\S+ --rebase-new-backing /,
    );
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
    expect(a!.details).toMatch(
      /^New backing file does not exist: \S+\/csbackup\.\w{5}\/i-2-10-VM\/2099\.01\.01\.00\.00\.00\/root\.\S+\.qcow2\n$/,
    );
    expect(snapshotTree(sb.nas)).toEqual(snap);
    expect(leftovers(sb)).toEqual({ dirs: [], mounts: [] });
    expect(logText(sb)).toMatch(/agent\[rebase-era\]: RebaseBackupCommand: Failed to rebase backup file /);
  });

  it('GetBackupStorageStatsCommand answers the 1K-block sizes with result=false, details = the stdout as read, untrimmed', async () => {
    const sb = makeSandbox('agent-stats');
    const r = await agent(sb, request('GetBackupStorageStatsCommand', nas(sb)), ['--profile', 'newest']);
    expect(r).toMatchObject({ code: 0, stderr: '' });
    // The sizes in the fields are the very tokens of the details (back-references), the mount point ours.
    expect(r.stdout).toMatch(
      new RegExp(
        String.raw`^\[\{"org\.apache\.cloudstack\.backup\.BackupStorageStatsAnswer":\{"totalSize":(\d+),"usedSize":(\d+),"result":false,` +
          String.raw`"details":"${esc(sb.tmp)}/csbackup\.[A-Za-z0-9]{5}\\n\1 \2\\n","contextMap":\{\},"wait":0,"bypassHostMaintenance":false\}\}\]\n$`,
      ),
    );
    const [a] = decodeAnswers(r.stdout);
    expect((a as { totalSize: bigint }).totalSize).toBeGreaterThan(0n);
    expect(leftovers(sb)).toEqual({ dirs: [], mounts: [] });
  });

  it('NASBACKUP_AGENT_PROFILE=merged: no rebase wrapper there, so nothing is mounted or changed', async () => {
    const sb = chained('agent-merged');
    const snap = snapshotTree(sb.nas);
    const r = await agent(
      sb,
      request('RebaseBackupCommand', { targetPath: rootFile(TS[2]), newBackingPath: rootFile(TS[0]), ...nas(sb) }),
      [],
      { NASBACKUP_AGENT_PROFILE: 'merged' },
    );
    expect(r.code).toBe(0);
    expect(decodeAnswers(r.stdout)).toEqual([
      expect.objectContaining({
        cls: 'BackupAnswer',
        result: false,
        details: expect.stringMatching(/not handled by the merged agent profile/),
      }),
    ]);
    expect(snapshotTree(sb.nas)).toEqual(snap);
    expect(logText(sb)).not.toMatch(/mount/);
  });

  // A stopped VM's TakeBackupCommand: the disks as the provider lists them (local pool).
  const stoppedTake = (s: Scenario, over: object = {}): string =>
    request('TakeBackupCommand', {
      vmName: SVM,
      backupPath: BACKUP_PATH,
      ...nas(s.sb),
      volumePools: [s.rootDisk, s.dataDisk].map(() => ({ uuid: POOL, poolType: 'Filesystem', path: s.primary })),
      volumePaths: [s.rootDisk, s.dataDisk],
      quiesce: false,
      ...over,
    });
  const fileSize = (s: Scenario, f: string): number => statSync(join(s.final, f)).size;

  it('stopped VM, -M incremental without parentPath (rebase-era): the full copy, answered as a fallback, markers kept in details', async () => {
    const s = scenario('agent-stopped-inc', { dataDisk: true, state: 'shut off' });
    const r = await agent(s.sb, stoppedTake(s, { mode: 'incremental', bitmapNew: NEW_BITMAP, bitmapParent: PARENT_BITMAP }));
    expect(r).toMatchObject({ code: 0, stderr: '' });
    const data = fileSize(s, `datadisk.${DATA_VOL}.qcow2`);
    const root = fileSize(s, `root.${ROOT_VOL}.qcow2`);
    // What the G1/G2 wrapper answers for the original's output: the whole stdout trimmed once,
    // sizes in ls order (datadisk first), their sum as the size.
    expect(r.stdout).toBe(
      String.raw`[{"org.apache.cloudstack.backup.BackupAnswer":{"size":${data + root},"bitmapCreated":"${NEW_BITMAP}","incrementalFallback":true,"result":true,` +
        String.raw`"details":"INCREMENTAL_FALLBACK\u003dfull (VM stopped — incremental requires running VM)\nBITMAP_CREATED\u003d${NEW_BITMAP}\n${data}\n${root}",` +
        String.raw`"contextMap":{},"wait":0,"bypassHostMaintenance":false}}]` +
        '\n',
    );
    expect(logText(s.sb)).toMatch(
      new RegExp(
        `agent\\[rebase-era\\]: run -o backup -v ${SVM} .* -M incremental --bitmap-new ${NEW_BITMAP} --bitmap-parent ${PARENT_BITMAP}\n`,
      ),
    );
    expect(compareImages(join(s.final, `root.${ROOT_VOL}.qcow2`), s.rootDisk)).toBe('Images are identical.');
    expect(bitmapsIn(s.rootDisk)).toEqual([NEW_BITMAP]);
    expect(bitmapsIn(s.dataDisk!)).toEqual([NEW_BITMAP]);
    expectClean(s);
  });

  it('stopped VM, -M incremental with a partial parent list (merged): INCREMENTAL_FALLBACK=true stays in details', async () => {
    const s = scenario('agent-stopped-merged', { dataDisk: true, state: 'shut off' });
    const over = { mode: 'incremental', bitmapNew: NEW_BITMAP, bitmapParent: PARENT_BITMAP, parentPaths: [vmRootFile(PARENT_TS)] };
    const r = await agent(s.sb, stoppedTake(s, over), ['--profile', 'merged']);
    expect(r).toMatchObject({ code: 0, stderr: '' });
    const data = fileSize(s, `datadisk.${DATA_VOL}.qcow2`);
    const root = fileSize(s, `root.${ROOT_VOL}.qcow2`);
    expect(r.stdout).toBe(
      String.raw`[{"org.apache.cloudstack.backup.BackupAnswer":{"size":${data + root},"bitmapCreated":"${NEW_BITMAP}","incrementalFallback":true,"result":true,` +
        String.raw`"details":"INCREMENTAL_FALLBACK\u003dtrue\n${data}\n${root}","contextMap":{},"wait":0,"bypassHostMaintenance":false}}]` +
        '\n',
    );
    expectClean(s);
  });

  it('running VM, -M full (rebase-era): details end with the BITMAP_CREATED= marker, the size is the du total before it', async () => {
    const s = scenario('agent-running-full');
    const body = { vmName: SVM, backupPath: BACKUP_PATH, ...nas(s.sb), quiesce: false, mode: 'full', bitmapNew: NEW_BITMAP };
    const r = await agent(s.sb, request('TakeBackupCommand', body), [], FAST_POLL);
    expect(r).toMatchObject({ code: 0, stderr: '' });
    const du = duSb(s.final);
    expect(r.stdout).toBe(
      String.raw`[{"org.apache.cloudstack.backup.BackupAnswer":{"size":${du},"bitmapCreated":"${NEW_BITMAP}","incrementalFallback":false,"result":true,` +
        String.raw`"details":"Job type:         Completed   \nOperation:        Backup      \nTime elapsed:     133          ms\n` +
        String.raw`File processed:   16.000 MiB\nFile remaining:   0.000 B\nFile total:       16.000 MiB\n\n${du}\nBITMAP_CREATED\u003d${NEW_BITMAP}",` +
        String.raw`"contextMap":{},"wait":0,"bypassHostMaintenance":false}}]` +
        '\n',
    );
    expect(s.fake.checkpointNames(SVM)).toEqual([NEW_BITMAP]);
    expectClean(s);
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
    [['-x'], { error: expect.stringMatching(/^Invalid agent option: -x/) }],
  ])('parseAgentArgs(%j)', (args, out) => expect(parseAgentArgs(args)).toEqual(out));

  it('runAgent in-process: bad input is answered on the answer channel (exit 0) without running anything', async () => {
    const sb = makeSandbox('agent-inproc');
    const r = await runAgent('not json', { env: { NASBACKUP_LOG_FILE: sb.logFile }, scriptName: '/x/nasbackup.sh' });
    expect(r.exitCode).toBe(0);
    expect(r.stdout).toMatch(
      /^\[\{"org\.apache\.cloudstack\.backup\.BackupAnswer":\{"result":false,"details":"nasbackup agent: Malformed JSON at offset 0: /,
    );
    expect(r.stdout.endsWith('}}]\n')).toBe(true);
    expect(logText(sb)).toMatch(/agent\[rebase-era\]: request: nasbackup agent: Malformed JSON/);
  });
});
