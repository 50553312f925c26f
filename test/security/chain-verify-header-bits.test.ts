// Issue 15 item 10 (chain verify): the dirty and corrupt header bits and an external data file
// went unreported. `chain verify` now reports a corrupt bit and an external data file as
// errors (and checks no chain through them with qemu-img), and a dirty bit as a warning.
// Real qemu-img images, header bits set by byte patches.
import { execFileSync } from 'node:child_process';
import { mkdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { leftovers, logText } from '../helpers/cli.js';
import { TS, VM, VOL } from '../helpers/chain.js';
import { qemuImg } from '../helpers/qemu.js';
import { removeTempDirs } from '../helpers/tmp.js';
import { chainArgs, chained, onNas, readU64, runBounded, writeU64 } from './fixtures.js';

afterAll(removeTempDirs);

const FILE = `root.${VOL}.qcow2`;

describe('chain verify reports the header bits and external data files', () => {
  it('corrupt bit: an error on the layer and on every chain through it', async () => {
    const sb = chained('sec-bits-corrupt');
    writeU64(onNas(sb, TS[1]), 72, readU64(onNas(sb, TS[1]), 72) | 2n);
    const r = await runBounded(sb, chainArgs(sb, 'verify'));
    expect(r.code).toBe(1);
    expect(r.stdout).toMatch(new RegExp(`^OK   ${VM}/${TS[0]}/${FILE}$`, 'm'));
    expect(r.stdout).toMatch(new RegExp(`^FAIL ${VM}/${TS[1]}/${FILE}: ${TS[1]}/${FILE} is marked corrupt`, 'm'));
    expect(r.stdout).toMatch(new RegExp(`^FAIL ${VM}/${TS[2]}/${FILE}: chain corrupt: ${TS[1]}/${FILE} is marked corrupt`, 'm'));
    expect(logText(sb)).not.toMatch(new RegExp(`(?:exec: qemu-img check|Structural check of) .*(${TS[1]}|${TS[2]})`));
    expect(leftovers(sb)).toEqual({ dirs: [], mounts: [] });
  });

  it('external data file: an error, and qemu-img never opens it', async () => {
    const sb = chained('sec-bits-data');
    const top = onNas(sb, TS[2]);
    const outside = join(sb.root, 'outside');
    mkdirSync(outside);
    rmSync(top);
    qemuImg([
      'create',
      '-q',
      '-f',
      'qcow2',
      '-o',
      `data_file=${join(outside, 'top.data')}`,
      '-b',
      `../${TS[1]}/${FILE}`,
      '-F',
      'qcow2',
      top,
      '16M',
    ]);
    execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x33 2M 128k', top], { stdio: 'ignore' });
    const r = await runBounded(sb, chainArgs(sb, 'verify', '--json'));
    expect(r.code).toBe(1);
    const report = JSON.parse(r.stdout) as {
      ok: boolean;
      files: Array<{ file: string; errors: string[]; warnings: Array<{ code: string; message: string }> }>;
    };
    expect(report.ok).toBe(false);
    const f = report.files.find((x) => x.file === `${TS[2]}/${FILE}`)!;
    expect(f.errors).toEqual([`${TS[2]}/${FILE} has an external data file (its data lives in another file)`]);
    expect(report.files.filter((x) => x.errors.length > 0).map((x) => x.file)).toEqual([`${TS[2]}/${FILE}`]);
    expect(logText(sb)).not.toMatch(new RegExp(`(?:exec: qemu-img check|Structural check of) .*${TS[2]}`));
  });

  it('dirty bit: a warning (the chain is otherwise sound), exit 0', async () => {
    const sb = chained('sec-bits-dirty');
    writeU64(onNas(sb, TS[1]), 72, readU64(onNas(sb, TS[1]), 72) | 1n);
    const r = await runBounded(sb, chainArgs(sb, 'verify'));
    expect(r.stdout).toMatch(new RegExp(`^OK   ${VM}/${TS[1]}/${FILE}\n     warning: ${TS[1]}/${FILE} is marked dirty`, 'm'));
    expect(r.code, r.stdout).toBe(0);
    // --json: the same warning with its stable code, in the envelope's list.
    const j = JSON.parse((await runBounded(sb, chainArgs(sb, 'verify', '--json'))).stdout);
    expect(j).toMatchObject({ ok: true, command: 'chain verify', errors: [] });
    expect(j.warnings).toContainEqual({
      code: 'IMAGE_DIRTY',
      file: `${VM}/${TS[1]}/${FILE}`,
      message: expect.stringMatching(new RegExp(`^${TS[1]}/${FILE} is marked dirty`)),
    });
  });
});
