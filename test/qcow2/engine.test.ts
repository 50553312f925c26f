// Engine selection: auto takes the native engine only for in-chain rebases of supported
// images that no QEMU process holds; everything else goes to qemu-img.
import { execFileSync, spawn } from 'node:child_process';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it, vi } from 'vitest';
import { ofdLockedKeys, ProcLocksProbe, type LockProbe } from '../../lib/engine/locks.js';
import { AutoRebaseEngine, nativeEligibility, parseEngineMode, selectEngine } from '../../lib/engine/select.js';
import type { RebaseEngine, RebaseRequest } from '../../lib/engine/types.js';
import { ImageChain } from '../../lib/qcow2/index.js';
import { removeTempDirs, tempDir } from '../helpers/tmp.js';
import { buildChain, checkCode, compareWithRaw, qemuInfo } from './gen.js';

afterAll(removeTempDirs);

const dir = tempDir('q2eng');
let k = 0;
function chain(): { paths: string[]; req: RebaseRequest } {
  const d = join(dir, String(k++));
  mkdirSync(d);
  const paths = buildChain(d, {
    layers: [
      { clusterBits: 16, v2: false, extL2: false, size: 4 << 20, ops: ['write -P 1 0 1M'] },
      { clusterBits: 16, v2: false, extL2: false, size: 4 << 20, ops: ['write -P 2 512k 1M'] },
      { clusterBits: 16, v2: false, extL2: false, size: 4 << 20, ops: [] },
    ],
  });
  return { paths, req: { target: paths[2]!, newBacking: paths[0]!, newBackingName: 'l0.qcow2', newBackingFormat: 'qcow2', chainIndex: 2 } };
}

class Recorder implements RebaseEngine {
  readonly name = 'qemu-img';
  calls: RebaseRequest[] = [];
  async rebase(req: RebaseRequest): Promise<void> {
    this.calls.push(req);
    execFileSync('qemu-img', ['rebase', '-b', req.newBackingName, '-F', 'qcow2', req.target]);
  }
}
const noLocks: LockProbe = { held: async () => [] };

describe('engine selection', () => {
  it('parses modes', () => {
    expect(parseEngineMode('auto')).toBe('auto');
    expect(() => parseEngineMode('fast')).toThrow(/expected auto, native or qemu-img/);
    expect(selectEngine('qemu-img', new Recorder()).name).toBe('qemu-img');
    expect(selectEngine('native', new Recorder()).name).toBe('native');
  });

  it('auto: native for a supported in-chain rebase (content kept, qemu-img not called)', async () => {
    const { paths, req } = chain();
    const raw = join(dir, 'a.raw');
    execFileSync('qemu-img', ['convert', '-O', 'raw', paths[2]!, raw]);
    const q = new Recorder();
    const log: string[] = [];
    await new AutoRebaseEngine(q, (m) => log.push(m), noLocks).rebase(req);
    expect(q.calls).toHaveLength(0);
    expect(log.join('\n')).toMatch(/engine auto: native/);
    expect(qemuInfo(paths[2]!)['backing-filename']).toBe('l0.qcow2');
    expect(checkCode(paths[2]!).code).toBe(0);
    expect(compareWithRaw(paths[2]!, raw).code).toBe(0);
  });

  it('auto: the chain is planned once (no separate dry run) when no QEMU holds it', async () => {
    const { req } = chain();
    const opens = vi.spyOn(ImageChain, 'open');
    try {
      await new AutoRebaseEngine(new Recorder(), () => {}, noLocks).rebase(req);
      expect(opens).toHaveBeenCalledTimes(1);
    } finally {
      opens.mockRestore();
    }
  });

  it('auto: a feature found unsupported while planning goes to qemu-img, the image untouched by us', async () => {
    const bm = chain();
    execFileSync('qemu-img', ['bitmap', '--add', bm.paths[2]!, 'b']);
    const q = new Recorder();
    const log: string[] = [];
    await new AutoRebaseEngine(q, (m) => log.push(m), noLocks).rebase(bm.req);
    expect(q.calls).toHaveLength(1);
    expect(log.join('\n')).toMatch(/engine auto: qemu-img for \S+ \(QCOW2_BITMAPS/);
    expect(qemuInfo(bm.paths[2]!)['backing-filename']).toBe('l0.qcow2');
  });

  it('auto: qemu-img when an image is held, unsupported, or outside the chain', async () => {
    const held = chain();
    const q = new Recorder();
    await new AutoRebaseEngine(q, () => {}, { held: async (p) => [p[1]!] }).rebase(held.req);
    expect(q.calls).toHaveLength(1);

    const unreadable = chain();
    expect(await nativeEligibility(unreadable.req, { held: async () => null })).toMatchObject({ native: false, reason: /proc\/locks/ });

    const bm = chain();
    execFileSync('qemu-img', ['bitmap', '--add', bm.paths[2]!, 'b']);
    expect(await nativeEligibility(bm.req, noLocks)).toMatchObject({ native: false, reason: /QCOW2_BITMAPS/ });

    const outside = chain();
    expect(await nativeEligibility({ ...outside.req, chainIndex: -1 }, noLocks)).toMatchObject({ native: false });
  });

  it('native: other shapes fall back to qemu-img', async () => {
    const { req } = chain();
    const q = new Recorder();
    await selectEngine('native', q).rebase({ ...req, chainIndex: -1 });
    expect(q.calls).toHaveLength(1);
  });

  it('sees the OFD locks of a running qemu-io in /proc/locks', async () => {
    const { paths, req } = chain();
    const child = spawn('qemu-io', ['-f', 'qcow2', '-c', 'sleep 3000', paths[1]!], { stdio: 'ignore' });
    try {
      const probe = new ProcLocksProbe();
      let held: string[] | null = [];
      for (let i = 0; i < 50 && held !== null && held.length === 0; i++) {
        await new Promise((r) => setTimeout(r, 50));
        held = await probe.held(paths);
      }
      // qemu-io holds l1 and, read-only, its backing l0 — not the top.
      expect(held).toEqual([paths[0], paths[1]]);
      expect(await nativeEligibility(req, probe)).toMatchObject({ native: false, reason: /OFD lock/ });
    } finally {
      child.kill('SIGKILL');
    }
  });

  it('parses /proc/locks lines', () => {
    const keys = ofdLockedKeys(
      [
        '1: POSIX  ADVISORY  WRITE 17962 fe:00:16638066 0 0',
        '2: OFDLCK ADVISORY  READ -1 fe:00:2154748 201 201',
        '3: OFDLCK ADVISORY  READ -1 08:01:77 0 EOF',
        '4: OFDLCK ADVISORY  READ -1 08:01:78 0 0',
        ' -> OFDLCK ADVISORY  WRITE -1 08:01:79 100 100',
      ].join('\n'),
    );
    expect([...keys].sort()).toEqual(['254:0:2154748', '8:1:77', '8:1:79']);
  });
});
