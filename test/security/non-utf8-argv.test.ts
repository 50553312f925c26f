// Issue 15.4: Node decodes argv lossily (an invalid byte becomes U+FFFD), so
// `-o delete -p $'i-2/\xff'` removed an existing folder `i-2/\uFFFD`, and a backup with
// such a -p wrote to a name nobody asked for. Every argument must round-trip as UTF-8;
// otherwise one clear line on stdout, exit 1, and nothing mounted, read or changed.
// The bytes go in through execv (python3): a Node parent cannot pass invalid UTF-8.
import { spawn } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { BIN, bindNas, leftovers, logText, makeSandbox, type RunOutcome, type Sandbox } from '../helpers/cli.js';
import { removeTempDirs } from '../helpers/tmp.js';
import { snapshotTree } from '../helpers/tree.js';

afterAll(removeTempDirs);

const VM = 'i-2-17-VM';
const REPLACEMENT = '\uFFFD';

/** Run bin/nasbackup with argv given as raw bytes. */
function runBytes(sb: Sandbox, args: Array<string | Buffer>): Promise<RunOutcome> {
  const hex = [BIN, ...args].map((a) => (typeof a === 'string' ? Buffer.from(a, 'utf8') : a).toString('hex'));
  const child = spawn('python3', ['-c', 'import os,sys; a=[bytes.fromhex(x) for x in sys.argv[1:]]; os.execv(a[0], a)', ...hex], {
    env: sb.env,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d: Buffer) => (stdout += d.toString('latin1')));
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  return new Promise((res) => child.on('close', (code, signal) => res({ code, signal, stdout, stderr })));
}

const bytes = (...parts: Array<string | number[]>): Buffer =>
  Buffer.concat(parts.map((p) => (typeof p === 'string' ? Buffer.from(p) : Buffer.from(p))));

function seed(sb: Sandbox): void {
  // The folder a lossy decoding of `<vm>/\xff` would name, and a sibling.
  for (const d of [`${VM}/${REPLACEMENT}`, `${VM}/2025.07.01.00.00.00`]) {
    mkdirSync(join(sb.nas, d), { recursive: true });
    writeFileSync(join(sb.nas, d, 'root.qcow2'), 'backup data\n');
  }
}

describe('an argument that is not valid UTF-8', () => {
  it('-o delete -p <vm>/\\xff: refused, the folder U+FFFD (and everything else) untouched', async () => {
    const sb = makeSandbox('sec-argv-del');
    seed(sb);
    const snap = snapshotTree(sb.nas);
    const r = await runBytes(sb, ['-o', 'delete', ...bindNas(sb), '-p', bytes(`${VM}/`, [0xff])]);
    expect(r.code).toBe(1);
    expect(r.stdout).toBe(`The value of -p is not valid UTF-8 ("${VM}/\\xff"); refusing to guess the name it means\n`);
    expect(snapshotTree(sb.nas)).toEqual(snap);
    expect(leftovers(sb)).toEqual({ dirs: [], mounts: [] });
    expect(logText(sb)).toMatch(/ERROR \[ARGV_NOT_UTF8\]/);
    expect(logText(sb)).not.toMatch(/exec: mount/); // refused before anything was touched
  });

  it.each([
    [
      'a truncated sequence in -p of a backup',
      ['-o', 'backup', '-v', VM, '-p', bytes(`${VM}/2025.07.02`, [0xe2, 0x82])],
      /^The value of -p is not valid UTF-8 \("i-2-17-VM\/2025\.07\.02\\xe2\\x82"\)/,
    ],
    [
      'an overlong encoding of "/" in --rebase-target',
      ['-o', 'rebase', '--rebase-target', bytes(`${VM}/a`, [0xc0, 0xaf], 'x'), '--rebase-new-backing', `${VM}/b/x`],
      /^The value of --rebase-target is not valid UTF-8/,
    ],
    [
      'a lone surrogate (CESU) in -v',
      ['-o', 'backup', '-v', bytes('vm', [0xed, 0xa0, 0x80]), '-p', `${VM}/x`],
      /^The value of -v is not valid UTF-8 \("vm\\xed\\xa0\\x80"\)/,
    ],
    ['a Latin-1 byte in the mount options', ['-o', 'stats', '-m', bytes('bind,', [0xe9])], /^The value of -m is not valid UTF-8/],
    ['an invalid byte as the operation itself', ['-o', bytes([0xff])], /^The value of -o is not valid UTF-8 \("\\xff"\)/],
    ['an invalid byte as an option name', [bytes('-', [0xff]), 'x'], /^Argument 1 is not valid UTF-8 \("-\\xff"\)/],
  ] as const)('%s: refused with a clear line, exit 1, nothing touched', async (_name, extra, message) => {
    const sb = makeSandbox('sec-argv');
    seed(sb);
    const snap = snapshotTree(sb.nas);
    const args = [...(extra as ReadonlyArray<string | Buffer>)];
    args.push(...(args.includes('-m') ? ['-t', 'none', '-s', sb.nas] : bindNas(sb)));
    const r = await runBytes(sb, args);
    expect(r.code).toBe(1);
    expect(r.stdout).toMatch(message);
    expect(r.stdout.split('\n')).toHaveLength(2); // one line
    expect(snapshotTree(sb.nas)).toEqual(snap);
    expect(leftovers(sb)).toEqual({ dirs: [], mounts: [] });
  });

  it('valid UTF-8 (U+FFFD itself, accents) is not refused: -o delete -p <vm>/\\uFFFD deletes exactly that folder', async () => {
    const sb = makeSandbox('sec-argv-ok');
    seed(sb);
    mkdirSync(join(sb.nas, `${VM}/été`), { recursive: true });
    const r = await runBytes(sb, ['-o', 'delete', ...bindNas(sb), '-p', `${VM}/${REPLACEMENT}`]);
    expect(r.code, r.stdout).toBe(0);
    expect(snapshotTree(sb.nas).map((e) => e.path)).toEqual([
      VM,
      `${VM}/2025.07.01.00.00.00`,
      `${VM}/2025.07.01.00.00.00/root.qcow2`,
      `${VM}/été`,
    ]);
  });
});
