// Issue 15 item 1: the engine fallback must not repair what it should refuse. A middle layer
// damaged (truncated, an L2 entry, the L1 table or the refcount table past its end, the
// corrupt bit) made the native engine refuse and `auto` fall back to `qemu-img rebase`, which
// succeeded and copied zeros where the data was. A layer with an external data file outside
// the NAS made qemu-img read from it, or write the copied clusters into it. Every engine now
// refuses such chains (CHAIN_CORRUPT / CHAIN_UNSAFE, pointing at `chain verify`), and changes
// nothing — on the NAS or outside it. Real qemu-img images, damaged by byte patches.
import { execFileSync } from 'node:child_process';
import { mkdirSync, rmSync, truncateSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { logText, type Sandbox } from '../helpers/cli.js';
import { rootFile, TS, VM } from '../helpers/chain.js';
import { qemuImg } from '../helpers/qemu.js';
import { snapshotTree } from '../helpers/tree.js';
import { removeTempDirs } from '../helpers/tmp.js';
import { chained, ENGINES, expectRefused, l2EntryOffset, onNas, readU64, rebaseArgs, runBounded, sha, writeU64 } from './fixtures.js';

afterAll(removeTempDirs);

const MiB = 1 << 20;

/** Damages of the middle layer (inc1, whose data is 0x22 at 1 MiB..1.5 MiB). */
const damages: Array<[string, (mid: string) => void]> = [
  // Cut off at its first data cluster: metadata intact, the data gone.
  ['truncated layer', (mid) => truncateSync(mid, Number(readU64(mid, l2EntryOffset(mid, MiB)) & 0x00fffffffffffe00n))],
  [
    'L2 entry past the end of the file',
    (mid) => writeU64(mid, l2EntryOffset(mid, MiB), (1n << 63n) | BigInt(statSync(mid).size * 4 - ((statSync(mid).size * 4) % 65536))),
  ],
  ['L1 table past the end of the file', (mid) => writeU64(mid, 40, BigInt(Math.ceil(statSync(mid).size / 65536) * 65536 + 10 * 65536))],
  [
    'refcount table past the end of the file',
    (mid) => writeU64(mid, 48, BigInt(Math.ceil(statSync(mid).size / 65536) * 65536 + 10 * 65536)),
  ],
  ['corrupt bit set', (mid) => writeU64(mid, 72, readU64(mid, 72) | 2n)],
];

describe('a damaged middle layer is refused by every engine, never repaired with zeros', () => {
  describe.each(damages)('%s', (name, damage) => {
    it.each(ENGINES)('--engine %s: CHAIN_CORRUPT, nothing changed, qemu-img never runs', async (engine) => {
      const sb = chained(`sec-corrupt-${engine}`);
      damage(onNas(sb, TS[1]));
      const before = snapshotTree(sb.nas);
      const r = await runBounded(sb, rebaseArgs(sb, rootFile(TS[2]), rootFile(TS[0]), engine));
      expectRefused(sb, r, 'CHAIN_CORRUPT', before);
      expect(r.stdout).toMatch(/^The chain of the rebase target is damaged, refusing: .*root\.[\w-]+\.qcow2/);
      expect(logText(sb), name).not.toMatch(/exec: qemu-img rebase/);
    });
  });
});

describe('an external data file is refused by every engine (nothing read or written outside the NAS)', () => {
  /** Replace layer `ts` by one with the same content whose data lives in `<sandbox>/outside/`. */
  function withDataFile(sb: Sandbox, ts: string, backing: string): string {
    const f = onNas(sb, ts);
    const outside = join(sb.root, 'outside');
    mkdirSync(outside, { recursive: true });
    const data = join(outside, `${ts}.data`);
    rmSync(f);
    qemuImg(['create', '-q', '-f', 'qcow2', '-o', `data_file=${data}`, '-b', backing, '-F', 'qcow2', f, '16M']);
    execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x33 2M 128k', f], { stdio: 'ignore' });
    return data;
  }

  it.each(ENGINES)('--engine %s: a target with an outside data file is not written through', async (engine) => {
    const sb = chained(`sec-datafile-top-${engine}`);
    const data = withDataFile(sb, TS[2], `../${TS[1]}/root.${rootFile(TS[1]).split('/root.')[1]}`);
    const before = snapshotTree(sb.nas);
    const outsideBefore = sha(data);
    const r = await runBounded(sb, rebaseArgs(sb, rootFile(TS[2]), rootFile(TS[0]), engine));
    expectRefused(sb, r, 'CHAIN_UNSAFE', before);
    expect(r.stdout).toMatch(/has an external data file/);
    expect(sha(data)).toBe(outsideBefore);
    expect(logText(sb)).not.toMatch(/exec: qemu-img rebase/);
  });

  it.each(ENGINES)('--engine %s: a middle layer with an outside data file is not read', async (engine) => {
    const sb = chained(`sec-datafile-mid-${engine}`);
    withDataFile(sb, TS[1], `../${TS[0]}/root.${rootFile(TS[0]).split('/root.')[1]}`);
    const before = snapshotTree(sb.nas);
    const r = await runBounded(sb, rebaseArgs(sb, rootFile(TS[2]), rootFile(TS[0]), engine));
    expectRefused(sb, r, 'CHAIN_UNSAFE', before);
    expect(r.stdout).toMatch(new RegExp(`${TS[1]}/root\\.[\\w-]+\\.qcow2 has an external data file`));
  });
});

describe('auto still falls back to qemu-img for a valid feature the native engine does not handle', () => {
  it('an internal snapshot in the target: qemu-img rebases it, content kept', async () => {
    const sb = chained('sec-fallback-ok');
    const top = onNas(sb, TS[2]);
    qemuImg(['snapshot', '-c', 's1', top]);
    const { contentSha256 } = await import('../helpers/qemu.js');
    const content = contentSha256(top, sb.root);
    const r = await runBounded(sb, rebaseArgs(sb, rootFile(TS[2]), rootFile(TS[0])));
    expect(r).toMatchObject({ code: 0, stdout: '', hung: false });
    expect(logText(sb)).toMatch(/engine auto: qemu-img for \S+ \(QCOW2_SNAPSHOTS/);
    rmSync(join(sb.nas, VM, TS[1]), { recursive: true });
    expect(contentSha256(top, sb.root)).toBe(content);
  });
});

describe('the fallback rule itself (engines called directly, without the pre-flight)', () => {
  it('auto hands a chain to qemu-img only for an unsupported feature: damage found by the dry run is refused', async () => {
    const { AutoRebaseEngine } = await import('../../lib/engine/select.js');
    const sb = chained('sec-rule');
    const mid = onNas(sb, TS[1]);
    writeU64(mid, l2EntryOffset(mid, MiB), (1n << 63n) | BigInt(64 << 20));
    const calls: string[] = [];
    const qemu = { name: 'qemu-img', rebase: async (req: { target: string }) => void calls.push(req.target) };
    const target = onNas(sb, TS[2]);
    const req = {
      target,
      newBacking: onNas(sb, TS[0]),
      newBackingName: `../${TS[0]}/${rootFile(TS[0]).split('/').at(-1)}`,
      newBackingFormat: 'qcow2' as const,
      chainIndex: 2,
    };
    const before = sha(target);
    await expect(new AutoRebaseEngine(qemu, () => {}, { held: async () => [] }).rebase(req)).rejects.toMatchObject({
      code: 'CHAIN_CORRUPT',
    });
    const { NativeRebaseEngine } = await import('../../lib/engine/native.js');
    await expect(new NativeRebaseEngine(qemu).rebase(req)).rejects.toMatchObject({ code: 'CHAIN_CORRUPT' });
    expect(calls).toEqual([]);
    expect(sha(target)).toBe(before);
  });
});
