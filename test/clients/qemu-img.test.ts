// The qemu-img client on what the installed qemu-img really prints: the bitmaps of each
// kind of image, the add/replace answers, and `check`'s verdicts.
import { execFileSync } from 'node:child_process';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { ToolError } from '../../lib/clients/failure.js';
import { QemuImgClient } from '../../lib/clients/qemu-img.js';
import { ok, realRunner, scriptedRunner } from '../helpers/runner.js';
import { removeTempDirs, tempDir } from '../helpers/tmp.js';

afterAll(removeTempDirs);

const qemuImg = new QemuImgClient(realRunner().runner, 'qemu-img', 30_000);

describe('QemuImgClient.bitmaps', () => {
  it('qcow2 with an enabled and a disabled bitmap: names and flags', async () => {
    const f = join(tempDir('qi-bitmaps'), 'a.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', f, '1M']);
    execFileSync('qemu-img', ['bitmap', '--add', f, 'on']);
    execFileSync('qemu-img', ['bitmap', '--add', '--disable', f, 'off']);
    expect(await qemuImg.bitmaps(f)).toEqual([
      { name: 'on', flags: ['auto'], granularity: 65536 },
      { name: 'off', flags: [], granularity: 65536 },
    ]);
  });

  it('qcow2 without bitmaps, and a raw image: none', async () => {
    const dir = tempDir('qi-none');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', join(dir, 'b.qcow2'), '1M']);
    execFileSync('qemu-img', ['create', '-q', '-f', 'raw', join(dir, 'c.raw'), '1M']);
    expect(await qemuImg.bitmaps(join(dir, 'b.qcow2'))).toEqual([]);
    expect(await qemuImg.bitmaps(join(dir, 'c.raw'))).toEqual([]);
  });

  it("a missing image: QEMU_IMG_FAILED with qemu-img's own error", async () => {
    const e = await qemuImg.bitmaps(join(tempDir('qi-missing'), 'nope.qcow2')).catch((err: unknown) => err);
    expect(e).toBeInstanceOf(ToolError);
    expect(e).toMatchObject({ code: 'QEMU_IMG_FAILED', details: expect.stringMatching(/Could not open/) });
  });

  it('not JSON: a coded error (the caller then trusts no bitmap)', async () => {
    const q = new QemuImgClient(scriptedRunner(() => ok('qemu-img: Could not open')).runner, 'qemu-img', 1000);
    await expect(q.bitmaps('/x.qcow2')).rejects.toMatchObject({ code: 'QEMU_IMG_FAILED', message: 'Cannot read the bitmaps of /x.qcow2' });
  });
});

describe('QemuImgClient: add, replace, check', () => {
  it('add says false when the bitmap exists; replace leaves an empty, recording one', async () => {
    const f = join(tempDir('qi-add'), 'a.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', f, '1M']);
    execFileSync('qemu-img', ['bitmap', '--add', '--disable', f, 'b']);
    expect(await qemuImg.addBitmap(f, 'n')).toBe(true);
    expect(await qemuImg.addBitmap(f, 'b')).toBe(false);
    await qemuImg.replaceBitmap(f, 'b');
    expect((await qemuImg.bitmaps(f)).find((b) => b.name === 'b')).toEqual({ name: 'b', flags: ['auto'], granularity: 65536 });
  });

  it('add on a file that is not an image: a coded error, not false', async () => {
    const f = join(tempDir('qi-add-bad'), 'x.qcow2');
    await expect(qemuImg.addBitmap(f, 'b')).rejects.toMatchObject({ code: 'QEMU_IMG_FAILED' });
  });

  it('check: clean, and a failure with its exit code and first line', async () => {
    const f = join(tempDir('qi-check'), 'a.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', f, '1M']);
    expect(await qemuImg.check(f, { shared: true })).toEqual({ kind: 'clean' });
    const r = await qemuImg.check(`${f}.missing`);
    expect(r).toMatchObject({ kind: 'failed', exitCode: 1, message: expect.stringMatching(/^qemu-img: Could not open/) });
  });

  it('check exit 3 is leaked clusters only', async () => {
    const q = new QemuImgClient(scriptedRunner(() => ({ exitCode: 3 })).runner, 'qemu-img', 1000);
    expect(await q.check('/x.qcow2')).toEqual({ kind: 'leaks' });
  });

  it('convert: a timeout and an interruption keep their own codes', async () => {
    const timedOut = new QemuImgClient(
      scriptedRunner(() => ({ exitCode: null, timedOut: true, durationMs: 5000 })).runner,
      'qemu-img',
      1000,
    );
    await expect(timedOut.convert('/a', 'raw', '/b')).rejects.toMatchObject({
      code: 'COMMAND_TIMEOUT',
      message: 'qemu-img convert failed for /a /b',
    });
    const canceled = new QemuImgClient(scriptedRunner(() => ({ exitCode: null, canceled: true })).runner, 'qemu-img', 1000);
    await expect(canceled.convert('/a', 'raw', '/b')).rejects.toMatchObject({
      code: 'INTERRUPTED',
      message: 'Interrupted while copying /a',
      details: '',
    });
  });

  it('rebase: -u and the backing format on the argv; a failure names both files', async () => {
    const { runner, calls } = scriptedRunner(() => ({ exitCode: 1, stderr: 'qemu-img: boom\n' }));
    const q = new QemuImgClient(runner, 'qemu-img', 1000);
    await expect(q.rebase({ file: '/n/t.qcow2', backing: '../p.qcow2', backingFormat: 'qcow2', unsafe: true })).rejects.toMatchObject({
      code: 'QEMU_IMG_FAILED',
      message: 'qemu-img rebase failed for /n/t.qcow2 onto ../p.qcow2',
      details: 'qemu-img: boom',
    });
    expect(calls[0]!.args).toEqual(['rebase', '-u', '-b', '../p.qcow2', '-F', 'qcow2', '/n/t.qcow2']);
  });
});
