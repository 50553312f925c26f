// The virsh client: what it makes of virsh's output (libvirt 9 formats, docs/e2e-lab.md §7),
// its coded errors, and the argv of every call. Through a scripted Runner: the parsers
// are private to the client.
import { describe, expect, it } from 'vitest';
import { ToolError } from '../../lib/clients/failure.js';
import { RESTORE_FILE_NAMES, URI, VirshClient } from '../../lib/clients/virsh.js';
import { fails, ok, scriptedRunner } from '../helpers/runner.js';

/** A client whose every call prints `stdout` (or fails as given). */
const answering = (answer: Parameters<typeof scriptedRunner>[0]) => new VirshClient(scriptedRunner(answer).runner, 'virsh', 1000);
const printing = (stdout: string) => answering(() => ok(stdout));
const parseList = (text: string) => printing(text).list();
const parseDomblklistDetails = (text: string) => printing(text).blockDevices('vm');
const parseJobInfo = async (text: string) => (await printing(text).jobInfoCompleted('vm')).fields;
const parseQueryBlock = (text: string) => printing(text).queryBlock('vm');
/** The progress figure of a running job that reports `File processed: <text>`. */
const parseSize = async (text: string | undefined) =>
  (
    await printing(
      `Job type:         Unbounded\n${text === undefined ? '' : `File processed:   ${text}\n`}File total:       1.000 MiB\n`,
    ).jobInfo('vm')
  ).processed;

describe('parseList', () => {
  it('reads the table (padded columns, trailing empty line)', async () => {
    const text = ' Id   Name        State\n---------------------------\n 3    i-3-12-VM   running\n 7    i-2-10-VM   paused\n\n';
    expect(await parseList(text)).toEqual([
      { id: '3', name: 'i-3-12-VM', state: 'running' },
      { id: '7', name: 'i-2-10-VM', state: 'paused' },
    ]);
  });
  it('keeps states with a space, and inactive rows of --all', async () => {
    const text = ' Id   Name        State\n-------------------------------\n 7    i-2-10-VM   in shutdown\n -    i-9-99-VM   shut off\n\n';
    expect(await parseList(text)).toEqual([
      { id: '7', name: 'i-2-10-VM', state: 'in shutdown' },
      { id: '-', name: 'i-9-99-VM', state: 'shut off' },
    ]);
  });
  it('no domains: nothing (the header is never a row)', async () => {
    expect(await parseList(' Id   Name   State\n--------------------\n\n')).toEqual([]);
    expect(await parseList('')).toEqual([]);
  });
});

describe('parseDomblklistDetails', () => {
  it('reads every row, an empty cdrom as "-", sources with spaces kept whole', async () => {
    const text =
      ' Type   Device   Target   Source\n' +
      '---------------------------------------------------------------\n' +
      ' file   disk     vda      /var/lib/libvirt/images/my disk (copy).qcow2\n' +
      ' network disk    vdb      pool/volume\n' +
      ' block  disk     vdc      /dev/drbd/by-res/cs-5f2c7e1a-0000-4000-8000-000000000001/0\n' +
      ' file   cdrom    hdc      -\n\n';
    expect(await parseDomblklistDetails(text)).toEqual([
      { type: 'file', device: 'disk', target: 'vda', source: '/var/lib/libvirt/images/my disk (copy).qcow2' },
      { type: 'network', device: 'disk', target: 'vdb', source: 'pool/volume' },
      { type: 'block', device: 'disk', target: 'vdc', source: '/dev/drbd/by-res/cs-5f2c7e1a-0000-4000-8000-000000000001/0' },
      { type: 'file', device: 'cdrom', target: 'hdc', source: '-' },
    ]);
  });
  it('a trailing space after a source is not part of it', async () => {
    const text = ' Type   Device   Target   Source\n-------------------------------\n file   disk     vda      /a b/c   \n';
    expect((await parseDomblklistDetails(text))[0]!.source).toBe('/a b/c');
  });
});

describe('parseJobInfo', () => {
  it('keys and trimmed values, inner spacing kept', async () => {
    const text =
      'Job type:         Completed   \nOperation:        Backup      \nTime elapsed:     133          ms\n' +
      'File processed:   16.000 MiB\nFile remaining:   0.000 B\nFile total:       16.000 MiB\n\n';
    const m = await parseJobInfo(text);
    expect(m.get('Job type')).toBe('Completed');
    expect(m.get('Operation')).toBe('Backup');
    expect(m.get('Time elapsed')).toBe('133          ms');
    expect(m.get('File total')).toBe('16.000 MiB');
    expect(m.size).toBe(6);
  });
  it('an error message with colons stays whole; None has one key', async () => {
    expect(
      (await parseJobInfo('Job type:         Failed      \nError message:    operation failed: job: No space left on device\n')).get(
        'Error message',
      ),
    ).toBe('operation failed: job: No space left on device');
    expect([...(await parseJobInfo('Job type:         None        \n\n'))]).toEqual([['Job type', 'None']]);
    expect((await parseJobInfo('')).size).toBe(0);
  });
});

describe('parseSize', () => {
  it.each([
    ['0.000 B', 0],
    ['512.000 B', 512],
    ['128.000 KiB', 131072],
    ['16.000 MiB', 16 * 1024 * 1024],
    ['1.125 GiB', 1.125 * 1024 ** 3],
    ['2.000 TiB', 2 * 1024 ** 4],
  ])('%s -> %d bytes', async (text, bytes) => {
    expect(await parseSize(text)).toBe(bytes);
  });
  it.each([[undefined], [''], ['16 MB'], ['MiB'], ['-1.000 MiB'], ['16.000 MiB extra']])('%j -> null', async (text) => {
    expect(await parseSize(text)).toBeNull();
  });
});

describe('parseQueryBlock', () => {
  const bitmap = (name: string, extra: Record<string, unknown> = {}) => ({
    name,
    recording: true,
    persistent: true,
    busy: false,
    granularity: 65536,
    count: 0,
    ...extra,
  });

  it('QEMU >= 4.2: dirty-bitmaps inside "inserted"; an empty cdrom has no file', async () => {
    const reply = {
      return: [
        {
          device: '',
          qdev: '/machine/peripheral/virtio-disk0/virtio-backend',
          inserted: { file: '/pool/a.qcow2', 'dirty-bitmaps': [bitmap('b1'), bitmap('b2', { inconsistent: true })] },
        },
        { device: '', qdev: '/machine/peripheral/virtio-disk1/virtio-backend', inserted: { file: '/pool/b.qcow2' } },
        { device: '', qdev: 'ide0-1-0', removable: true, tray_open: false },
      ],
      id: 'libvirt-42',
    };
    const e = await parseQueryBlock(JSON.stringify(reply));
    expect(e.map((x) => x.file)).toEqual(['/pool/a.qcow2', '/pool/b.qcow2', null]);
    expect(e[0]!.bitmaps.map((b) => [b.name, b.inconsistent ?? false])).toEqual([
      ['b1', false],
      ['b2', true],
    ]);
    expect(e[1]!.bitmaps).toEqual([]);
    expect(e[2]!.bitmaps).toEqual([]);
  });

  it('older QEMU: dirty-bitmaps at the top level of each entry', async () => {
    const reply = {
      return: [
        { device: 'drive-virtio-disk0', 'dirty-bitmaps': [bitmap('b1', { persistent: false })], inserted: { file: '/pool/a.qcow2' } },
      ],
    };
    const [e] = await parseQueryBlock(JSON.stringify(reply));
    expect(e).toMatchObject({ file: '/pool/a.qcow2', bitmaps: [{ name: 'b1', persistent: false }] });
  });

  it('virsh\'s trailing empty line is fine; a reply without "return" or not JSON is an error', async () => {
    expect(await parseQueryBlock('{"return":[],"id":"libvirt-1"}\n\n')).toEqual([]);
    await expect(parseQueryBlock('{"error":{"class":"GenericError","desc":"x"}}')).rejects.toMatchObject({
      code: 'VIRSH_FAILED',
      details: 'query-block reply has no return array',
    });
    await expect(parseQueryBlock('error: failed to get domain')).rejects.toBeInstanceOf(ToolError);
  });
});

describe('VirshClient: the argv of every call', () => {
  const { runner, calls } = scriptedRunner((args) => (args.includes('qemu-monitor-command') ? ok('{"return":[]}') : {}));
  const v = new VirshClient(runner, '/usr/bin/virsh', 300_000);
  const last = () => calls.at(-1)!;

  it.each<[string, () => Promise<unknown>, string[], boolean]>([
    ['list', () => v.list(), ['list'], true],
    ['blockDevices', () => v.blockDevices('vm'), ['domblklist', 'vm', '--details'], true],
    ['restoreFile domblklist.xml', () => v.restoreFile('vm', 'domblklist.xml'), ['domblklist', 'vm'], true],
    ['restoreFile domain-config.xml', () => v.restoreFile('vm', 'domain-config.xml'), ['dumpxml', 'vm'], true],
    ['restoreFile dominfo.xml', () => v.restoreFile('vm', 'dominfo.xml'), ['dominfo', 'vm'], true],
    ['restoreFile domiflist.xml', () => v.restoreFile('vm', 'domiflist.xml'), ['domiflist', 'vm'], true],
    ['state', () => v.state('vm'), ['domstate', 'vm'], false],
    ['resume', () => v.resume('vm'), ['resume', 'vm'], false],
    ['checkpoints', () => v.checkpoints('vm'), ['checkpoint-list', 'vm', '--name'], true],
    ['checkpointCreate', () => v.checkpointCreate('vm', '/x/c.xml', false), ['checkpoint-create', 'vm', '--xmlfile', '/x/c.xml'], true],
    [
      'checkpointCreate --redefine',
      () => v.checkpointCreate('vm', '/x/c.xml', true),
      ['checkpoint-create', 'vm', '--xmlfile', '/x/c.xml', '--redefine'],
      true,
    ],
    ['checkpointDelete', () => v.checkpointDelete('vm', 'b-1'), ['checkpoint-delete', 'vm', 'b-1'], false],
    ['queryBlock', () => v.queryBlock('vm'), ['qemu-monitor-command', 'vm', '{"execute":"query-block"}'], true],
    ['backupBegin', () => v.backupBegin('vm', '/x/b.xml', null), ['backup-begin', '--domain', 'vm', '--backupxml', '/x/b.xml'], true],
    [
      'backupBegin + checkpoint',
      () => v.backupBegin('vm', '/x/b.xml', '/x/c.xml'),
      ['backup-begin', '--domain', 'vm', '--backupxml', '/x/b.xml', '--checkpointxml', '/x/c.xml'],
      true,
    ],
    ['jobInfoCompleted', () => v.jobInfoCompleted('vm'), ['domjobinfo', 'vm', '--completed'], false],
    [
      'jobInfoCompleted keep',
      () => v.jobInfoCompleted('vm', { keep: true }),
      ['domjobinfo', 'vm', '--completed', '--keep-completed'],
      false,
    ],
    [
      'jobInfoCompleted keep+anystats',
      () => v.jobInfoCompleted('vm', { keep: true, anystats: true }),
      ['domjobinfo', 'vm', '--completed', '--keep-completed', '--anystats'],
      false,
    ],
    ['jobInfo', () => v.jobInfo('vm'), ['domjobinfo', 'vm'], false],
    ['jobAbort', () => v.jobAbort('vm'), ['domjobabort', 'vm'], false],
  ])('%s', async (_name, call, args, abortable) => {
    await call();
    expect(last().command).toBe('/usr/bin/virsh');
    expect(last().args).toEqual(['-c', URI, ...args]);
    expect(last().opts.timeoutMs).toBe(300_000);
    // Cleanup and job bookkeeping must run even after SIGTERM.
    expect(last().opts.abortable !== false).toBe(abortable);
  });

  it('version runs without -c (as the original sanity check)', async () => {
    await v.version();
    expect(last().args).toEqual(['version']);
  });

  it('guest-agent commands carry --timeout and a deadline 10 s beyond it; the thaw is never cancelled', async () => {
    await v.guestFreeze('vm', 30);
    expect(last().args).toEqual(['-c', URI, 'qemu-agent-command', 'vm', '--timeout', '30', '{"execute":"guest-fsfreeze-freeze"}']);
    expect(last().opts).toMatchObject({ timeoutMs: 40_000 });
    expect(last().opts.abortable).toBeUndefined();
    await v.guestThaw('vm', 30);
    expect(last().args).toEqual(['-c', URI, 'qemu-agent-command', 'vm', '--timeout', '30', '{"execute":"guest-fsfreeze-thaw"}']);
    expect(last().opts.abortable).toBe(false);
  });

  it('the restore files, in the order they are saved', () => {
    expect(RESTORE_FILE_NAMES).toEqual(['domain-config.xml', 'dominfo.xml', 'domiflist.xml', 'domblklist.xml']);
  });
});

describe("VirshClient: a failed call is a coded error with virsh's text", () => {
  const busy = 'error: Timed out during operation: cannot acquire state change lock\n';
  const failing = answering(() => fails(busy));

  it.each<[string, () => Promise<unknown>, string, string]>([
    ['list', () => failing.list(), 'LIBVIRT_UNAVAILABLE', 'Cannot list domains (virsh exited with code 1)'],
    [
      'version',
      () => failing.version(),
      'LIBVIRT_UNAVAILABLE',
      'Cannot query the QEMU/libvirt versions (virsh exited with code 1); is libvirtd running?',
    ],
    ['blockDevices', () => failing.blockDevices('vm'), 'VIRSH_FAILED', 'virsh domblklist vm failed (virsh exited with code 1)'],
    ['checkpoints', () => failing.checkpoints('vm'), 'VIRSH_FAILED', 'virsh checkpoint-list vm failed (virsh exited with code 1)'],
    [
      'checkpointDelete',
      () => failing.checkpointDelete('vm', 'b-1'),
      'VIRSH_FAILED',
      'virsh checkpoint-delete vm b-1 failed (virsh exited with code 1)',
    ],
    ['restoreFile', () => failing.restoreFile('vm', 'dominfo.xml'), 'VIRSH_FAILED', 'virsh dominfo.xml failed (virsh exited with code 1)'],
    ['backupBegin', () => failing.backupBegin('vm', '/x/b.xml', null), 'BACKUP_BEGIN_FAILED', 'Failed to start the backup of vm'],
    ['jobInfo', () => failing.jobInfo('vm'), 'VIRSH_FAILED', 'virsh domjobinfo vm failed (virsh exited with code 1)'],
  ])('%s', async (_name, call, code, message) => {
    const e = await call().then(
      () => null,
      (err: unknown) => err,
    );
    expect(e).toBeInstanceOf(ToolError);
    expect(e).toMatchObject({ code, message });
    // version and list keep virsh's raw output; the others its trimmed text.
    expect((e as ToolError).details).toBe(busy.trim());
    expect((e as ToolError).reason).toBe('virsh exited with code 1');
    expect((e as ToolError).output).toBe(busy);
  });

  it('a call that could not start says so, with no output to show', async () => {
    const e = (await answering(() => ({ exitCode: null, spawnError: 'ENOENT' }))
      .checkpoints('vm')
      .catch((err: unknown) => err)) as ToolError;
    expect(e.message).toBe('virsh checkpoint-list vm failed (could not run virsh: ENOENT)');
    expect(e.details).toBe('could not run virsh: ENOENT');
  });

  it('a domjobinfo block keeps its text for the agent and its figures for the progress bar', async () => {
    const text = 'Job type:         Unbounded   \nData processed:   2.000 MiB\nData total:       4.000 MiB\n\n';
    const j = await printing(text).jobInfo('vm');
    expect(j).toMatchObject({ type: 'Unbounded', text, processed: 2 * 1024 * 1024, total: 4 * 1024 * 1024 });
    expect((await printing('\n').jobInfo('vm')).type).toBeNull();
  });

  it('checkpoint names one per line, blank lines dropped', async () => {
    expect(await printing('b-1\n  b-2 \n\n').checkpoints('vm')).toEqual(['b-1', 'b-2']);
  });
});
