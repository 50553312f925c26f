// The effective configuration: built once from the environment and the command line's
// settings, frozen, and a setting that is set but unusable is an error (not the default).
import { describe, expect, it } from 'vitest';
import { loadConfig } from '../../lib/config.js';
import { type NasbackupError } from '../../lib/errors.js';

function refusal(env: NodeJS.ProcessEnv, flags = {}): NasbackupError {
  try {
    loadConfig(env, flags);
  } catch (e) {
    return e as NasbackupError;
  }
  throw new Error('accepted');
}

describe('loadConfig', () => {
  it('defaults when unset or empty; frozen', () => {
    const c = loadConfig({ NASBACKUP_MOUNT_TIMEOUT: '', NASBACKUP_AGENT_PROFILE: '' });
    expect(c).toMatchObject({
      mountTimeoutMs: 60_000,
      agentProfile: 'rebase-era',
      engine: 'auto',
      versionCheck: 'all',
      breakLock: false,
      hashWorkers: null,
    });
    expect(loadConfig({ NASBACKUP_HASH_WORKERS: '0' }).hashWorkers).toBe(0);
    expect(loadConfig({ NASBACKUP_HASH_WORKERS: '2' }).hashWorkers).toBe(2);
    expect(c.digestAlgorithm).toBe('xxh64');
    expect(loadConfig({ NASBACKUP_DIGEST: 'sha256' }).digestAlgorithm).toBe('sha256');
    expect(Object.isFrozen(c)).toBe(true);
  });

  it.each([
    ['NASBACKUP_AGENT_PROFILE', 'newset', /Invalid NASBACKUP_AGENT_PROFILE: newset \(expected rebase-era, merged or newest\)/],
    ['NASBACKUP_MOUNT_TIMEOUT', 'abc', /Invalid NASBACKUP_MOUNT_TIMEOUT: abc \(expected a positive number of seconds\)/],
    ['NASBACKUP_JOB_TIMEOUT', '-5', /NASBACKUP_JOB_TIMEOUT/],
    ['NASBACKUP_UMOUNT_ATTEMPTS', '2.5', /a positive whole number/],
    ['NASBACKUP_VERSION_CHECK', 'sometimes', /expected all, backup or off/],
    ['NASBACKUP_BREAK_LOCK', 'yes', /expected 1, true, 0 or false/],
    ['NASBACKUP_ENGINE', 'turbo', /Invalid NASBACKUP_ENGINE: turbo \(expected auto, native or qemu-img\)/],
    ['NASBACKUP_HASH_WORKERS', '5', /Invalid NASBACKUP_HASH_WORKERS: 5 \(expected a whole number from 0 to 4\)/],
    ['NASBACKUP_HASH_WORKERS', 'two', /NASBACKUP_HASH_WORKERS/],
    ['NASBACKUP_DIGEST', 'md5', /Invalid NASBACKUP_DIGEST: md5 \(expected xxh64 or sha256\)/],
  ])('%s=%s is refused with INVALID_SETTING', (name, value, message) => {
    const e = refusal({ [name]: value });
    expect(e.code).toBe('INVALID_SETTING');
    expect(e.exitCode).toBe(1);
    expect(e.message).toMatch(message);
  });

  it('command-line settings override the environment (and are checked as arguments)', () => {
    const c = loadConfig(
      { NASBACKUP_ENGINE: 'native', NASBACKUP_MOUNT_TIMEOUT: '5' },
      { engine: 'qemu-img', mountTimeout: '1.5', quiesceTimeout: '7', agentProfile: 'newest' },
    );
    expect(c).toMatchObject({ engine: 'qemu-img', mountTimeoutMs: 1500, quiesceTimeoutSec: 7, agentProfile: 'newest' });
    // The agent command's profile wins over a bad environment value it already rejected or overrode.
    expect(loadConfig({ NASBACKUP_AGENT_PROFILE: 'bogus' }, { agentProfile: 'merged' }).agentProfile).toBe('merged');
    expect(refusal({}, { engine: 'turbo' })).toMatchObject({
      code: 'INVALID_ARGUMENT',
      message: expect.stringMatching(/Invalid --engine: turbo/),
    });
    expect(refusal({}, { mountTimeout: '0' }).code).toBe('INVALID_ARGUMENT');
    expect(refusal({}, { quiesceTimeout: '1.5' }).code).toBe('INVALID_ARGUMENT');
  });
});
