// CLI contract: usage, option errors, the QEMU/libvirt check, log lines.
import { afterAll, describe, expect, it } from 'vitest';
import { bindNas, leftovers, logText, makeSandbox, run, writeShim } from '../helpers/cli.js';
import { removeTempDirs } from '../helpers/tmp.js';

afterAll(removeTempDirs);

const SYNOPSIS =
  'Usage: <SCRIPT> -o <operation> -v|--vm <domain name> -t <storage type> -s <storage address> -m <mount options> -p <backup path> -d <disks path> -q|--quiesce <true|false>\n' +
  '         [-M|--mode <full|incremental>] [--bitmap-new <name>] [--bitmap-parent <name>] [--parent-paths <p1,p2,...>]\n';

describe('usage and option errors', () => {
  it('-h prints usage (empty line, then the synopsis with the script path) and exits 1', async () => {
    const sb = makeSandbox('gen-help');
    const r = await run(sb, ['-h'], { NASBACKUP_SCRIPT_NAME: '/usr/share/x/nasbackup.sh' });
    expect(r.code).toBe(1);
    expect(r.stdout.startsWith('\n' + SYNOPSIS.replace('<SCRIPT>', '/usr/share/x/nasbackup.sh'))).toBe(true);
    expect(r.stderr).toBe('');
  });

  it('an unknown option prints "Invalid option: <arg>" and the usage, exit 1, before any host call', async () => {
    const sb = makeSandbox('gen-invalid');
    writeShim(sb, 'virsh', 'echo called >> "$0.calls"; exit 1');
    const r = await run(sb, ['-o', 'stats', '-x', 'y'], { NASBACKUP_SCRIPT_NAME: 'S' });
    expect(r.code).toBe(1);
    expect(r.stdout.startsWith('Invalid option: -x\n\n' + SYNOPSIS.replace('<SCRIPT>', 'S'))).toBe(true);
    const { existsSync } = await import('node:fs');
    expect(existsSync(`${sb.shims}/virsh.calls`)).toBe(false);
  });

  it.each([
    [['-o', 'stats', '-t', 'nfs', '-s', 'h:/e', '-m'], /^Option -m requires a value\n$/],
    [['-o', 'nonsense', '-t', 'nfs', '-s', 'h:/e'], /^Unknown operation: nonsense/],
    [['-t', 'nfs', '-s', 'h:/e'], /^Missing -o <operation>/],
    [['-o', 'stats', '-m', ''], /^The NAS must be given with -t <storage type> and -s <storage address>\n$/],
    [
      ['-o', 'backup', '-v', 'v', '-t', 'nfs', '-s', 'h:/e', '-m', '', '-p', 'v/t', '-q', 'false', '-d', '', '-e', '/key'],
      /^Option -e\/--encrypt is not supported/,
    ],
    [
      ['-o', 'backup', '-v', 'v', '-t', 'nfs', '-s', 'h:/e', '-m', '', '-p', 'v/t', '-q', 'false', '-d', '', '-c'],
      /^Option -c\/--compress is not supported/,
    ],
    [['-o', 'stats', '-t', 'nfs', '-s', 'h:/e', '-m', '', '-w', 'soon'], /^Invalid mount timeout: soon/],
  ])('%j -> clear message, exit 1, nothing mounted', async (argv, msg) => {
    const sb = makeSandbox('gen-bad');
    const r = await run(sb, argv);
    expect(r.code).toBe(1);
    expect(r.stdout).toMatch(msg);
    expect(leftovers(sb)).toEqual({ dirs: [], mounts: [] });
  });
});

describe('QEMU/libvirt sanity check', () => {
  const version = (qemu: string, libvirt: string): string =>
    `printf 'Compiled against library: libvirt 9.0.0\\nUsing library: libvirt ${libvirt}\\nUsing API: QEMU 9.0.0\\nRunning hypervisor: QEMU ${qemu}\\n\\n'`;

  it.each([
    ['4.1.0', '9.0.0'],
    ['7.2.0', '7.1.0'],
  ])('QEMU %s / libvirt %s: the Failure... message and exit 1 (the original exits 2 silently)', async (q, l) => {
    const sb = makeSandbox('gen-old');
    writeShim(sb, 'virsh', version(q, l));
    const r = await run(sb, ['-o', 'stats', ...bindNas(sb)]);
    expect(r.code).toBe(1);
    expect(r.stdout).toBe(
      `Failure... Your QEMU version ${q} or libvirt version ${l} is unsupported. Consider upgrading to the required minimum version of QEMU: 4.2.0 and Libvirt: 7.2.0\n`,
    );
    expect(leftovers(sb)).toEqual({ dirs: [], mounts: [] });
  });

  it('libvirtd down: a clear message with virsh’s error on stdout, exit 1', async () => {
    const sb = makeSandbox('gen-down');
    writeShim(sb, 'virsh', "echo 'error: failed to connect to the hypervisor' >&2; exit 1");
    const r = await run(sb, ['-o', 'stats', ...bindNas(sb)]);
    expect(r.code).toBe(1);
    expect(r.stdout).toBe(
      'Cannot query the QEMU/libvirt versions (virsh exited with code 1); is libvirtd running?\nerror: failed to connect to the hypervisor\n',
    );
  });

  it('virsh missing altogether: a clear message, exit 1', async () => {
    const sb = makeSandbox('gen-novirsh');
    const r = await run(sb, ['-o', 'stats', ...bindNas(sb)], { NASBACKUP_VIRSH: '/nonexistent/virsh' });
    expect(r.code).toBe(1);
    expect(r.stdout).toMatch(/^Cannot query the QEMU\/libvirt versions \(could not run \/nonexistent\/virsh: ENOENT\)/);
  });

  it('logs the versions in the original format; NASBACKUP_VERSION_CHECK=backup skips it for storage-only operations', async () => {
    const sb = makeSandbox('gen-ok');
    expect((await run(sb, ['-o', 'stats', ...bindNas(sb)])).code).toBe(0);
    expect(logText(sb)).toMatch(
      /^\d{4}-\d\d-\d\d \d\d-\d\d-\d\d> exec: virsh version -> exit 0 \(\d+ ms\)\n\S+ \S+> Success\.\.\. \[ QEMU: 7\.2\.0 Libvirt: 9\.0\.0 apiVersion: 9\.0\.0 \]\n\S+ \S+> Environment Sanity Checks successfully passed\n/,
    );
    writeShim(sb, 'virsh', 'exit 1');
    expect((await run(sb, ['-o', 'stats', ...bindNas(sb)], { NASBACKUP_VERSION_CHECK: 'backup' })).code).toBe(0);
  });
});

describe('mount failures', () => {
  it('prints "Failed to mount <type> store" with mount’s own error, removes the mount point, exit 1', async () => {
    const sb = makeSandbox('gen-mountfail');
    const r = await run(sb, ['-o', 'stats', '-t', 'none', '-s', `${sb.root}/does-not-exist`, '-m', 'bind']);
    expect(r.code).toBe(1);
    expect(r.stdout).toMatch(/^Failed to mount none store\nmount: .*does-not-exist.*\n/);
    expect(leftovers(sb)).toEqual({ dirs: [], mounts: [] });
  });

  it('a mount that hangs is cut off by the deadline and cleaned up', async () => {
    const sb = makeSandbox('gen-mounthang');
    writeShim(sb, 'mount', 'exec sleep 60');
    const t0 = Date.now();
    const r = await run(sb, ['-o', 'stats', ...bindNas(sb)], { NASBACKUP_MOUNT_TIMEOUT: '1' });
    expect(Date.now() - t0).toBeLessThan(15_000);
    expect(r.code).toBe(1);
    expect(r.stdout).toMatch(/^Failed to mount none store\nmount timed out after 1 s\n$/);
    expect(leftovers(sb)).toEqual({ dirs: [], mounts: [] });
  });

  it('-w (the fork’s mount timeout) overrides the deadline', async () => {
    const sb = makeSandbox('gen-mountw');
    writeShim(sb, 'mount', 'exec sleep 60');
    const t0 = Date.now();
    const r = await run(sb, ['-o', 'stats', ...bindNas(sb), '-w', '1']);
    expect(Date.now() - t0).toBeLessThan(15_000);
    expect(r.stdout).toMatch(/timed out after 1 s/);
  });

  it('cifs options get nobrl appended without a leading comma', async () => {
    const sb = makeSandbox('gen-cifs');
    writeShim(sb, 'mount', 'echo "$@" > "$0.args"; exit 32');
    await run(sb, ['-o', 'stats', '-t', 'cifs', '-s', '//h/s', '-m', '']);
    await run(sb, ['-o', 'stats', '-t', 'cifs', '-s', '//h/s', '-m', 'username=u,password=p']);
    const { readFileSync } = await import('node:fs');
    expect(readFileSync(`${sb.shims}/mount.args`, 'utf8')).toMatch(
      /^-t cifs \/\/h\/s \S+\/csbackup\.\w{5} -o username=u,password=p,nobrl\n$/,
    );
    expect(logText(sb)).toMatch(/-o nobrl -> /);
    expect(logText(sb)).toMatch(/-o username=u,password=\*\*\*,nobrl -> /);
    expect(logText(sb)).not.toMatch(/password=p\b/);
  });
});

describe('settings: one that is set but unusable is an error, not the default', () => {
  it.each([
    [{ NASBACKUP_AGENT_PROFILE: 'newset' }, /^Invalid NASBACKUP_AGENT_PROFILE: newset \(expected rebase-era, merged or newest\)\n$/],
    [{ NASBACKUP_MOUNT_TIMEOUT: '10s' }, /^Invalid NASBACKUP_MOUNT_TIMEOUT: 10s/],
    [{ NASBACKUP_BREAK_LOCK: 'yes' }, /^Invalid NASBACKUP_BREAK_LOCK: yes/],
  ])('%j: one line, exit 1, INVALID_SETTING logged, nothing mounted', async (env, message) => {
    const sb = makeSandbox('gen-setting');
    const r = await run(sb, ['-o', 'stats', ...bindNas(sb)], env);
    expect(r).toMatchObject({ code: 1, stderr: '' });
    expect(r.stdout).toMatch(message);
    expect(logText(sb)).toMatch(/ERROR \[INVALID_SETTING\] Invalid NASBACKUP_/);
    expect(logText(sb)).not.toMatch(/exec: mount/);
    expect(leftovers(sb)).toEqual({ dirs: [], mounts: [] });
    const j = await run(sb, ['-o', 'stats', ...bindNas(sb), '--json'], env);
    expect(j.code).toBe(1);
    expect(JSON.parse(j.stdout)).toMatchObject({
      ok: false,
      command: 'stats',
      errors: [{ code: 'INVALID_SETTING', exitCode: 1 }],
      warnings: [],
    });
  });
});

describe('operator messages name files on the NAS, not the temporary mount point', () => {
  it('-o rebase --json of a missing file: `<instance>/<ts>/<file> on <address>`; the agent text is unchanged', async () => {
    const sb = makeSandbox('gen-relnames');
    const argv = [
      '-o',
      'rebase',
      ...bindNas(sb),
      '--rebase-target',
      'i-2-10-VM/2025.01.03.00.00.00/root.v.qcow2',
      '--rebase-new-backing',
      'i-2-10-VM/2025.01.01.00.00.00/root.v.qcow2',
    ];
    const agent = await run(sb, argv);
    expect(agent.code).toBe(1);
    // The agent's bytes are the contract's (the absolute path it always had).
    expect(agent.stdout).toMatch(
      new RegExp(
        `^Rebase target file does not exist: ${sb.tmp}/csbackup\\.\\w+/i-2-10-VM/2025\\.01\\.03\\.00\\.00\\.00/root\\.v\\.qcow2\\n$`,
      ),
    );
    const j = await run(sb, [...argv, '--json']);
    expect(j.code).toBe(1);
    expect(j.stdout).not.toContain('csbackup.');
    expect(JSON.parse(j.stdout).errors[0].message).toBe(
      `Rebase target file does not exist: i-2-10-VM/2025.01.03.00.00.00/root.v.qcow2 on ${sb.nas}`,
    );
    expect(leftovers(sb)).toEqual({ dirs: [], mounts: [] });
  });
});
