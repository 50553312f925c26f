// chain verify runs each file's structural check and content re-read as one task through one
// open file (the two at once), pipelined with the other files' chain walks: the report must read as when the
// phases ran one after the other (walk, then structure, then content), a layer whose chain was
// refused is neither checked nor re-read, and both readers of a layer get the same open file.
import { closeSync, openSync, readSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { discover } from '../../lib/store/backups.js';
import { readLayerDigest } from '../../lib/store/layer-read.js';
import { structuralCheck } from '../../lib/store/safety.js';
import { verifyChains, type CheckFn, type DigestFn } from '../../lib/store/verify-chains.js';
import { readManifestFile } from '../../lib/store/manifest-file.js';
import type { BlockFile } from '../../lib/qcow2/index.js';
import { TS, VM, VOL } from '../helpers/chain.js';
import { removeTempDirs } from '../helpers/tmp.js';
import { chained, manifestsForChain, l2EntryOffset, onNas, readU64 } from '../security/fixtures.js';

afterAll(removeTempDirs);

const FILE = `root.${VOL}.qcow2`;
const CS = 65536;

function patch(file: string, at: number, f: (b: Buffer) => void, len = 1): void {
  const fd = openSync(file, 'r+');
  try {
    const b = Buffer.alloc(len);
    readSync(fd, b, 0, len, at);
    f(b);
    writeSync(fd, b, 0, len, at);
  } finally {
    closeSync(fd);
  }
}

/** A 3-deep chain with its manifests, as verify finds it. */
async function provenChain(name: string): Promise<{ sb: ReturnType<typeof chained>; vm: Awaited<ReturnType<typeof discover>> }> {
  const sb = chained(name);
  await manifestsForChain(sb);
  return { sb, vm: await discover(join(sb.nas, VM)) };
}

/** A promise and the function that settles it. */
function signal(): { wait: Promise<void>; fire: () => void } {
  let fire!: () => void;
  const wait = new Promise<void>((r) => (fire = r));
  return { wait, fire };
}

describe('chain verify: pipelined checks', () => {
  it('structure before content in a report, a refused layer skipped, one open file per layer', async () => {
    const sb = chained('vp-order');
    const instanceDir = join(sb.nas, VM);
    await manifestsForChain(sb);
    // The middle layer: a data byte changed and that cluster's refcount zeroed (content and structure).
    const mid = onNas(sb, TS[1]);
    const host = Number(readU64(mid, l2EntryOffset(mid, 1 << 20)) & 0x00fffffffffffe00n);
    patch(mid, host + 100, (b) => void (b[0] = b[0]! ^ 0xff));
    const table = Number(readU64(mid, 48));
    patch(mid, Number(readU64(mid, table) & 0x00fffffffffffe00n) + 2 * (host / CS), (b) => b.fill(0), 2);
    // The top: the corrupt bit, so its chain is refused.
    patch(onNas(sb, TS[2]), 79, (b) => void (b[0] = b[0]! | 2));

    const calls: Array<[string, string, BlockFile | undefined]> = [];
    const check: CheckFn = async (abs, file) => {
      calls.push(['check', abs, file]);
      return structuralCheck(abs, undefined, file);
    };
    const digest: DigestFn = async (abs, { extentBytes, algorithm }, onData, file) => {
      calls.push(['digest', abs, file]);
      return readLayerDigest(abs, { extentBytes, algorithm, ...(onData ? { onData } : {}), ...(file ? { file } : {}) });
    };
    const vm = await discover(instanceDir);
    const r = await verifyChains(vm, check, 4, { scope: vm.backups, digest, layers: 3 });
    expect(r.ok).toBe(false);
    const by = (ts: string) => r.files.find((x) => x.file === `${ts}/${FILE}`)!;
    expect(by(TS[0])).toEqual({ file: `${TS[0]}/${FILE}`, backing: null, errors: [], warnings: [] });
    expect(by(TS[1]).errors).toEqual([
      `structural check failed: 2 error(s); first: ERROR cluster ${host / CS} refcount=0 reference=1`,
      'extent 1: digest mismatch',
    ]);
    expect(by(TS[2]).errors).toEqual([`${TS[2]}/${FILE} is marked corrupt (QEMU found damage in it)`]);
    expect(by(TS[2]).warnings.map((w) => w.code)).toEqual(['CHECK_SKIPPED', 'CHECK_SKIPPED']);
    // Each sound layer: checked and re-read (the check called first) through the same open file; the refused one: neither.
    for (const ts of [TS[0], TS[1]]) {
      const mine = calls.filter((c) => c[1] === onNas(sb, ts));
      expect(mine.map((c) => c[0])).toEqual(['check', 'digest']);
      expect(mine[0]![2]).toBeDefined();
      expect(mine[1]![2]).toBe(mine[0]![2]);
    }
    expect(calls.filter((c) => c[1] === onNas(sb, TS[2]))).toEqual([]);
  });
});

describe('chain verify: a layer’s structural check and re-read run together', () => {
  it('the re-read starts before the check ends, and the file stays open until both are done', async () => {
    const { sb, vm } = await provenChain('vp-together');
    const events: string[] = [];
    let digestStarted = false;
    const checkFailed = signal();
    const top = onNas(sb, TS[2]);
    const check: CheckFn = async (abs, file) => {
      await Promise.resolve();
      if (abs !== top) return structuralCheck(abs, undefined, file);
      events.push(`check of the top: the re-read ${digestStarted ? 'already started' : 'not started'}`);
      checkFailed.fire();
      throw new Error('check failed');
    };
    const digest: DigestFn = async (abs, { extentBytes, algorithm }, onData, file) => {
      if (abs === top) {
        digestStarted = true;
        await checkFailed.wait;
      }
      const d = await readLayerDigest(abs, { extentBytes, algorithm, ...(file ? { file } : {}) });
      if (abs === top) events.push(`re-read of the top: ${d.extents.length} extents`);
      return d;
    };
    await expect(verifyChains(vm, check, 4, { scope: vm.backups, digest, layers: 3 })).rejects.toThrow('check failed');
    // The check's failure did not close the file under the re-read: it read every extent.
    expect(events).toEqual([
      'check of the top: the re-read already started',
      expect.stringMatching(/^re-read of the top: [1-9]\d* extents$/),
    ]);
  });
});

describe('chain verify: a layer’s re-read waits for its own manifest only', () => {
  it('the bottom layer is re-read while the top’s manifest is still being read; the report is as before', async () => {
    const { sb, vm } = await provenChain('vp-own-manifest');
    const events: string[] = [];
    const bottomStarted = signal();
    const digest: DigestFn = async (abs, { extentBytes, algorithm }, onData, file) => {
      if (abs === onNas(sb, TS[0])) {
        events.push('re-read of the bottom');
        bottomStarted.fire();
      }
      return readLayerDigest(abs, { extentBytes, algorithm, ...(onData ? { onData } : {}), ...(file ? { file } : {}) });
    };
    // The top's manifest is read only once the bottom's re-read started (before: a deadlock).
    const readManifest = async (dir: string) => {
      if (dir.endsWith(TS[2])) {
        await bottomStarted.wait;
        events.push('manifest of the top');
      }
      return readManifestFile(dir);
    };
    const progress: Array<[number, number]> = [];
    const r = await verifyChains(vm, (abs, file) => structuralCheck(abs, undefined, file), 4, {
      scope: vm.backups,
      digest,
      readManifest,
      planned: () => events.push('planned'),
      progress: (d, t) => progress.push([d, t]),
    });
    expect(events.slice(0, 3)).toEqual(['re-read of the bottom', 'manifest of the top', 'planned']);
    expect(r).toEqual(await verifyChains(vm, (abs, file) => structuralCheck(abs, undefined, file), 4, { scope: vm.backups, digest }));
    expect(r.ok).toBe(true);
    // The bar starts at 0 of the whole total and climbs to it.
    const total = (1 << 20) + (256 << 10) + (512 << 10) + (128 << 10);
    expect(progress[0]).toEqual([0, total]);
    expect(progress.at(-1)).toEqual([total, total]);
    for (let i = 1; i < progress.length; i++) expect(progress[i]![0]).toBeGreaterThanOrEqual(progress[i - 1]![0]);
  });
});
