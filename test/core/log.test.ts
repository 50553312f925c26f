import { readFileSync, writeFileSync, chmodSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { createLogger, formatLogLines, formatTimestamp } from '../../lib/log.js';
import { redact } from '../../lib/exec.js';
import { removeTempDirs, tempDir } from '../helpers/tmp.js';

afterAll(removeTempDirs);

describe('log format', () => {
  it('uses the original timestamp with hyphens in the time', () => {
    expect(formatTimestamp(new Date(2026, 0, 5, 3, 4, 5))).toBe('2026-01-05 03-04-05');
  });
  it('prefixes every line', () => {
    expect(formatLogLines('a\nb\n', new Date(2026, 10, 28, 13, 0, 9))).toBe('2026-11-28 13-00-09> a\n2026-11-28 13-00-09> b\n');
  });
});

describe('logger', () => {
  it('appends and never truncates', () => {
    const f = join(tempDir('log'), 'agent.log');
    writeFileSync(f, 'existing agent line\n');
    const l = createLogger(f);
    l.log('one');
    createLogger(f).log('two');
    const text = readFileSync(f, 'utf8');
    expect(text.startsWith('existing agent line\n')).toBe(true);
    expect(text).toMatch(/^existing agent line\n\d{4}-\d\d-\d\d \d\d-\d\d-\d\d> one\n\d{4}-\d\d-\d\d \d\d-\d\d-\d\d> two\n$/);
  });
  it('creates a missing directory', () => {
    const f = join(tempDir('log'), 'a', 'b', 'agent.log');
    createLogger(f).log('x');
    expect(readFileSync(f, 'utf8')).toMatch(/> x\n$/);
  });
  it('never throws when the log cannot be written', () => {
    const d = tempDir('log');
    mkdirSync(join(d, 'dir.log'));
    expect(() => createLogger(join(d, 'dir.log')).log('x')).not.toThrow();
    const ro = join(d, 'ro');
    mkdirSync(ro);
    chmodSync(ro, 0o500);
    expect(() => createLogger(join(ro, 'x', 'agent.log')).log('x')).not.toThrow();
  });
  it('keeps CIFS credentials out of the log', () => {
    expect(redact('mount -t cifs //h/s /m -o username=u,password=s3cr3t,vers=3.0')).toBe(
      'mount -t cifs //h/s /m -o username=u,password=***,vers=3.0',
    );
  });
});
