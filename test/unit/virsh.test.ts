// virsh's output parsers (libvirt 9 formats, docs/e2e-lab.md §7) and the argv of every call.
import { describe, expect, it } from 'vitest';
import {
  parseDomblklistDetails, parseJobInfo, parseList, parseQueryBlock, parseSize, URI, VirshClient,
} from '../../lib/clients/virsh.js';
import type { Runner, RunOptions, RunResult } from '../../lib/exec.js';

describe('parseList', () => {
  it('reads the table (padded columns, trailing empty line)', () => {
    const text = ' Id   Name        State\n---------------------------\n 3    i-3-12-VM   running\n 7    i-2-10-VM   paused\n\n';
    expect(parseList(text)).toEqual([
      { id: '3', name: 'i-3-12-VM', state: 'running' },
      { id: '7', name: 'i-2-10-VM', state: 'paused' },
    ]);
  });
  it('keeps states with a space, and inactive rows of --all', () => {
    const text = ' Id   Name        State\n-------------------------------\n 7    i-2-10-VM   in shutdown\n -    i-9-99-VM   shut off\n\n';
    expect(parseList(text)).toEqual([
      { id: '7', name: 'i-2-10-VM', state: 'in shutdown' },
      { id: '-', name: 'i-9-99-VM', state: 'shut off' },
    ]);
  });
  it('no domains: nothing (the header is never a row)', () => {
    expect(parseList(' Id   Name   State\n--------------------\n\n')).toEqual([]);
    expect(parseList('')).toEqual([]);
  });
});

describe('parseDomblklistDetails', () => {
  it('reads every row, an empty cdrom as "-", sources with spaces kept whole', () => {
    const text =
      ' Type   Device   Target   Source\n' +
      '---------------------------------------------------------------\n' +
      ' file   disk     vda      /var/lib/libvirt/images/my disk (copy).qcow2\n' +
      ' network disk    vdb      pool/volume\n' +
      ' block  disk     vdc      /dev/drbd/by-res/cs-5f2c7e1a-0000-4000-8000-000000000001/0\n' +
      ' file   cdrom    hdc      -\n\n';
    expect(parseDomblklistDetails(text)).toEqual([
      { type: 'file', device: 'disk', target: 'vda', source: '/var/lib/libvirt/images/my disk (copy).qcow2' },
      { type: 'network', device: 'disk', target: 'vdb', source: 'pool/volume' },
      { type: 'block', device: 'disk', target: 'vdc', source: '/dev/drbd/by-res/cs-5f2c7e1a-0000-4000-8000-000000000001/0' },
      { type: 'file', device: 'cdrom', target: 'hdc', source: '-' },
    ]);
  });
  it('a trailing space after a source is not part of it', () => {
    const text = ' Type   Device   Target   Source\n-------------------------------\n file   disk     vda      /a b/c   \n';
    expect(parseDomblklistDetails(text)[0]!.source).toBe('/a b/c');
  });
});

describe('parseJobInfo', () => {
  it('keys and trimmed values, inner spacing kept', () => {
    const text =
      'Job type:         Completed   \nOperation:        Backup      \nTime elapsed:     133          ms\n' +
      'File processed:   16.000 MiB\nFile remaining:   0.000 B\nFile total:       16.000 MiB\n\n';
    const m = parseJobInfo(text);
    expect(m.get('Job type')).toBe('Completed');
    expect(m.get('Operation')).toBe('Backup');
    expect(m.get('Time elapsed')).toBe('133          ms');
    expect(m.get('File total')).toBe('16.000 MiB');
    expect(m.size).toBe(6);
  });
  it('an error message with colons stays whole; None has one key', () => {
    expect(parseJobInfo('Job type:         Failed      \nError message:    operation failed: job: No space left on device\n').get('Error message')).toBe(
      'operation failed: job: No space left on device',
    );
    expect([...parseJobInfo('Job type:         None        \n\n')]).toEqual([['Job type', 'None']]);
    expect(parseJobInfo('').size).toBe(0);
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
  ])('%s -> %d bytes', (text, bytes) => {
    expect(parseSize(text)).toBe(bytes);
  });
  it.each([[undefined], [''], ['16 MB'], ['MiB'], ['-1.000 MiB'], ['16.000 MiB extra']])('%j -> null', (text) => {
    expect(parseSize(text)).toBeNull();
  });
});

describe('parseQueryBlock', () => {
  const bitmap = (name: string, extra: Record<string, unknown> = {}) => ({ name, recording: true, persistent: true, busy: false, granularity: 65536, count: 0, ...extra });

  it('QEMU >= 4.2: dirty-bitmaps inside "inserted"; an empty cdrom has no file', () => {
    const reply = {
      return: [
        { device: '', qdev: '/machine/peripheral/virtio-disk0/virtio-backend', inserted: { file: '/pool/a.qcow2', 'dirty-bitmaps': [bitmap('b1'), bitmap('b2', { inconsistent: true })] } },
        { device: '', qdev: '/machine/peripheral/virtio-disk1/virtio-backend', inserted: { file: '/pool/b.qcow2' } },
        { device: '', qdev: 'ide0-1-0', removable: true, tray_open: false },
      ],
      id: 'libvirt-42',
    };
    const e = parseQueryBlock(JSON.stringify(reply));
    expect(e.map((x) => x.file)).toEqual(['/pool/a.qcow2', '/pool/b.qcow2', null]);
    expect(e[0]!.bitmaps.map((b) => [b.name, b.inconsistent ?? false])).toEqual([
      ['b1', false],
      ['b2', true],
    ]);
    expect(e[1]!.bitmaps).toEqual([]);
    expect(e[2]!.bitmaps).toEqual([]);
  });

  it('older QEMU: dirty-bitmaps at the top level of each entry', () => {
    const reply = { return: [{ device: 'drive-virtio-disk0', 'dirty-bitmaps': [bitmap('b1', { persistent: false })], inserted: { file: '/pool/a.qcow2' } }] };
    const [e] = parseQueryBlock(JSON.stringify(reply));
    expect(e).toMatchObject({ file: '/pool/a.qcow2', bitmaps: [{ name: 'b1', persistent: false }] });
  });

  it('virsh\'s trailing empty line is fine; a reply without "return" or not JSON is an error', () => {
    expect(parseQueryBlock('{"return":[],"id":"libvirt-1"}\n\n')).toEqual([]);
    expect(() => parseQueryBlock('{"error":{"class":"GenericError","desc":"x"}}')).toThrow(/no return array/);
    expect(() => parseQueryBlock('error: failed to get domain')).toThrow();
  });
});

describe('VirshClient: the argv of every call', () => {
  const seen: Array<{ command: string; args: readonly string[]; opts: RunOptions }> = [];
  const runner = {
    run: async (command: string, args: readonly string[], opts: RunOptions): Promise<RunResult> => {
      seen.push({ command, args, opts });
      return { command, args, exitCode: 0, signal: null, stdout: '', stderr: '', timedOut: false, canceled: false, spawnError: null, durationMs: 1 };
    },
  } as unknown as Runner;
  const v = new VirshClient(runner, '/usr/bin/virsh', 300_000);
  const last = () => seen.at(-1)!;

  it.each<[string, () => Promise<RunResult>, string[], boolean]>([
    ['list', () => v.list(), ['list'], true],
    ['domblklistDetails', () => v.domblklistDetails('vm'), ['domblklist', 'vm', '--details'], true],
    ['domblklist', () => v.domblklist('vm'), ['domblklist', 'vm'], true],
    ['dumpxml', () => v.dumpxml('vm'), ['dumpxml', 'vm'], true],
    ['dominfo', () => v.dominfo('vm'), ['dominfo', 'vm'], true],
    ['domiflist', () => v.domiflist('vm'), ['domiflist', 'vm'], true],
    ['domstate', () => v.domstate('vm'), ['domstate', 'vm'], false],
    ['resume', () => v.resume('vm'), ['resume', 'vm'], false],
    ['checkpointList', () => v.checkpointList('vm'), ['checkpoint-list', 'vm', '--name'], true],
    ['checkpointCreate', () => v.checkpointCreate('vm', '/x/c.xml', false), ['checkpoint-create', 'vm', '--xmlfile', '/x/c.xml'], true],
    ['checkpointCreate --redefine', () => v.checkpointCreate('vm', '/x/c.xml', true), ['checkpoint-create', 'vm', '--xmlfile', '/x/c.xml', '--redefine'], true],
    ['checkpointDelete', () => v.checkpointDelete('vm', 'b-1'), ['checkpoint-delete', 'vm', 'b-1'], false],
    ['queryBlock', () => v.queryBlock('vm'), ['qemu-monitor-command', 'vm', '{"execute":"query-block"}'], true],
    ['backupBegin', () => v.backupBegin('vm', '/x/b.xml', null), ['backup-begin', '--domain', 'vm', '--backupxml', '/x/b.xml'], true],
    ['backupBegin + checkpoint', () => v.backupBegin('vm', '/x/b.xml', '/x/c.xml'), ['backup-begin', '--domain', 'vm', '--backupxml', '/x/b.xml', '--checkpointxml', '/x/c.xml'], true],
    ['jobInfoCompleted', () => v.jobInfoCompleted('vm'), ['domjobinfo', 'vm', '--completed'], false],
    ['jobInfoCompleted keep', () => v.jobInfoCompleted('vm', { keep: true }), ['domjobinfo', 'vm', '--completed', '--keep-completed'], false],
    ['jobInfoCompleted keep+anystats', () => v.jobInfoCompleted('vm', { keep: true, anystats: true }), ['domjobinfo', 'vm', '--completed', '--keep-completed', '--anystats'], false],
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

  it('guest-agent commands carry --timeout and a deadline 10 s beyond it', async () => {
    await v.agentCommand('vm', '{"execute":"guest-fsfreeze-freeze"}', 30);
    expect(last().args).toEqual(['-c', URI, 'qemu-agent-command', 'vm', '--timeout', '30', '{"execute":"guest-fsfreeze-freeze"}']);
    expect(last().opts).toMatchObject({ timeoutMs: 40_000 });
    expect(last().opts.abortable).toBeUndefined();
    await v.agentCommand('vm', '{"execute":"guest-fsfreeze-thaw"}', 30, false);
    expect(last().opts.abortable).toBe(false);
  });
});
