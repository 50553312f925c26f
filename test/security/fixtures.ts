// Shared by the security regression tests: a seeded backup chain on a bind-mounted NAS,
// byte patches of qcow2 metadata, a run that is killed if it hangs, and the refusal check
// (exit 1, the coded error in the log, a pointer to `chain verify`, nothing changed).
import { execFileSync } from 'node:child_process';
import { closeSync, openSync, readdirSync, readFileSync, readSync, writeSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { expect } from 'vitest';
import { bindNas, leftovers, logText, makeSandbox, start, type RunOutcome, type Sandbox } from '../helpers/cli.js';
import { describeLayer, writeManifestFile } from '../../lib/store/manifest-file.js';
import { rootFile, seedChain, TS, VM, VOL } from '../helpers/chain.js';
import { snapshotTree, type TreeEntry } from '../helpers/tree.js';

export const ENGINES = ['auto', 'native', 'qemu-img'] as const;

/** full <- inc1 <- inc2 of one disk (64 KiB clusters), in a fresh sandbox. */
export function chained(tag: string): Sandbox {
  const sb = makeSandbox(tag);
  seedChain(sb.nas);
  return sb;
}

export const onNas = (sb: Sandbox, ts: string): string => join(sb.nas, rootFile(ts));

export function readU64(file: string, offset: number): bigint {
  const b = Buffer.alloc(8);
  const fd = openSync(file, 'r');
  try {
    readSync(fd, b, 0, 8, offset);
  } finally {
    closeSync(fd);
  }
  return b.readBigUInt64BE(0);
}

export function writeU64(file: string, offset: number, v: bigint): void {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(v);
  const fd = openSync(file, 'r+');
  try {
    writeSync(fd, b, 0, 8, offset);
  } finally {
    closeSync(fd);
  }
}

/** Host offset of the L2 entry of guest offset `guest` (cluster size from the header). */
export function l2EntryOffset(file: string, guest: number): number {
  const bits = Number(readU64(file, 16) & 0xffffffffn);
  const l1 = Number(readU64(file, 40));
  const perTable = (1 << bits) / 8;
  const c = Math.floor(guest / (1 << bits));
  const l2 = Number(readU64(file, l1 + 8 * Math.floor(c / perTable)) & 0x00fffffffffffe00n);
  return l2 + 8 * (c % perTable);
}

export const rebaseArgs = (sb: Sandbox, target: string, backing: string, engine?: string): string[] => [
  '-o',
  'rebase',
  ...bindNas(sb),
  '--rebase-target',
  target,
  '--rebase-new-backing',
  backing,
  ...(engine ? ['--engine', engine] : []),
];

export const chainArgs = (sb: Sandbox, action: string, ...more: string[]): string[] => [
  'chain',
  action,
  ...bindNas(sb),
  '--vm',
  VM,
  ...more,
];

export interface Bounded extends RunOutcome {
  /** Still running after the bound: killed (SIGKILL; a process blocked in open() ignores SIGTERM). */
  hung: boolean;
}

/**
 * Run bin/nasbackup; a run that has not ended after `ms` is a hang (everything here takes a
 * second or two): it is killed and the mount it left is detached, so the failure is reported
 * instead of blocking the suite.
 */
export async function runBounded(sb: Sandbox, args: string[], env: NodeJS.ProcessEnv = {}, ms = 30_000): Promise<Bounded> {
  const { child, done } = start(sb, args, env);
  let hung = false;
  const timer = setTimeout(() => {
    hung = true;
    // The run and whatever it started (a qemu-img looping on a self-backed image), by pid.
    for (const pid of [...descendants(child.pid!), child.pid!]) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        // already gone
      }
    }
  }, ms);
  const r = await done;
  clearTimeout(timer);
  if (hung) {
    for (const m of leftovers(sb).mounts) {
      try {
        execFileSync('umount', ['-l', m], { stdio: 'ignore' });
      } catch {
        // already gone
      }
    }
  }
  return { ...r, hung };
}

function descendants(pid: number): number[] {
  const out: number[] = [];
  let tasks: string[];
  try {
    tasks = readdirSync(`/proc/${pid}/task`);
  } catch {
    return out;
  }
  for (const t of tasks) {
    let kids: string;
    try {
      kids = readFileSync(`/proc/${pid}/task/${t}/children`, 'utf8');
    } catch {
      continue;
    }
    for (const k of kids.split(' ').filter(Boolean).map(Number)) out.push(...descendants(k), k);
  }
  return out;
}

/** Refused with `code`: exit 1, one message naming `chain verify`, the share as it was. */
export function expectRefused(sb: Sandbox, r: Bounded, code: string, before: TreeEntry[]): void {
  expect(r.hung, 'the run hung').toBe(false);
  expect(r.code, r.stdout).toBe(1);
  expect(r.stdout).toMatch(/chain verify --vm /);
  expect(logText(sb)).toContain(`ERROR [${code}]`);
  expect(snapshotTree(sb.nas)).toEqual(before);
  expect(leftovers(sb)).toEqual({ dirs: [], mounts: [] });
}

export const sha = (file: string): string => execFileSync('sha256sum', [file], { encoding: 'utf8' }).split(' ')[0]!;
export const bytes = (file: string): Buffer => readFileSync(file);

/**
 * A full-backup manifest (1 MiB extents) beside each layer of `chained`'s chain: XXH64
 * (version 2) and SHA-256 (version 1, as every manifest was before XXH64) by turns, so a
 * chain mixes the two as an upgraded host's chains do.
 */
export async function manifestsForChain(sb: Sandbox): Promise<void> {
  for (const [i, ts] of TS.entries()) {
    const f = onNas(sb, ts);
    const algorithm = i % 2 === 0 ? 'xxh64' : 'sha256';
    await writeManifestFile(dirname(f), {
      format: 'nasbackup-manifest',
      version: algorithm === 'sha256' ? 1 : 2,
      tool: { name: 'nasbackup', version: 'test' },
      vm: VM,
      path: `${VM}/${ts}`,
      createdAt: '2025-01-01T00:00:00.000Z',
      mode: 'full',
      kind: 'full',
      checkpoint: null,
      incrementalFrom: null,
      parent: null,
      digest: { algorithm, stream: 'nasbackup-layer-v1', extentBytes: 1 << 20 },
      disks: [await describeLayer(f, VOL, { algorithm, extentBytes: 1 << 20 })],
    });
  }
}
