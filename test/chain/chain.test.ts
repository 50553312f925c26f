// `nasbackup chain …` on real qemu-img chains with two disks (root + datadisk) on a
// bind-mounted folder: every remaining point in time must read identically afterwards.
import { execFileSync, spawn } from 'node:child_process';
import { existsSync, readdirSync, readFileSync, rmSync, writeFileSync, openSync, writeSync, closeSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { BIN, bindNas, leftovers, makeSandbox, run, start, writeShim, type Sandbox } from '../helpers/cli.js';
import { contentSha256, makeImage, info } from '../helpers/qemu.js';
import { removeTempDirs } from '../helpers/tmp.js';

afterAll(removeTempDirs);

const VM = 'i-2-10-VM';
const TS = ['2025.01.01.00.00.00', '2025.01.02.00.00.00', '2025.01.03.00.00.00', '2025.01.04.00.00.00'];
const DISKS = [
  { file: 'root.aaaaaaaa-0000-4000-8000-000000000001.qcow2' },
  { file: 'datadisk.bbbbbbbb-0000-4000-8000-000000000002.qcow2' },
];
const MiB = 1 << 20;

/** full <- inc1 <- inc2 <- inc3 for both disks; returns each point in time's content hashes. */
function seed(sb: Sandbox): Map<string, string> {
  TS.forEach((ts, i) => {
    DISKS.forEach((d, k) => {
      const backing = i === 0 ? undefined : `../${TS[i - 1]}/${d.file}`;
      makeImage(join(sb.nas, VM, ts, d.file), {
        size: 8 * MiB,
        ...(backing ? { backing } : {}),
        writes: [{ pattern: 0x10 * (i + 1) + k, offset: (i * 1.5 + k * 0.25) * MiB, length: 768 * 1024 }],
        ...(i === 0 ? {} : {}),
      });
    });
    writeFileSync(join(sb.nas, VM, ts, 'domain-config.xml'), `<!-- ${ts} -->\n`);
  });
  return hashes(sb);
}

function hashes(sb: Sandbox): Map<string, string> {
  const m = new Map<string, string>();
  for (const ts of readdirSync(join(sb.nas, VM)).filter((n) => TS.includes(n))) {
    for (const d of DISKS) m.set(`${ts}/${d.file}`, contentSha256(join(sb.nas, VM, ts, d.file), sb.root));
  }
  return m;
}

const chain = (sb: Sandbox, action: string, ...more: string[]): string[] => ['chain', action, ...bindNas(sb), '--vm', VM, ...more];

function expectSame(sb: Sandbox, before: Map<string, string>, gone: string[]): void {
  const after = hashes(sb);
  const expected = new Map([...before].filter(([k]) => !gone.some((g) => k.startsWith(`${g}/`))));
  expect(after).toEqual(expected);
}

describe('chain delete', () => {
  it('middle: every disk of the child is repaired, every remaining point in time reads the same', async () => {
    const sb = makeSandbox('chain-mid');
    const before = seed(sb);
    const r = await run(sb, chain(sb, 'delete', '--backup', `${VM}/${TS[1]}`));
    expect(r.code).toBe(0);
    expect(r.stdout).toContain(`rebased ${VM}/${TS[2]}/${DISKS[0]!.file} onto ${VM}/${TS[0]}/${DISKS[0]!.file}`);
    expect(r.stdout).toContain(`rebased ${VM}/${TS[2]}/${DISKS[1]!.file} onto ${VM}/${TS[0]}/${DISKS[1]!.file}`);
    expect(existsSync(join(sb.nas, VM, TS[1]!))).toBe(false);
    for (const d of DISKS) expect(info(join(sb.nas, VM, TS[2]!, d.file))['backing-filename']).toBe(`../${TS[0]}/${d.file}`);
    expectSame(sb, before, [TS[1]!]);
    expect((await run(sb, chain(sb, 'verify'))).code).toBe(0);
    expect(leftovers(sb)).toEqual({ dirs: [], mounts: [] });
  });

  it('tail: removed, nothing rebased', async () => {
    const sb = makeSandbox('chain-tail');
    const before = seed(sb);
    const r = await run(sb, chain(sb, 'delete', '--backup', `${VM}/${TS[3]}`));
    expect(r.code).toBe(0);
    expect(r.stdout).not.toContain('rebased');
    expectSame(sb, before, [TS[3]!]);
  });

  it('full: refused without --force (nothing touched); with --force the whole chain goes, newest first', async () => {
    const sb = makeSandbox('chain-full');
    const before = seed(sb);
    const refused = await run(sb, chain(sb, 'delete', '--backup', `${VM}/${TS[0]}`));
    expect(refused.code).toBe(1);
    expect(refused.stdout).toMatch(/is the full backup of 3 later backup\(s\)/);
    expectSame(sb, before, []);
    const forced = await run(sb, chain(sb, 'delete', '--backup', `${VM}/${TS[0]}`, '--force'));
    expect(forced.code).toBe(0);
    // Operator text names NAS-relative folders, never the temporary mount point.
    const order = [...forced.stdout.matchAll(/^removed i-2-10-VM\/(\d{4}[.\d]+)$/gm)].map((m) => m[1]);
    expect(order).toEqual([TS[3], TS[2], TS[1], TS[0]]);
    expect(forced.stdout).not.toContain('csbackup.');
    expect(readdirSync(join(sb.nas, VM))).toEqual([]);
  });

  it('is idempotent: deleting what is already gone succeeds and changes nothing', async () => {
    const sb = makeSandbox('chain-idem');
    seed(sb);
    expect((await run(sb, chain(sb, 'delete', '--backup', `${VM}/${TS[1]}`))).code).toBe(0);
    const before = hashes(sb);
    const again = await run(sb, chain(sb, 'delete', '--backup', `${VM}/${TS[1]}`));
    expect(again.code).toBe(0);
    expect(hashes(sb)).toEqual(before);
  });

  it('concurrent deletes on one VM are serialized by the lock and leave valid chains', async () => {
    const sb = makeSandbox('chain-conc');
    const before = seed(sb);
    const [a, b] = await Promise.all([
      run(sb, chain(sb, 'delete', '--backup', `${VM}/${TS[1]}`)),
      run(sb, chain(sb, 'delete', '--backup', `${VM}/${TS[2]}`)),
    ]);
    // What each run said, when one did not succeed (a cleanup failure is exit 20).
    expect([a.code, b.code], `${a.stdout}${a.stderr}\n---\n${b.stdout}${b.stderr}`).toEqual([0, 0]);
    expectSame(sb, before, [TS[1]!, TS[2]!]);
    for (const d of DISKS) expect(info(join(sb.nas, VM, TS[3]!, d.file))['backing-filename']).toBe(`../${TS[0]}/${d.file}`);
    expect((await run(sb, chain(sb, 'verify'))).code).toBe(0);
    expect(existsSync(join(sb.nas, VM, '.nasbackup.lock'))).toBe(false);
  });

  it('SIGKILL in the middle of a repair: a re-run finishes the job', async () => {
    const sb = makeSandbox('chain-kill');
    const before = seed(sb);
    // qemu-img that kills its caller (us) right after the first real rebase.
    writeShim(
      sb,
      'qemu-img',
      `/usr/bin/qemu-img "$@"; rc=$?\nif [ "$1" = rebase ] && [ -e "$0.kill" ]; then rm -f "$0.kill"; kill -9 $PPID; fi\nexit $rc`,
    );
    writeFileSync(join(sb.shims, 'qemu-img.kill'), '');
    // The qemu-img engine is the one under test here (the native engine's crash safety is test/qcow2/crash.test.ts).
    const first = await start(sb, [...chain(sb, 'delete', '--backup', `${VM}/${TS[1]}`), '--engine', 'qemu-img']).done;
    expect(first.signal).toBe('SIGKILL');
    // A SIGKILL leaves the mount (nothing can run then): clear it like an operator would.
    for (const m of leftovers(sb).mounts) execFileSync('umount', [m]);
    for (const d of leftovers(sb).dirs) execFileSync('rm', ['-d', join(sb.tmp, d)]); // an empty folder, or our owner marker
    expect(existsSync(join(sb.nas, VM, '.nasbackup.lock'))).toBe(true);
    // The interrupted state is still a valid set of chains with the old content.
    expectSame(sb, before, []);
    const second = await run(sb, chain(sb, 'delete', '--backup', `${VM}/${TS[1]}`));
    expect(second.code).toBe(0);
    expectSame(sb, before, [TS[1]!]);
    expect((await run(sb, chain(sb, 'verify'))).code).toBe(0);
    expect(leftovers(sb)).toEqual({ dirs: [], mounts: [] });
  });
});

describe('chain verify', () => {
  it('reports each broken chain and exits 1', async () => {
    const sb = makeSandbox('chain-verify');
    seed(sb);
    // A missing middle, an absolute backing name, a resized overlay, a corrupt header.
    rmSync(join(sb.nas, VM, TS[1]!, DISKS[1]!.file));
    execFileSync('qemu-img', [
      'rebase',
      '-u',
      '-b',
      join(sb.nas, VM, TS[2]!, DISKS[0]!.file),
      '-F',
      'qcow2',
      join(sb.nas, VM, TS[3]!, DISKS[0]!.file),
    ]);
    execFileSync('qemu-img', ['resize', '-q', join(sb.nas, VM, TS[2]!, DISKS[0]!.file), '16M']);
    const fd = openSync(join(sb.nas, VM, TS[0]!, DISKS[0]!.file), 'r+');
    writeSync(fd, Buffer.from([0, 0, 0, 9]), 0, 4, 4);
    closeSync(fd);
    const r = await run(sb, chain(sb, 'verify'));
    expect(r.code).toBe(1);
    expect(r.stdout).toMatch(new RegExp(`FAIL ${VM}/${TS[0]}/${DISKS[0]!.file}: unreadable header: .*Unsupported qcow2 version 9`));
    expect(r.stdout).toMatch(new RegExp(`FAIL ${VM}/${TS[2]}/${DISKS[1]!.file}: backing file is missing`));
    expect(r.stdout).toMatch(new RegExp(`FAIL ${VM}/${TS[3]}/${DISKS[0]!.file}: backing name is absolute`));
    expect(r.stdout).toMatch(new RegExp(`FAIL ${VM}/${TS[2]}/${DISKS[0]!.file}: virtual size 16777216 differs`));
    expect(r.stdout).toMatch(/The backup chains of i-2-10-VM have errors\n$/);
    const j = await run(sb, [...chain(sb, 'verify'), '--json']);
    expect(j.code).toBe(1);
    const report = JSON.parse(j.stdout);
    expect(report).toMatchObject({ ok: false, command: 'chain verify', vm: VM, errors: [{ code: 'CHAIN_INVALID', exitCode: 1 }] });
    expect(j.stdout.trim().split('\n')).toHaveLength(1);
  });

  it('lists the chains as JSON', async () => {
    const sb = makeSandbox('chain-list');
    seed(sb);
    const r = await run(sb, [...chain(sb, 'list'), '--json']);
    expect(r.code).toBe(0);
    const j = JSON.parse(r.stdout);
    expect(j).toMatchObject({ ok: true, command: 'chain list', vm: VM, errors: [], warnings: [] });
    expect(j.backups).toEqual(TS);
    expect(j.files).toHaveLength(8);
    expect(j.files[2]).toMatchObject({
      backup: TS[1],
      file: DISKS[1]!.file,
      backing: `../${TS[0]}/${DISKS[1]!.file}`,
      virtualSize: 8 * MiB,
    });
  });
});

describe('plans', () => {
  const records = (sb: Sandbox, positions: Array<[string, number]>) => {
    const f = join(sb.root, 'records.json');
    writeFileSync(
      f,
      JSON.stringify(
        positions.map(([ts, pos], i) => ({
          id: i + 1,
          uuid: `u-${ts}`,
          externalId: `${VM}/${ts}`,
          vmId: 10,
          status: 'BackedUp',
          date: ts,
          details: { 'nas.chain_id': 'c1', 'nas.chain_position': String(pos) },
        })),
      ),
    );
    return f;
  };

  it('chain plan-delete: every disk, as JSON; refused when the metadata disagrees with the files', async () => {
    const sb = makeSandbox('chain-plan');
    seed(sb);
    const ok = await run(sb, [
      ...chain(sb, 'plan-delete', '--backup', `${VM}/${TS[1]}`),
      '--json',
      '--records',
      records(
        sb,
        TS.map((t, i) => [t, i]),
      ),
    ]);
    expect(ok.code).toBe(0);
    expect(JSON.parse(ok.stdout)).toEqual({
      ok: true,
      command: 'chain plan-delete',
      errors: [],
      warnings: [],
      plan: {
        backup: `${VM}/${TS[1]}`,
        proceed: true,
        reason: null,
        rebases: DISKS.map((d) => ({
          volId: d.file.split('.')[1],
          target: `${VM}/${TS[2]}/${d.file}`,
          newBacking: `${VM}/${TS[0]}/${d.file}`,
        })).sort((a, b) => a.target.localeCompare(b.target)),
        remove: [`${VM}/${TS[1]}`],
      },
    });
    // The records claim TS[3] follows TS[1]; the files say TS[2] does.
    const bad = await run(
      sb,
      chain(
        sb,
        'plan-delete',
        '--backup',
        `${VM}/${TS[1]}`,
        '--records',
        records(sb, [
          [TS[0]!, 0],
          [TS[1]!, 1],
          [TS[3]!, 2],
          [TS[2]!, 3],
        ]),
      ),
    );
    expect(bad.code).toBe(1);
    expect(bad.stdout).toMatch(/^Metadata and NAS disagree about what depends on i-2-10-VM\/2025\.01\.02\.00\.00\.00/);
  });

  it('plan-delete (the provider’s plan) from a records file, with the provider’s field names', async () => {
    const sb = makeSandbox('plan-provider');
    const f = records(
      sb,
      TS.map((t, i) => [t, i]),
    );
    const r = await run(sb, ['plan-delete', '--records', f, '--backup', `u-${TS[1]}`, '--root-volume-uuid', 'RV']);
    expect(r.code).toBe(0);
    expect(JSON.parse(r.stdout)).toEqual({
      proceed: true,
      reason: null,
      code: null,
      rebaseSteps: [
        {
          childBackupId: 3,
          targetMountRelativePath: `${VM}/${TS[2]}/root.RV.qcow2`,
          newBackingMountRelativePath: `${VM}/${TS[0]}/root.RV.qcow2`,
          newParentUuid: `u-${TS[0]}`,
          newChainPosition: 1,
        },
      ],
      toDelete: [{ id: 2, uuid: `u-${TS[1]}`, externalId: `${VM}/${TS[1]}` }],
      shiftPositionsBelow: { chainId: 'c1', afterPosition: 1 },
    });
    const refused = await run(sb, ['plan-delete', '--records', f, '--backup', `u-${TS[0]}`, '--root-volume-uuid', 'RV']);
    expect(refused.code).toBe(1);
    expect(JSON.parse(refused.stdout)).toMatchObject({
      proceed: false,
      reason: expect.stringMatching(/full anchor of a chain with 3 incremental/),
    });
    // Two backups at the child's position: the provider would rebase one and orphan the other.
    const twins = join(sb.root, 'twins.json');
    writeFileSync(
      twins,
      JSON.stringify(
        [0, 1, 2, 2].map((pos, i) => ({
          id: i + 1,
          uuid: `t-${i}`,
          externalId: `${VM}/${TS[i]}`,
          vmId: 10,
          details: [
            { name: 'nas.chain_id', value: 'c1' },
            { name: 'nas.chain_position', value: String(pos) },
          ],
        })),
      ),
    );
    const orphan = await run(sb, ['plan-delete', '--records', twins, '--backup', 't-1', '--root-volume-uuid', 'RV']);
    expect(orphan.code).toBe(1);
    expect(JSON.parse(orphan.stdout)).toMatchObject({
      proceed: false,
      code: 'CHAIN_WOULD_ORPHAN',
      reason: expect.stringMatching(/^Cannot delete t-1: 2 backups \(t-2, t-3\) share chain_position=2 after it/),
    });
    expect(readFileSync(sb.logFile, 'utf8')).toMatch(/ERROR \[CHAIN_WOULD_ORPHAN\] Cannot delete t-1/);
    const missing = await run(sb, ['plan-delete', '--records', join(sb.root, 'nope.json'), '--backup', 'x', '--root-volume-uuid', 'RV']);
    expect(missing.code).toBe(1);
    expect(missing.stdout).toMatch(/^Cannot read records file/);
  });
});

describe('chain delete --force on a terminal', () => {
  /** Run under a pseudo-terminal (util-linux `script`), typing `answer` when asked. */
  function onTerminal(sb: Sandbox, args: string[], answer: string): Promise<{ code: number | null; out: string }> {
    const q = (a: string): string => `'${a.replace(/'/g, `'\\''`)}'`;
    const child = spawn('script', ['-qec', [BIN, ...args].map(q).join(' '), '/dev/null'], {
      env: { ...process.env, ...sb.env },
      stdio: ['pipe', 'pipe', 'pipe'],
    });
    let out = '';
    let typed = false;
    child.stdout.on('data', (d: Buffer) => {
      out += d.toString();
      // Answer only once the question is on the screen, as a person would.
      if (!typed && out.includes('Proceed? [y/N]')) {
        typed = true;
        child.stdin.write(`${answer}\n`);
      }
    });
    return new Promise((res) =>
      child.on('close', (code) => {
        child.stdin.destroy();
        res({ code, out: out.replace(/\r\n/g, '\n') });
      }),
    );
  }

  it('shows the plan and asks; anything but y changes nothing (NOT_CONFIRMED); y proceeds', async () => {
    const sb = makeSandbox('chain-confirm');
    const before = seed(sb);
    const no = await onTerminal(sb, chain(sb, 'delete', '--backup', `${VM}/${TS[0]}`, '--force'), 'n');
    expect(no.code).toBe(1);
    expect(no.out).toContain(`remove ${VM}/${TS[3]}\n`);
    expect(no.out).toContain(`remove ${VM}/${TS[0]}\n`);
    expect(no.out).toMatch(/Not confirmed: nothing of i-2-10-VM\/2025\.01\.01\.00\.00\.00 was changed/);
    expect(no.out).not.toContain('csbackup.');
    expectSame(sb, before, []);
    expect(readFileSync(sb.logFile, 'utf8')).toMatch(/ERROR \[NOT_CONFIRMED\]/);
    const yes = await onTerminal(sb, chain(sb, 'delete', '--backup', `${VM}/${TS[0]}`, '--force'), 'y');
    expect(yes.code).toBe(0);
    expect(yes.out).toContain(`removed ${VM}/${TS[0]}\n`);
    expect(readdirSync(join(sb.nas, VM))).toEqual([]);
    expect(leftovers(sb)).toEqual({ dirs: [], mounts: [] });
  });

  it('--yes does not ask', async () => {
    const sb = makeSandbox('chain-yes');
    seed(sb);
    const r = await onTerminal(sb, chain(sb, 'delete', '--backup', `${VM}/${TS[0]}`, '--force', '--yes'), 'n');
    expect(r.code).toBe(0);
    expect(r.out).not.toContain('Proceed?');
    expect(readdirSync(join(sb.nas, VM))).toEqual([]);
  });
});
