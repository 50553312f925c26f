import { mkdirSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { ensureWithin, parseRelativePath } from '../../lib/paths.js';
import { removeTempDirs, tempDir } from '../helpers/tmp.js';

afterAll(removeTempDirs);

const codeOf = async (p: Promise<unknown>): Promise<string> =>
  p.then(
    () => 'ok',
    (e: { code: string }) => e.code,
  );
const syncCode = (f: () => unknown): string => {
  try {
    f();
    return 'ok';
  } catch (e) {
    return (e as { code: string }).code;
  }
};

describe('parseRelativePath', () => {
  const what = '-p';
  it.each([
    ['', 'PATH_EMPTY'],
    ['.', 'PATH_EMPTY'],
    ['//', 'PATH_ABSOLUTE'],
    ['./.', 'PATH_EMPTY'],
    ['/etc/passwd', 'PATH_ABSOLUTE'],
    ['/', 'PATH_ABSOLUTE'],
    ['../x', 'PATH_TRAVERSAL'],
    ['a/../../x', 'PATH_TRAVERSAL'],
    ['a/b/..', 'PATH_TRAVERSAL'],
    ['a\0b/c', 'PATH_INVALID'],
    ['vm', 'PATH_TOO_SHALLOW'],
    ['vm/', 'PATH_TOO_SHALLOW'],
    ['vm/2025.01.01', 'ok'],
    ['./vm//2025.01.01/', 'ok'],
    ['vm/..2025', 'ok'],
  ])('%j -> %s', (raw, expected) => {
    expect(syncCode(() => parseRelativePath(raw, { what, minDepth: 2 }))).toBe(expected);
  });

  it('normalizes . and repeated slashes', () => {
    expect(parseRelativePath('./vm//ts/./f', { what })).toEqual(['vm', 'ts', 'f']);
  });
});

describe('ensureWithin', () => {
  const root = tempDir('paths');
  const mount = join(root, 'mnt');
  const outside = join(root, 'outside');
  mkdirSync(join(mount, 'vm', 'ts'), { recursive: true });
  mkdirSync(outside, { recursive: true });
  writeFileSync(join(outside, 'secret'), 'x');
  symlinkSync(outside, join(mount, 'vm', 'escape'));
  symlinkSync('../..', join(mount, 'vm', 'up'));
  symlinkSync('.', join(mount, 'self'));
  symlinkSync('ts', join(mount, 'vm', 'alias'));

  it('returns the joined path for a path inside', async () => {
    expect(await ensureWithin(mount, 'vm/ts', { what: '-p', minDepth: 2 })).toBe(join(mount, 'vm', 'ts'));
  });
  it('accepts paths that do not exist yet', async () => {
    expect(await ensureWithin(mount, 'vm/new/file', { what: '-p' })).toBe(join(mount, 'vm', 'new', 'file'));
  });
  it('accepts a symlink that stays inside', async () => {
    expect(await codeOf(ensureWithin(mount, 'vm/alias', { what: '-p', minDepth: 2 }))).toBe('ok');
  });
  it('refuses a link that shortens the path below the minimum depth', async () => {
    expect(await codeOf(ensureWithin(mount, 'self/vm', { what: '-p', minDepth: 2 }))).toBe('PATH_TOO_SHALLOW');
  });
  it.each(['vm/escape', 'vm/escape/secret', 'vm/escape/new/file', 'vm/up/x', 'self/x/y'])(
    'refuses %s (escapes, or lands on the root, through a link)',
    async (p) => {
      expect(await codeOf(ensureWithin(mount, p, { what: '-p', minDepth: 2 }))).toBe('PATH_OUTSIDE_MOUNT');
    },
  );
});
