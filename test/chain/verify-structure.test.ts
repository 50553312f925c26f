// `chain verify` and `-o rebase` run the native structural check (lib/qcow2/check.ts) where
// they ran `qemu-img check`: refcount damage in one layer fails that layer with qemu-img's
// counts, a leak is a warning, and no qemu-img check process runs at all.
import { closeSync, openSync, statSync, truncateSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { discover } from '../../lib/store/backups.js';
import { verifyChains } from '../../lib/store/verify-chains.js';
import { readLayerDigest } from '../../lib/store/layer-read.js';
import type { DigestSpec } from '../../lib/store/manifest.js';
import { structuralCheck } from '../../lib/store/safety.js';
import { afterAll, describe, expect, it } from 'vitest';
import { leftovers, logText } from '../helpers/cli.js';
import { TS, VM, VOL } from '../helpers/chain.js';
import { removeTempDirs } from '../helpers/tmp.js';
import { chainArgs, chained, manifestsForChain, l2EntryOffset, onNas, readU64, rebaseArgs, runBounded } from '../security/fixtures.js';

afterAll(removeTempDirs);

const FILE = `root.${VOL}.qcow2`;
const CS = 65536;

function writeU16(file: string, at: number, v: number): void {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(v);
  const fd = openSync(file, 'r+');
  try {
    writeSync(fd, b, 0, 2, at);
  } finally {
    closeSync(fd);
  }
}
/** Byte of the stored 16-bit refcount of host cluster `k` (first refcount block). */
function refcountAt(file: string, k: number): number {
  const table = Number(readU64(file, 48));
  return Number(readU64(file, table) & 0x00fffffffffffe00n) + 2 * k;
}

describe('chain verify: the native structural check', () => {
  it('a data cluster whose refcount was zeroed: that layer FAILs with the counts qemu-img gives (2 errors), the others pass', async () => {
    const sb = chained('vs-refzero');
    const f = onNas(sb, TS[1]);
    const host = Number(readU64(f, l2EntryOffset(f, 1 << 20)) & 0x00fffffffffffe00n);
    expect(host).toBeGreaterThan(0);
    writeU16(f, refcountAt(f, host / CS), 0);
    const r = await runBounded(sb, chainArgs(sb, 'verify'));
    expect(r.code).toBe(1);
    expect(r.stdout).toMatch(new RegExp(`^OK   ${VM}/${TS[0]}/${FILE}$`, 'm'));
    expect(r.stdout).toMatch(
      new RegExp(
        `^FAIL ${VM}/${TS[1]}/${FILE}: structural check failed: 2 error\\(s\\); first: ERROR cluster ${host / CS} refcount=0 reference=1$`,
        'm',
      ),
    );
    expect(logText(sb)).not.toMatch(/exec: qemu-img check/);
    expect(logText(sb)).toMatch(new RegExp(`Structural check of .*${TS[1]}/${FILE.replace(/\./g, '\\.')}: failed .*\\[native\\]`));
    expect(leftovers(sb)).toEqual({ dirs: [], mounts: [] });
  });

  it('a leaked cluster: a LEAKED_CLUSTERS warning, exit 0', async () => {
    const sb = chained('vs-leak');
    const f = onNas(sb, TS[2]);
    const k = Math.ceil(statSync(f).size / CS);
    truncateSync(f, (k + 1) * CS);
    writeU16(f, refcountAt(f, k), 1);
    const r = await runBounded(sb, chainArgs(sb, 'verify', '--json'));
    expect(r.code).toBe(0);
    const report = JSON.parse(r.stdout) as { files: Array<{ file: string; warnings: Array<{ code: string; message: string }> }> };
    const w = report.files.find((x) => x.file === `${TS[2]}/${FILE}`)!.warnings;
    expect(w).toContainEqual({ code: 'LEAKED_CLUSTERS', message: 'structural check: 1 leaked cluster(s) (harmless, space only)' });
    expect(logText(sb)).not.toMatch(/exec: qemu-img check/);
  });
});

describe('-o rebase: the structural check of the result', () => {
  it.each(['native', 'qemu-img'])('--engine %s: the rebased target is checked natively (clean), no qemu-img check', async (engine) => {
    const sb = chained(`vs-rebase-${engine}`);
    const r = await runBounded(sb, rebaseArgs(sb, `${VM}/${TS[2]}/${FILE}`, `${VM}/${TS[0]}/${FILE}`, engine));
    expect(r.code).toBe(0);
    expect(logText(sb)).toMatch(new RegExp(`Rebase: structural check of .*${TS[2]}/${FILE.replace(/\./g, '\\.')}: clean`));
    expect(logText(sb)).not.toMatch(/exec: qemu-img check/);
  });
});

describe('chain verify: content re-read with reads in flight, progress', () => {
  it('progress climbs to the data bytes the manifests list; every layer proved; a changed layer still found', async () => {
    const sb = chained('vs-progress');
    const instanceDir = join(sb.nas, VM);
    await manifestsForChain(sb);
    const vm = await discover(instanceDir);
    const calls: Array<[number, number]> = [];
    const digest = (abs: string, { extentBytes, algorithm }: DigestSpec, onData?: (n: number) => void) =>
      readLayerDigest(abs, { extentBytes, algorithm, chunkBytes: 65536, inFlight: 3, ...(onData ? { onData } : {}) });
    const ok = await verifyChains(vm, (abs) => structuralCheck(abs), 4, {
      scope: vm.backups,
      digest,
      progress: (d, t) => calls.push([d, t]),
    });
    expect(ok.ok).toBe(true);
    // What the three layers hold (test/helpers/chain.ts): 1.25 MiB, 512 KiB, 128 KiB.
    const total = (1 << 20) + (256 << 10) + (512 << 10) + (128 << 10);
    expect(calls[0]).toEqual([0, total]);
    expect(calls.at(-1)).toEqual([total, total]);
    for (let i = 1; i < calls.length; i++) expect(calls[i]![0]).toBeGreaterThanOrEqual(calls[i - 1]![0]);
    // A byte flipped in the middle layer's data: that layer, that extent.
    const f = onNas(sb, TS[1]);
    const host = Number(readU64(f, l2EntryOffset(f, 1 << 20)) & 0x00fffffffffffe00n);
    const fd = openSync(f, 'r+');
    writeSync(fd, Buffer.from([0xee]), 0, 1, host + 100);
    closeSync(fd);
    const bad = await verifyChains(await discover(instanceDir), (abs) => structuralCheck(abs), 4, { scope: vm.backups, digest });
    expect(bad.ok).toBe(false);
    expect(bad.files.filter((x) => x.errors.length).map((x) => [x.file, x.errors])).toEqual([
      [`${TS[1]}/${FILE}`, ['extent 1: digest mismatch']],
    ]);
  });
});
