// Builds the extra fixtures (this folder's *.json) in the recorded shape
// (schema nasbackup-golden/1), for kinds of scenario the recordings lack. The original
// script cannot run here, so each scenario's "original" side is written from the
// contract's description of the original's behaviour, modelled on the nearest recorded
// fixture (see README.md). What can be computed is computed: tree snapshots come from
// the same seeding and snapshot code the replay uses, after applying the original's
// effect on the files for real (rm -rf, qemu-img convert); virsh answers come from the
// simulated host's own formats (fakes/synth.ts, checked against the recordings).
//
// Run (root, under the golden lock, like the suite):
//   flock /tmp/nasbackup-golden.lock npx vite-node test/golden/extra-fixtures/build.ts
import { execFile } from 'node:child_process';
import { chmodSync, lstatSync, mkdirSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import {
  NAS,
  PRIMARY,
  resolvePaths,
  type Annotation,
  type Effect,
  type Fixture,
  type Host,
  type HostDomain,
  type NasStep,
  type RecordedCall,
  type TextBlock,
  type Write,
} from '../fixture.js';
import { normText } from '../normalize.js';
import { acquireSuiteLock, REAL, releaseSuiteLock, resetSandbox, seed } from '../sandbox.js';
import { snapshotTree } from '../snapshot.js';
import * as synth from '../fakes/synth.js';

const run = promisify(execFile);
const HERE = fileURLToPath(new URL('.', import.meta.url));

// ------------------------------------------------------------------ shared pieces

const RECORDED_WITH = {
  scriptSha256: 'bf9dd2eecb9bf6e3014963d6130ef22193cefc7de19d7e69f214c6170c294f9b',
  qemuImg: 'qemu-img version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)',
  bash: 'GNU bash, version 5.2.15(1)-release (x86_64-pc-linux-gnu)',
  coreutils: 'ls (GNU coreutils) 9.1',
  note: 'not recorded: written by test/golden/extra-fixtures/build.ts from the contract (see README.md there)',
};
const ENVIRONMENT = {
  PATH: '<SHIMS>:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin',
  LC_ALL: 'C.UTF-8',
  HOME: '/root',
  umask: '0022',
  cwd: '<SANDBOX>/cwd',
  stdin: '/dev/null',
  TMPDIR: null,
};
const VERSION = { compiledAgainst: '9.0.0', library: '9.0.0', api: 'QEMU 9.0.0', hypervisor: 'QEMU 7.2.0' };

/** The bystander every recorded scenario has (it shows up in `virsh list`). */
const BYSTANDER: HostDomain = {
  name: 'i-3-12-VM',
  id: 3,
  uuid: '9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d',
  state: 'running',
  vcpus: 2,
  memoryKiB: 2097152,
  disks: [
    {
      type: 'file',
      device: 'disk',
      target: 'vda',
      source: '<PRIMARY>/7f3c9a12-4b5d-3e6f-a1b2-c3d4e5f60718/0d1e2f3a-4b5c-4d6e-8f70-8192a3b4c5d6',
      virtualSize: 8388608,
      seed: false,
    },
  ],
  interfaces: [],
  checkpoints: [],
};

const POOL = '2b8e4f10-9c3d-4a5e-8f6a-7b1c2d3e4f50';
const w = (pattern: string, offset: number, length: number): Write => ({ pattern, offset, length });

function host(domains: HostDomain[], nas: Partial<Host['nas']> = {}): Host {
  return {
    virsh: { version: VERSION },
    domains: [BYSTANDER, ...domains],
    nas: {
      exports: {
        '10.40.1.20:/vol/cs-backup': '<NAS>',
        '//192.168.50.4/cloudbackup': '<NAS>',
        '//10.30.0.7/backups': '<NAS>',
        '10.10.0.5:/export/backup': '<NAS>',
      },
      df: { blocks1k: 104857600, used1k: 52428800 },
      ...nas,
    },
  };
}

/** A backup folder on the NAS: one qcow2 per disk (optionally backed by the same disk's file in `parent`) and the side files. */
function backupSteps(dir: string, disks: Array<{ vol: string; size: number; writes: Write[] }>, parent?: string): NasStep[] {
  const steps: NasStep[] = disks.map((d, i) => {
    const file = `${i === 0 ? 'root' : 'datadisk'}.${d.vol}.qcow2`;
    return {
      op: 'qcow2',
      path: `${dir}/${file}`,
      virtualSize: d.size,
      ...(parent ? { backing: { file: `../${parent.split('/').pop()}/${file}`, format: 'qcow2' } } : {}),
      writes: d.writes,
    };
  });
  for (const f of ['domain-config.xml', 'dominfo.xml', 'domiflist.xml', 'domblklist.xml']) {
    steps.push({ op: 'file', path: `${dir}/${f}`, content: `<!-- ${f} of an earlier backup -->\n` });
  }
  return steps;
}

// ------------------------------------------------------------------ transcript helpers

type Line = string | { text: string; kind: string; [k: string]: unknown };

function block(lines: Line[]): TextBlock {
  const texts = lines.map((l) => (typeof l === 'string' ? l : l.text));
  const annotations: Annotation[] = [];
  lines.forEach((l, i) => {
    if (typeof l === 'string') return;
    const { text, ...rest } = l;
    const count = typeof rest.count === 'number' ? rest.count : 1;
    annotations.push({ line: i + 1, count, ...(count === 1 ? { literal: text } : {}), ...rest });
  });
  return { text: texts.map((t) => `${t}\n`).join(''), lines: texts, endsWithNewline: texts.length > 0, annotations };
}

class Calls {
  readonly list: RecordedCall[] = [];
  constructor(readonly host: Host) {}
  private get h(): Host {
    return this.host;
  }

  add(
    cmd: string,
    argv: string[],
    o: { stdout?: string; stderr?: string; exitCode?: number; effects?: Effect[]; kind?: string } = {},
  ): RecordedCall {
    const c: RecordedCall = {
      seq: this.list.length + 1,
      cmd,
      kind: o.kind ?? (cmd === 'umount' || cmd === 'qemu-img' ? 'passthrough' : 'simulated'),
      argv,
      stdout: o.stdout ?? '',
      stderr: o.stderr ?? '',
      exitCode: o.exitCode ?? 0,
      ...(o.effects ? { effects: o.effects } : {}),
    };
    (c as unknown as Record<string, unknown>).stdin = null;
    this.list.push(c);
    return c;
  }

  /** The original's version check: `virsh version` three times. */
  version(): void {
    for (let i = 0; i < 3; i++) this.add('virsh', ['version'], { stdout: synth.versionText(this.h.virsh.version) });
  }

  private dom(name: string): HostDomain {
    return resolvePaths(this.h).domains.find((d) => d.name === name)!;
  }

  virsh(args: string[], o: { stdout?: string; stderr?: string; exitCode?: number; effects?: Effect[] } = {}): RecordedCall {
    return this.add('virsh', ['-c', 'qemu:///system', ...args], o);
  }

  list_(): void {
    this.virsh(['list'], { stdout: normText(synth.listText(resolvePaths(this.h).domains)) });
  }

  domblklist(vm: string, details: boolean): void {
    this.virsh(['domblklist', vm, ...(details ? ['--details'] : [])], { stdout: normText(synth.domblklistText(this.dom(vm), details)) });
  }

  sideFiles(vm: string): void {
    const d = this.dom(vm);
    this.virsh(['dumpxml', vm], { stdout: normText(synth.dumpxmlText(d)) });
    this.virsh(['dominfo', vm], { stdout: normText(synth.dominfoText(d)) });
    this.virsh(['domiflist', vm], { stdout: normText(synth.domiflistText(d)) });
    this.domblklist(vm, false);
  }

  mount(type: string, source: string, opts: string): void {
    this.add('mount', ['-t', type, source, '<MOUNT_POINT>', ...(opts ? ['-o', opts] : [])], {
      effects: [{ op: 'bind-mount', from: '<NAS>', to: '<MOUNT_POINT>' }],
    });
  }

  umount(): void {
    this.add('umount', ['<MOUNT_POINT>'], { effects: [{ op: 'unmount', target: '<MOUNT_POINT>' }] });
  }

  sync(): void {
    this.add('sync', [], { effects: [{ op: 'noop' }] });
  }
}

const LOG_CHECKS = [
  '<TS> Success... [ QEMU: 7.2.0 Libvirt: 9.0.0 apiVersion: 9.0.0 ]',
  '<TS> Environment Sanity Checks successfully passed',
];
const logMounted = (type: string): string[] => [...LOG_CHECKS, `<TS> Successfully mounted ${type} store`];

const USAGE = [
  '',
  'Usage: <SCRIPT> -o <operation> -v|--vm <domain name> -t <storage type> -s <storage address> -m <mount options> -p <backup path> -d <disks path> -q|--quiesce <true|false>',
  '         [-M|--mode <full|incremental>] [--bitmap-new <name>] [--bitmap-parent <name>] [--parent-paths <p1,p2,...>]',
  '',
  'Incremental backup options (running VMs only; requires QEMU >= 4.2 and libvirt >= 7.2):',
  '  -M|--mode full          Take a full backup AND create a checkpoint (--bitmap-new required) for future incrementals.',
  '  -M|--mode incremental   Take an incremental backup since --bitmap-parent and create new checkpoint --bitmap-new.',
  '                          Requires --bitmap-parent, --bitmap-new, and --parent-paths (comma-separated list, one',
  '                          parent qcow2 path per disk: root.<uuid>.qcow2, datadisk.<uuid>.qcow2, … same order',
  '                          as -d|--disks).',
  '  Without -M, behaves as legacy full-only backup with no checkpoint creation.',
  '',
];

// ------------------------------------------------------------------ scenario definition

interface Scenario {
  name: string;
  group: Fixture['group'];
  description: string;
  argv: string[];
  host: Host;
  nasSteps: NasStep[];
  /** The calls, stdout, … of the original; `after` applies its effect to the sandbox (NAS = the mount). */
  original: (s: { calls: Calls }) => Promise<{
    exitCode: number;
    stdout: Line[];
    stderr?: string[];
    log: string[];
    checkpoints?: Record<string, string[]>;
    /** The original left the NAS mounted (stopped-VM path). */
    leftMounted?: boolean;
  }>;
}

function sizeLines(dir: string): Line[] {
  // `ls -l --numeric-uid-gid <dest> | awk '{print $5}'`: the total line, then each entry in C order.
  const names = readdirSync(dir).sort((a, b) => Buffer.compare(Buffer.from(a), Buffer.from(b)));
  return [
    {
      text: '',
      kind: 'size:ls-total-line',
      rule: 'first line of `ls -l --numeric-uid-gid <dest> | awk \'{print $5}\'`: the "total N" line has no 5th field, so it prints an empty line',
    },
    ...names.map((n) => ({
      text: String(lstatSync(join(dir, n)).size),
      kind: 'size:ls-entry',
      entry: n,
      rule: 'size in bytes (ls -l column 5) of this entry of <dest>, one line per entry in `ls` name order (LC_ALL=C.UTF-8)',
    })),
  ];
}

/** `rm -frv <path>` lines for a tree, each directory after its contents. */
function rmLines(abs: string, shown: string): Line[] {
  const st = lstatSync(abs);
  const rule = '`rm -frv <dest>` output; files appear in readdir order (compare as a set), each directory after its contents';
  if (!st.isDirectory()) return [{ text: `removed '${shown}'`, kind: 'rm-verbose', rule }];
  const out: Line[] = [];
  // fts appends names without doubling a trailing slash; the directory keeps the path as given.
  for (const n of readdirSync(abs)) out.push(...rmLines(join(abs, n), shown.endsWith('/') ? `${shown}${n}` : `${shown}/${n}`));
  out.push({ text: `removed directory '${shown}'`, kind: 'rm-verbose', rule });
  return out;
}

const mpOnNas = (rel: string): string => join(NAS, rel);

/** `du -sb`: st_size of the folder and of everything below it, with its addends. */
function duSb(dir: string): { total: number; components: Array<{ path: string; bytes: number }> } {
  const components = [{ path: '.', bytes: lstatSync(dir).size }];
  for (const n of readdirSync(dir).sort()) components.push({ path: n, bytes: lstatSync(join(dir, n)).size });
  return { total: components.reduce((a, c) => a + c.bytes, 0), components };
}

/** The four side files as the original writes them (virsh's answers, real paths). */
function writeSideFiles(h: Host, vm: string, dir: string): void {
  const d = resolvePaths(h).domains.find((x) => x.name === vm)!;
  writeFileSync(join(dir, 'domain-config.xml'), synth.dumpxmlText(d));
  writeFileSync(join(dir, 'dominfo.xml'), synth.dominfoText(d));
  writeFileSync(join(dir, 'domiflist.xml'), synth.domiflistText(d));
  writeFileSync(join(dir, 'domblklist.xml'), synth.domblklistText(d, false));
}

/** What the simulated push backup writes for one disk (see the create-store effect in the fixtures' README). */
async function pushStore(target: string, live: string, dirty: Write[] | null): Promise<void> {
  if (dirty === null) await run(REAL.qemuImg, ['convert', '-O', 'qcow2', live, target]);
  else {
    await run(REAL.qemuImg, ['create', '-q', '-f', 'qcow2', '-b', live, '-F', 'qcow2', target]);
    if (dirty.length)
      await run(REAL.qemuIo, ['-f', 'qcow2', ...dirty.flatMap((x) => ['-c', `write -P ${x.pattern} ${x.offset} ${x.length}`]), target]);
  }
  chmodSync(target, 0o600);
}

async function build(sc: Scenario): Promise<Fixture> {
  const draft = { host: sc.host, nas: { root: '<NAS>', steps: sc.nasSteps } } as unknown as Fixture;
  await resetSandbox();
  await seed(draft);
  const [nasBefore, primaryBefore] = await Promise.all([snapshotTree(NAS), snapshotTree(PRIMARY)]);
  const calls = new Calls(sc.host);
  const o = await sc.original({ calls });
  const [nasAfter, primaryAfter] = await Promise.all([snapshotTree(NAS), snapshotTree(PRIMARY)]);
  const leftovers = o.leftMounted
    ? {
        mounts: ['<MOUNT_POINT>'],
        tempDirs: ['<MOUNT_POINT>'],
        detail: { '<MOUNT_POINT>': { mounted: true, entries: readdirSync(NAS).sort() } },
      }
    : { mounts: [], tempDirs: [], detail: {} };
  const mountCall = calls.list.find((c) => c.cmd === 'mount');
  const shimMounts =
    o.leftMounted && mountCall
      ? [{ source: mountCall.argv[2]!, target: '<MOUNT_POINT>', type: mountCall.argv[1]!, options: mountCall.argv[5] ?? '' }]
      : [];
  const checkpoints = o.checkpoints ?? Object.fromEntries(sc.host.domains.map((d) => [d.name, d.checkpoints]));
  return {
    schema: 'nasbackup-golden/1',
    name: sc.name,
    group: sc.group,
    description: sc.description,
    recordedWith: RECORDED_WITH,
    argv: sc.argv,
    timeoutSeconds: 60,
    keepCallsOnTimeout: 20,
    environment: ENVIRONMENT,
    host: sc.host,
    nas: { root: '<NAS>', steps: sc.nasSteps },
    nasBefore,
    primaryBefore,
    expect: {
      exitCode: o.exitCode,
      signal: null,
      timedOut: false,
      stdout: block(o.stdout),
      stderr: block(o.stderr ?? []),
      log: block(o.log),
      calls: calls.list,
      callsTruncated: false,
      nasAfter,
      primaryAfter,
      hostAfter: { checkpoints, shimMounts },
      leftovers,
    },
  } as unknown as Fixture;
}

// ------------------------------------------------------------------ the scenarios

const VOL_A = '5d2c8e41-7a9b-4c3d-9e8f-1a2b3c4d5e6f';
const VOL_B = 'a7e3c2d1-0f9b-4e8a-b6c5-d4e3f2a1b0c9';
const VOL_C = 'e1f2a3b4-c5d6-4e7f-8a9b-0c1d2e3f4a5b';
const VOL_D = '3c4d5e6f-7a8b-4c9d-8e0f-1a2b3c4d5e70';

const rootA = { vol: VOL_A, size: 16777216, writes: [w('0x21', 0, 1048576), w('0x22', 6291456, 196608)] };
const vm33 = (state: string, extra: Partial<HostDomain> = {}): HostDomain => ({
  name: 'i-5-33-VM',
  id: state === 'shut off' ? -1 : 11,
  uuid: '61d0e7a2-3b4c-4d5e-9f60-718293a4b5c6',
  state,
  vcpus: 2,
  memoryKiB: 2097152,
  disks: [
    {
      type: 'file',
      device: 'disk',
      target: 'vda',
      source: `<PRIMARY>/${POOL}/${VOL_A}`,
      virtualSize: 16777216,
      writes: rootA.writes,
      dirty: [w('0x23', 3145728, 65536)],
      bitmaps: [],
    },
    { type: 'file', device: 'cdrom', target: 'hdc', source: '-' },
  ],
  interfaces: [{ name: 'vnet4', type: 'bridge', source: 'cloudbr1', model: 'virtio', mac: '02:00:2f:61:00:0b' }],
  checkpoints: [],
  ...extra,
});
const NAS_33 = [
  ...backupSteps('i-5-33-VM/2025.02.01.03.15.00', [rootA]),
  ...backupSteps('i-5-33-VM/2025.02.02.03.15.00', [{ ...rootA, writes: [w('0x23', 3145728, 65536)] }], 'i-5-33-VM/2025.02.01.03.15.00'),
];

/** Incremental with a parent path for the root disk only; `inferable`: the data disks' parents are in the same folder. */
function fewerParents(name: string, inferable: boolean): Scenario {
  return {
    name,
    group: 'backup-running',
    description: inferable
      ? 'Incremental of a running VM with three disks but --parent-paths naming only the root disk\'s parent (the data disks\' parents are in the same folder): after the job, root is relinked, then "PARENT_PATHS list shorter than DISK_PATHS" for disk index 1, files removed, exit 1; the new checkpoint stays.'
      : "As with the data disks' parents present, but the parents' folder holds only the root disk's file: the same failure after the job, exit 1; the new checkpoint stays.",
    argv: [
      '-o',
      'backup',
      '-v',
      'i-7-41-VM',
      '-t',
      'nfs',
      '-s',
      '10.40.1.20:/vol/cs-backup',
      '-m',
      '',
      '-p',
      'i-7-41-VM/2025.02.02.03.15.00',
      '-q',
      'false',
      '-d',
      '',
      '-M',
      'incremental',
      '--bitmap-new',
      'backup-1738466100',
      '--bitmap-parent',
      'backup-1738379700',
      '--parent-paths',
      `i-7-41-VM/2025.02.01.03.15.00/root.${VOL_A}.qcow2`,
    ],
    host: host([
      {
        name: 'i-7-41-VM',
        id: 23,
        uuid: 'c3d4e5f6-a7b8-4c9d-8e0f-a1b2c3d4e5f6',
        state: 'running',
        vcpus: 4,
        memoryKiB: 4194304,
        disks: [
          {
            type: 'file',
            device: 'disk',
            target: 'vda',
            source: `<PRIMARY>/${POOL}/${VOL_A}`,
            virtualSize: 16777216,
            writes: rootA.writes,
            dirty: [w('0x24', 9437184, 131072)],
            bitmaps: ['backup-1738379700'],
          },
          {
            type: 'file',
            device: 'disk',
            target: 'vdb',
            source: `<PRIMARY>/${POOL}/${VOL_B}`,
            virtualSize: 8388608,
            writes: [w('0x41', 0, 524288)],
            dirty: [w('0x42', 1048576, 65536)],
            bitmaps: ['backup-1738379700'],
          },
          {
            type: 'file',
            device: 'disk',
            target: 'vdc',
            source: `<PRIMARY>/${POOL}/${VOL_C}`,
            virtualSize: 8388608,
            writes: [w('0x51', 2097152, 131072)],
            dirty: [w('0x52', 0, 65536)],
            bitmaps: ['backup-1738379700'],
          },
          { type: 'file', device: 'cdrom', target: 'hdc', source: '-' },
        ],
        interfaces: [{ name: 'vnet9', type: 'bridge', source: 'cloudbr0', model: 'virtio', mac: '02:00:7a:41:00:17' }],
        checkpoints: ['backup-1738379700'],
      },
    ]),
    nasSteps: backupSteps(
      'i-7-41-VM/2025.02.01.03.15.00',
      inferable
        ? [
            rootA,
            { vol: VOL_B, size: 8388608, writes: [w('0x41', 0, 524288)] },
            { vol: VOL_C, size: 8388608, writes: [w('0x51', 2097152, 131072)] },
          ]
        : [rootA],
    ),
    original: async ({ calls }) => {
      const vm = 'i-7-41-VM';
      const dest = '<MOUNT_POINT>/i-7-41-VM/2025.02.02.03.15.00';
      calls.version();
      calls.list_();
      calls.mount('nfs', '10.40.1.20:/vol/cs-backup', '');
      calls.virsh(['checkpoint-list', vm, '--name'], { stdout: 'backup-1738379700\n\n' });
      calls.domblklist(vm, true);
      const disks = [
        { t: 'vda', vol: VOL_A, file: `root.${VOL_A}.qcow2`, dirty: [w('0x24', 9437184, 131072)] },
        { t: 'vdb', vol: VOL_B, file: `datadisk.${VOL_B}.qcow2`, dirty: [w('0x42', 1048576, 65536)] },
        { t: 'vdc', vol: VOL_C, file: `datadisk.${VOL_C}.qcow2`, dirty: [w('0x52', 0, 65536)] },
      ];
      calls.virsh(['backup-begin', '--domain', vm, '--backupxml', `${dest}/backup.xml`, '--checkpointxml', `${dest}/checkpoint.xml`], {
        stdout: 'Backup started\n\n',
        effects: [
          ...disks.map((d) => ({
            op: 'create-store',
            mode: 'incremental',
            disk: d.t,
            target: `${dest}/${d.file}`,
            backing: `<PRIMARY>/${POOL}/${d.vol}`,
            backingFormat: 'qcow2',
            dirty: d.dirty,
            fileMode: '0600',
            how: 'qemu-img create -f qcow2 -b <backing> -F qcow2 <target>; qemu-io -c "write -P <pattern> <offset> <length>" <target> for each dirty range',
          })),
          { op: 'register-checkpoint', domain: vm, name: 'backup-1738466100', disks: ['vda', 'vdb', 'vdc'] },
        ],
      });
      calls.sideFiles(vm);
      const total = disks.reduce((n, d) => n + synth.dirtyBytes(d.dirty), 0);
      calls.virsh(['domjobinfo', vm, '--completed', '--keep-completed'], {
        stdout: synth.jobInfoText('Completed', { elapsedMs: 171, totalBytes: total, processedBytes: total }),
      });
      calls.domblklist(vm, true);
      calls.add('qemu-img', [
        'rebase',
        '-u',
        '-b',
        `../2025.02.01.03.15.00/root.${VOL_A}.qcow2`,
        '-F',
        'qcow2',
        `${dest}/root.${VOL_A}.qcow2`,
      ]);
      calls.umount();
      return {
        exitCode: 1,
        stdout: ['PARENT_PATHS list shorter than DISK_PATHS — missing parent for disk index 1'],
        log: logMounted('nfs'),
        checkpoints: { 'i-3-12-VM': [], [vm]: ['backup-1738379700', 'backup-1738466100'] },
      };
    },
  };
}

/** The job block the script passes through: one `from-call` annotation over its lines. */
function jobLines(text: string, seq: number): Line[] {
  const lines = text.split('\n');
  lines.pop();
  return lines.map((l, i) =>
    i === 0
      ? {
          text: l,
          kind: 'from-call',
          seq,
          cmd: 'virsh',
          stream: 'stdout',
          count: lines.length,
          rule: `these lines are the verbatim stdout of call #${seq} (virsh), passed through by the script`,
        }
      : l,
  );
}

/**
 * `swapped`: an incremental of a two-disk VM whose --parent-paths come in the other
 * order than domblklist's (the management server sorts by deviceId): the original pairs
 * them by position and relinks each disk onto the other disk's parent, exit 0.
 * `extra`: the VM has only the first disk, yet two parent paths are given (a detached
 * volume's too): the original ignores the extra one, exit 0.
 */
function runningTwoDisks(name: string, variant: 'swapped' | 'extra'): Scenario {
  const vm = 'i-12-88-VM';
  const parentDir = 'i-12-88-VM/2025.02.05.01.30.00';
  const rel = 'i-12-88-VM/2025.02.06.01.30.00';
  const dest = `<MOUNT_POINT>/${rel}`;
  const all = [
    {
      t: 'vda',
      vol: VOL_C,
      file: `root.${VOL_C}.qcow2`,
      size: 16777216,
      writes: [w('0x61', 0, 1048576)],
      dirty: [w('0x62', 8388608, 131072)],
    },
    {
      t: 'vdb',
      vol: VOL_B,
      file: `datadisk.${VOL_B}.qcow2`,
      size: 8388608,
      writes: [w('0x71', 1048576, 262144)],
      dirty: [w('0x72', 0, 65536), w('0x73', 4194304, 65536)],
    },
  ];
  const disks = variant === 'extra' ? all.slice(0, 1) : all;
  const parents = variant === 'extra' ? [all[0]!.file, all[1]!.file] : [all[1]!.file, all[0]!.file];
  const h = host([
    {
      name: vm,
      id: 44,
      uuid: '7e6d5c4b-3a29-4180-9f7e-6d5c4b3a2918',
      state: 'running',
      vcpus: 2,
      memoryKiB: 2097152,
      disks: [
        ...disks.map((d) => ({
          type: 'file',
          device: 'disk',
          target: d.t,
          source: `<PRIMARY>/${POOL}/${d.vol}`,
          virtualSize: d.size,
          writes: d.writes,
          dirty: d.dirty,
          bitmaps: ['backup-1738719000'],
        })),
        { type: 'file', device: 'cdrom', target: 'hdc', source: '-' },
      ],
      interfaces: [{ name: 'vnet7', type: 'bridge', source: 'cloudbr0', model: 'virtio', mac: '02:00:7e:6d:00:2c' }],
      checkpoints: ['backup-1738719000'],
    },
  ]);
  return {
    name,
    group: 'backup-running',
    description:
      variant === 'swapped'
        ? "Incremental of a two-disk VM with --parent-paths in deviceId order, the data disk first: the script pairs parents by position, so root is relinked onto the data disk's parent and the data disk onto root's; exit 0 with broken chains."
        : 'Incremental of a one-disk VM with two parent paths (the second for a volume the VM no longer has): the script pairs by position and ignores the extra one, exit 0.',
    argv: [
      '-o',
      'backup',
      '-v',
      vm,
      '-t',
      'nfs',
      '-s',
      '10.40.1.20:/vol/cs-backup',
      '-m',
      '',
      '-p',
      rel,
      '-q',
      'false',
      '-d',
      '',
      '-M',
      'incremental',
      '--bitmap-new',
      'backup-1738805400',
      '--bitmap-parent',
      'backup-1738719000',
      '--parent-paths',
      parents.map((f) => `${parentDir}/${f}`).join(','),
    ],
    host: h,
    nasSteps: backupSteps(
      parentDir,
      all.map((d) => ({ vol: d.vol, size: d.size, writes: d.writes })),
    ),
    original: async ({ calls }) => {
      calls.version();
      calls.list_();
      calls.mount('nfs', '10.40.1.20:/vol/cs-backup', '');
      calls.virsh(['checkpoint-list', vm, '--name'], { stdout: 'backup-1738719000\n\n' });
      calls.domblklist(vm, true);
      calls.virsh(['backup-begin', '--domain', vm, '--backupxml', `${dest}/backup.xml`, '--checkpointxml', `${dest}/checkpoint.xml`], {
        stdout: 'Backup started\n\n',
        effects: [
          ...disks.map((d) => ({
            op: 'create-store',
            mode: 'incremental',
            disk: d.t,
            target: `${dest}/${d.file}`,
            backing: `<PRIMARY>/${POOL}/${d.vol}`,
            backingFormat: 'qcow2',
            dirty: d.dirty,
            fileMode: '0600',
            how: 'qemu-img create -f qcow2 -b <backing> -F qcow2 <target>; qemu-io -c "write -P <pattern> <offset> <length>" <target> for each dirty range',
          })),
          { op: 'register-checkpoint', domain: vm, name: 'backup-1738805400', disks: disks.map((d) => d.t) },
        ],
      });
      mkdirSync(mpOnNas(rel), { recursive: true });
      for (const d of disks) await pushStore(mpOnNas(`${rel}/${d.file}`), `${PRIMARY}/${POOL}/${d.vol}`, d.dirty);
      calls.sideFiles(vm);
      writeSideFiles(calls.host, vm, mpOnNas(rel));
      const total = disks.reduce((n, d) => n + synth.dirtyBytes(d.dirty), 0);
      const job = synth.jobInfoText('Completed', { elapsedMs: 212, totalBytes: total, processedBytes: total });
      const poll = calls.virsh(['domjobinfo', vm, '--completed', '--keep-completed'], { stdout: job });
      calls.domblklist(vm, true);
      // By position: disk i gets parent i.
      for (const [i, d] of disks.entries()) {
        const backing = `../2025.02.05.01.30.00/${parents[i]}`;
        await run(REAL.qemuImg, ['rebase', '-u', '-b', backing, '-F', 'qcow2', mpOnNas(`${rel}/${d.file}`)]);
        calls.add('qemu-img', ['rebase', '-u', '-b', backing, '-F', 'qcow2', `${dest}/${d.file}`]);
      }
      calls.sync();
      calls.virsh(['domjobinfo', vm, '--completed'], { stdout: job });
      calls.umount();
      const du = duSb(mpOnNas(rel));
      return {
        exitCode: 0,
        stdout: [
          ...jobLines(job, poll.seq),
          {
            text: String(du.total),
            kind: 'size:du-sb',
            of: dest,
            components: du.components,
            rule: '`du -sb <dest> | cut -f1`: apparent size in bytes of <dest> and everything below it (sum of st_size of the directory itself and of each entry)',
          },
          'BITMAP_CREATED=backup-1738805400',
        ],
        log: logMounted('nfs'),
        checkpoints: { 'i-3-12-VM': [], [vm]: ['backup-1738719000', 'backup-1738805400'] },
      };
    },
  };
}

const scenarios: Scenario[] = [
  {
    name: 'backup-stopped-incremental-no-parents',
    group: 'backup-stopped',
    description:
      'Stopped VM with three disks, -M incremental with --bitmap-new only (no parent arguments), on cifs with options: the stopped path ignores the parents: INCREMENTAL_FALLBACK line, a full copy and a bitmap per disk, BITMAP_CREATED, then the ls sizes; exit 0, NAS left mounted.',
    argv: [
      '-o',
      'backup',
      '-v',
      'i-7-41-VM',
      '-t',
      'cifs',
      '-s',
      '//10.30.0.7/backups',
      '-m',
      'vers=3.1.1',
      '-p',
      'i-7-41-VM/2025.02.07.22.45.00',
      '-q',
      'true',
      '-d',
      [VOL_A, VOL_B, VOL_C].map((v) => `<PRIMARY>/${POOL}/${v}`).join(','),
      '-M',
      'incremental',
      '--bitmap-new',
      'backup-1738968300',
    ],
    host: host([
      {
        name: 'i-7-41-VM',
        id: -1,
        uuid: 'c3d4e5f6-a7b8-4c9d-8e0f-a1b2c3d4e5f6',
        state: 'shut off',
        vcpus: 4,
        memoryKiB: 4194304,
        disks: [
          {
            type: 'file',
            device: 'disk',
            target: 'vda',
            source: `<PRIMARY>/${POOL}/${VOL_A}`,
            virtualSize: 16777216,
            writes: rootA.writes,
            bitmaps: [],
          },
          {
            type: 'file',
            device: 'disk',
            target: 'vdb',
            source: `<PRIMARY>/${POOL}/${VOL_B}`,
            virtualSize: 8388608,
            writes: [w('0x41', 0, 524288)],
            bitmaps: [],
          },
          {
            type: 'file',
            device: 'disk',
            target: 'vdc',
            source: `<PRIMARY>/${POOL}/${VOL_C}`,
            virtualSize: 8388608,
            writes: [w('0x51', 2097152, 131072)],
            bitmaps: [],
          },
          { type: 'file', device: 'cdrom', target: 'hdc', source: '-' },
        ],
        interfaces: [{ name: 'vnet9', type: 'bridge', source: 'cloudbr0', model: 'virtio', mac: '02:00:7a:41:00:17' }],
        checkpoints: [],
      },
    ]),
    nasSteps: [],
    original: async ({ calls }) => {
      const rel = 'i-7-41-VM/2025.02.07.22.45.00';
      calls.version();
      calls.list_();
      calls.mount('cifs', '//10.30.0.7/backups', 'vers=3.1.1,nobrl');
      mkdirSync(mpOnNas(rel), { recursive: true });
      for (const [i, v] of [VOL_A, VOL_B, VOL_C].entries()) {
        const file = `${i === 0 ? 'root' : 'datadisk'}.${v}.qcow2`;
        await run(REAL.qemuImg, ['convert', '-O', 'qcow2', `${PRIMARY}/${POOL}/${v}`, mpOnNas(`${rel}/${file}`)]);
        calls.add('qemu-img', ['convert', '-O', 'qcow2', `<PRIMARY>/${POOL}/${v}`, `<MOUNT_POINT>/${rel}/${file}`]);
        await run(REAL.qemuImg, ['bitmap', '--add', `${PRIMARY}/${POOL}/${v}`, 'backup-1738968300']);
        calls.add('qemu-img', ['bitmap', '--add', `<PRIMARY>/${POOL}/${v}`, 'backup-1738968300']);
      }
      calls.sync();
      return {
        exitCode: 0,
        stdout: [
          'INCREMENTAL_FALLBACK=full (VM stopped — incremental requires running VM)',
          'BITMAP_CREATED=backup-1738968300',
          ...sizeLines(mpOnNas(rel)),
        ],
        log: [],
        leftMounted: true,
      };
    },
  },
  {
    name: 'backup-running-incremental-parent-path-singular',
    group: 'backup-running',
    description:
      'The rebase-era agent\'s incremental argv with "--parent-path" (singular, root only): the recorded script does not know it: "Invalid option: --parent-path" and the usage, exit 1, no call.',
    argv: [
      '-o',
      'backup',
      '-v',
      'i-5-33-VM',
      '-t',
      'nfs',
      '-s',
      '10.40.1.20:/vol/cs-backup',
      '-m',
      'vers=4.2',
      '-p',
      'i-5-33-VM/2025.02.03.03.15.00',
      '-q',
      'false',
      '-d',
      '',
      '-M',
      'incremental',
      '--bitmap-new',
      'backup-1738552500',
      '--bitmap-parent',
      'backup-1738466100',
      '--parent-path',
      `i-5-33-VM/2025.02.02.03.15.00/root.${VOL_A}.qcow2`,
    ],
    host: host([vm33('running', { checkpoints: ['backup-1738466100'] })]),
    nasSteps: NAS_33,
    original: async () => ({ exitCode: 1, stdout: ['Invalid option: --parent-path', ...USAGE], log: [] }),
  },
  {
    name: 'backup-stopped-unknown-mode',
    group: 'backup-stopped',
    description:
      'Stopped VM with an unknown -M (differential): the stopped path ignores the mode, copies the disk and prints the ls sizes, exit 0, NAS left mounted.',
    argv: [
      '-o',
      'backup',
      '-v',
      'i-9-77-VM',
      '-t',
      'nfs',
      '-s',
      '10.40.1.20:/vol/cs-backup',
      '-m',
      '',
      '-p',
      'i-9-77-VM/2025.02.08.04.00.00',
      '-q',
      'false',
      '-d',
      `<PRIMARY>/${POOL}/${VOL_D}`,
      '-M',
      'differential',
    ],
    host: host([
      {
        name: 'i-9-77-VM',
        id: -1,
        uuid: '0f1e2d3c-4b5a-4697-8877-665544332211',
        state: 'shut off',
        vcpus: 1,
        memoryKiB: 1048576,
        disks: [
          {
            type: 'file',
            device: 'disk',
            target: 'vda',
            source: `<PRIMARY>/${POOL}/${VOL_D}`,
            virtualSize: 8388608,
            writes: [w('0x34', 1048576, 196608)],
            bitmaps: [],
          },
        ],
        interfaces: [],
        checkpoints: [],
      },
    ]),
    nasSteps: [],
    original: async ({ calls }) => {
      const rel = 'i-9-77-VM/2025.02.08.04.00.00';
      calls.version();
      calls.list_();
      calls.mount('nfs', '10.40.1.20:/vol/cs-backup', '');
      mkdirSync(mpOnNas(rel), { recursive: true });
      await run(REAL.qemuImg, ['convert', '-O', 'qcow2', `${PRIMARY}/${POOL}/${VOL_D}`, mpOnNas(`${rel}/root.${VOL_D}.qcow2`)]);
      calls.add('qemu-img', ['convert', '-O', 'qcow2', `<PRIMARY>/${POOL}/${VOL_D}`, `<MOUNT_POINT>/${rel}/root.${VOL_D}.qcow2`]);
      calls.sync();
      return { exitCode: 0, stdout: sizeLines(mpOnNas(rel)), log: [], leftMounted: true };
    },
  },
  {
    name: 'general-help-before-invalid-option',
    group: 'general',
    description: '-h before an unknown option: the argv loop reaches -h first and prints the usage, exit 1, no call.',
    argv: ['-o', 'stats', '-h', '--bogus'],
    host: host([vm33('running')]),
    nasSteps: [],
    original: async () => ({ exitCode: 1, stdout: USAGE, log: [] }),
  },
  runningTwoDisks('backup-running-data-disk-order', 'swapped'),
  runningTwoDisks('backup-running-incremental-extra-parent', 'extra'),
  {
    name: 'backup-running-disk-paths-given',
    group: 'backup-running',
    description:
      'A running VM whose -d lists its disk (the agent thought it stopped): the script follows virsh list and prints the running-VM output (job statistics, du -sb total, BITMAP_CREATED), exit 0.',
    argv: [
      '-o',
      'backup',
      '-v',
      'i-9-77-VM',
      '-t',
      'nfs',
      '-s',
      '10.10.0.5:/export/backup',
      '-m',
      'vers=4.1',
      '-p',
      'i-9-77-VM/2025.02.04.04.00.00',
      '-q',
      'false',
      '-d',
      `<PRIMARY>/${POOL}/${VOL_D}`,
      '-M',
      'full',
      '--bitmap-new',
      'backup-1738641600',
    ],
    host: host([
      {
        name: 'i-9-77-VM',
        id: 31,
        uuid: '0f1e2d3c-4b5a-4697-8877-665544332211',
        state: 'running',
        vcpus: 1,
        memoryKiB: 1048576,
        disks: [
          {
            type: 'file',
            device: 'disk',
            target: 'vda',
            source: `<PRIMARY>/${POOL}/${VOL_D}`,
            virtualSize: 8388608,
            writes: [w('0x31', 0, 262144), w('0x33', 5242880, 131072)],
            bitmaps: [],
          },
          { type: 'file', device: 'cdrom', target: 'hdc', source: '-' },
        ],
        interfaces: [{ name: 'vnet2', type: 'bridge', source: 'cloudbr0', model: 'e1000', mac: '02:00:0f:1e:00:1f' }],
        checkpoints: [],
      },
    ]),
    nasSteps: [],
    original: async ({ calls }) => {
      const vm = 'i-9-77-VM';
      const rel = 'i-9-77-VM/2025.02.04.04.00.00';
      const dest = `<MOUNT_POINT>/${rel}`;
      calls.version();
      calls.list_();
      calls.mount('nfs', '10.10.0.5:/export/backup', 'vers=4.1');
      calls.domblklist(vm, true);
      calls.virsh(['backup-begin', '--domain', vm, '--backupxml', `${dest}/backup.xml`, '--checkpointxml', `${dest}/checkpoint.xml`], {
        stdout: 'Backup started\n\n',
        effects: [
          {
            op: 'create-store',
            mode: 'full',
            disk: 'vda',
            target: `${dest}/root.${VOL_D}.qcow2`,
            source: `<PRIMARY>/${POOL}/${VOL_D}`,
            fileMode: '0600',
            how: 'qemu-img convert -O qcow2 <source> <target>',
          },
          { op: 'register-checkpoint', domain: vm, name: 'backup-1738641600', disks: ['vda'] },
        ],
      });
      mkdirSync(mpOnNas(rel), { recursive: true });
      await pushStore(mpOnNas(`${rel}/root.${VOL_D}.qcow2`), `${PRIMARY}/${POOL}/${VOL_D}`, null);
      calls.sideFiles(vm);
      writeSideFiles(calls.host, vm, mpOnNas(rel));
      const job = synth.jobInfoText('Completed', { elapsedMs: 97, totalBytes: 8388608, processedBytes: 8388608 });
      const poll = calls.virsh(['domjobinfo', vm, '--completed', '--keep-completed'], { stdout: job });
      calls.domblklist(vm, true);
      calls.sync();
      calls.virsh(['domjobinfo', vm, '--completed'], { stdout: job });
      calls.umount();
      const du = duSb(mpOnNas(rel));
      return {
        exitCode: 0,
        stdout: [
          ...jobLines(job, poll.seq),
          {
            text: String(du.total),
            kind: 'size:du-sb',
            of: dest,
            components: du.components,
            rule: '`du -sb <dest> | cut -f1`: apparent size in bytes of <dest> and everything below it (sum of st_size of the directory itself and of each entry)',
          },
          'BITMAP_CREATED=backup-1738641600',
        ],
        log: logMounted('nfs'),
        checkpoints: { 'i-3-12-VM': [], [vm]: ['backup-1738641600'] },
      };
    },
  },
  {
    name: 'general-missing-option-value',
    group: 'general',
    description: 'A value flag as the last argument (-p without its value): `shift` fails under set -e, exit 1 with no output and no call.',
    argv: ['-o', 'delete', '-t', 'nfs', '-s', '10.40.1.20:/vol/cs-backup', '-m', 'vers=4.2', '-p'],
    host: host([vm33('running')]),
    nasSteps: NAS_33,
    original: async () => ({ exitCode: 1, stdout: [], log: [] }),
  },
  {
    name: 'general-later-flag-compress',
    group: 'general',
    description:
      'A later upstream flag (-c, compression) is unknown to the recorded script: "Invalid option: -c" and the usage, exit 1, no call.',
    argv: [
      '-o',
      'backup',
      '-v',
      'i-5-33-VM',
      '-t',
      'nfs',
      '-s',
      '10.40.1.20:/vol/cs-backup',
      '-m',
      '',
      '-p',
      'i-5-33-VM/2025.02.03.03.15.00',
      '-q',
      'false',
      '-d',
      '',
      '-c',
    ],
    host: host([vm33('running')]),
    nasSteps: NAS_33,
    original: async () => ({ exitCode: 1, stdout: ['Invalid option: -c', ...USAGE], log: [] }),
  },
  {
    name: 'stats-later-flag-mount-timeout',
    group: 'stats',
    description:
      'stats with a fork\'s -w <mount timeout> (and cifs credentials in -m): the recorded script does not know -w: "Invalid option: -w" and the usage, exit 1, no call.',
    argv: ['-o', 'stats', '-t', 'cifs', '-s', '//10.30.0.7/backups', '-m', 'username=svc-backup,password=Sup3rS3cret,vers=3.0', '-w', '45'],
    host: host([vm33('running')]),
    nasSteps: NAS_33,
    original: async () => ({ exitCode: 1, stdout: ['Invalid option: -w', ...USAGE], log: [] }),
  },
  {
    name: 'general-no-operation',
    group: 'general',
    description: 'No -o at all: the sanity checks run, then no operation matches: exit 0, empty stdout.',
    argv: ['-t', 'nfs', '-s', '10.40.1.20:/vol/cs-backup', '-m', ''],
    host: host([vm33('running')]),
    nasSteps: NAS_33,
    original: async ({ calls }) => {
      calls.version();
      return { exitCode: 0, stdout: [], log: LOG_CHECKS };
    },
  },
  {
    name: 'stats-cifs-empty-options',
    group: 'stats',
    description:
      'stats on cifs with an empty -m: the script mounts with "-o ,nobrl", then prints the mount point and "<1K-blocks> <used>".',
    argv: ['-o', 'stats', '-t', 'cifs', '-s', '//192.168.50.4/cloudbackup', '-m', ''],
    host: host([vm33('running')], { df: { blocks1k: 2147483648, used1k: 987654321 } }),
    nasSteps: NAS_33,
    original: async ({ calls }) => {
      calls.version();
      calls.mount('cifs', '//192.168.50.4/cloudbackup', ',nobrl');
      const df = calls.add('df', ['-P', '<MOUNT_POINT>'], {
        stdout:
          'Filesystem                   1024-blocks      Used  Available Capacity Mounted on\n//192.168.50.4/cloudbackup    2147483648 987654321 1159829327      46% <MOUNT_POINT>\n',
      });
      calls.umount();
      return {
        exitCode: 0,
        stdout: [
          { text: '<MOUNT_POINT>', kind: 'mount-point', rule: 'the mktemp -d -t csbackup.XXXXX mount point' },
          {
            text: '2147483648 987654321',
            kind: 'size:df-blocks-used',
            fromCall: df.seq,
            rule: 'fields 2 and 3 (1024-blocks, Used) of row 2 of `df -P <MOUNT_POINT>`, joined by one space',
          },
        ],
        log: logMounted('cifs'),
      };
    },
  },
  {
    name: 'delete-instance-folder',
    group: 'delete',
    description: 'delete -p <instance> (one level, no timestamp): rm -frv removes every backup of the VM, exit 0.',
    argv: ['-o', 'delete', '-t', 'nfs', '-s', '10.40.1.20:/vol/cs-backup', '-m', 'vers=4.2', '-p', 'i-5-33-VM'],
    host: host([vm33('running')]),
    nasSteps: [...NAS_33, ...backupSteps('i-9-77-VM/2025.02.01.04.00.00', [{ vol: VOL_D, size: 8388608, writes: [w('0x31', 0, 262144)] }])],
    original: async ({ calls }) => {
      calls.version();
      calls.mount('nfs', '10.40.1.20:/vol/cs-backup', 'vers=4.2');
      const lines = rmLines(mpOnNas('i-5-33-VM'), '<MOUNT_POINT>/i-5-33-VM');
      rmSync(mpOnNas('i-5-33-VM'), { recursive: true });
      calls.sync();
      calls.umount();
      return { exitCode: 0, stdout: lines, log: logMounted('nfs') };
    },
  },
  {
    name: 'delete-trailing-slash-cifs',
    group: 'delete',
    description:
      'delete on cifs with "nobrl" already in -m (mounted with "-o vers=3.0,nobrl,nobrl") and -p ending in "/": rm -frv echoes the path as given, the directory line keeps the trailing slash, exit 0.',
    argv: ['-o', 'delete', '-t', 'cifs', '-s', '//10.30.0.7/backups', '-m', 'vers=3.0,nobrl', '-p', 'i-5-33-VM/2025.02.02.03.15.00/'],
    host: host([vm33('running')]),
    nasSteps: NAS_33,
    original: async ({ calls }) => {
      calls.version();
      calls.mount('cifs', '//10.30.0.7/backups', 'vers=3.0,nobrl,nobrl');
      const lines = rmLines(mpOnNas('i-5-33-VM/2025.02.02.03.15.00'), '<MOUNT_POINT>/i-5-33-VM/2025.02.02.03.15.00/');
      rmSync(mpOnNas('i-5-33-VM/2025.02.02.03.15.00'), { recursive: true });
      calls.sync();
      calls.umount();
      return { exitCode: 0, stdout: lines, log: logMounted('cifs') };
    },
  },
  {
    name: 'delete-single-disk-file',
    group: 'delete',
    description: 'delete -p naming one disk file inside a backup (three levels): rm -frv removes that file only, exit 0.',
    argv: [
      '-o',
      'delete',
      '-t',
      'nfs',
      '-s',
      '10.40.1.20:/vol/cs-backup',
      '-m',
      '',
      '-p',
      `i-5-33-VM/2025.02.02.03.15.00/root.${VOL_A}.qcow2`,
    ],
    host: host([vm33('running')]),
    nasSteps: NAS_33,
    original: async ({ calls }) => {
      calls.version();
      calls.mount('nfs', '10.40.1.20:/vol/cs-backup', '');
      const rel = `i-5-33-VM/2025.02.02.03.15.00/root.${VOL_A}.qcow2`;
      const lines = rmLines(mpOnNas(rel), `<MOUNT_POINT>/${rel}`);
      rmSync(mpOnNas(rel));
      calls.sync();
      calls.umount();
      return { exitCode: 0, stdout: lines, log: logMounted('nfs') };
    },
  },
  {
    name: 'backup-running-existing-dir',
    group: 'backup-running',
    description:
      'Full backup of a running VM into a -p that already holds a backup: backup-begin refuses (output discarded), cleanup() deletes the pre-existing backup, exit 1 with empty stdout.',
    argv: [
      '-o',
      'backup',
      '-v',
      'i-5-33-VM',
      '-t',
      'nfs',
      '-s',
      '10.40.1.20:/vol/cs-backup',
      '-m',
      'vers=4.2',
      '-p',
      'i-5-33-VM/2025.02.02.03.15.00',
      '-q',
      'false',
      '-d',
      '',
      '-M',
      'full',
      '--bitmap-new',
      'backup-1738466100',
    ],
    host: host([vm33('running')]),
    nasSteps: NAS_33,
    original: async ({ calls }) => {
      calls.version();
      calls.list_();
      calls.mount('nfs', '10.40.1.20:/vol/cs-backup', 'vers=4.2');
      calls.domblklist('i-5-33-VM', true);
      const dest = '<MOUNT_POINT>/i-5-33-VM/2025.02.02.03.15.00';
      calls.virsh(
        ['backup-begin', '--domain', 'i-5-33-VM', '--backupxml', `${dest}/backup.xml`, '--checkpointxml', `${dest}/checkpoint.xml`],
        {
          stdout: '\n',
          stderr: `error: invalid argument: store '${dest}/root.${VOL_A}.qcow2' for backup of 'vda' exists\n`,
          exitCode: 1,
        },
      );
      rmSync(mpOnNas('i-5-33-VM/2025.02.02.03.15.00'), { recursive: true });
      calls.umount();
      return { exitCode: 1, stdout: [], log: logMounted('nfs') };
    },
  },
  {
    name: 'backup-stopped-existing-dir',
    group: 'backup-stopped',
    description:
      'Stopped-VM backup into a -p that already holds a backup: qemu-img convert overwrites its disk file, ls lists every entry (old side files too), exit 0, NAS left mounted.',
    argv: [
      '-o',
      'backup',
      '-v',
      'i-5-33-VM',
      '-t',
      'nfs',
      '-s',
      '10.40.1.20:/vol/cs-backup',
      '-m',
      '',
      '-p',
      'i-5-33-VM/2025.02.01.03.15.00',
      '-q',
      'false',
      '-d',
      `<PRIMARY>/${POOL}/${VOL_A}`,
    ],
    host: host([vm33('shut off')]),
    nasSteps: NAS_33,
    original: async ({ calls }) => {
      calls.version();
      calls.list_();
      calls.mount('nfs', '10.40.1.20:/vol/cs-backup', '');
      const rel = `i-5-33-VM/2025.02.01.03.15.00/root.${VOL_A}.qcow2`;
      await run(REAL.qemuImg, ['convert', '-O', 'qcow2', `${PRIMARY}/${POOL}/${VOL_A}`, mpOnNas(rel)]);
      calls.add('qemu-img', ['convert', '-O', 'qcow2', `<PRIMARY>/${POOL}/${VOL_A}`, `<MOUNT_POINT>/${rel}`]);
      calls.sync();
      return { exitCode: 0, stdout: sizeLines(mpOnNas('i-5-33-VM/2025.02.01.03.15.00')), log: [], leftMounted: true };
    },
  },
  fewerParents('backup-running-incremental-fewer-parents', true),
  fewerParents('backup-running-incremental-fewer-parents-unknown', false),
  {
    name: 'backup-running-legacy-full-mode',
    group: 'backup-running',
    description:
      'A newer agent\'s "-M legacy-full" is unknown to the recorded script: "Unknown mode: legacy-full" after the mount, cleanup, exit 1.',
    argv: [
      '-o',
      'backup',
      '-v',
      'i-5-33-VM',
      '-t',
      'nfs',
      '-s',
      '10.40.1.20:/vol/cs-backup',
      '-m',
      '',
      '-p',
      'i-5-33-VM/2025.02.03.03.15.00',
      '-q',
      'false',
      '-d',
      '',
      '-M',
      'legacy-full',
    ],
    host: host([vm33('running')]),
    nasSteps: NAS_33,
    original: async ({ calls }) => {
      calls.version();
      calls.list_();
      calls.mount('nfs', '10.40.1.20:/vol/cs-backup', '');
      calls.umount();
      return { exitCode: 1, stdout: ['Unknown mode: legacy-full'], log: logMounted('nfs') };
    },
  },
  {
    name: 'backup-stopped-existing-bitmap',
    group: 'backup-stopped',
    description:
      'Stopped-VM full backup whose source disk already carries the --bitmap-new bitmap: the copy succeeds, "qemu-img bitmap --add" fails (its error goes to agent.log), no BITMAP_CREATED line, exit 0, NAS left mounted.',
    argv: [
      '-o',
      'backup',
      '-v',
      'i-9-77-VM',
      '-t',
      'nfs',
      '-s',
      '10.40.1.20:/vol/cs-backup',
      '-m',
      'vers=3',
      '-p',
      'i-9-77-VM/2025.02.03.04.00.00',
      '-q',
      'false',
      '-d',
      `<PRIMARY>/${POOL}/${VOL_D}`,
      '-M',
      'full',
      '--bitmap-new',
      'backup-1738555200',
    ],
    host: host([
      {
        name: 'i-9-77-VM',
        id: -1,
        uuid: '0f1e2d3c-4b5a-4697-8877-665544332211',
        state: 'shut off',
        vcpus: 1,
        memoryKiB: 1048576,
        disks: [
          {
            type: 'file',
            device: 'disk',
            target: 'vda',
            source: `<PRIMARY>/${POOL}/${VOL_D}`,
            virtualSize: 8388608,
            writes: [w('0x31', 0, 262144), w('0x32', 4194304, 65536)],
            bitmaps: ['backup-1738555200'],
          },
        ],
        interfaces: [],
        checkpoints: [],
      },
    ]),
    nasSteps: backupSteps('i-9-77-VM/2025.02.01.04.00.00', [{ vol: VOL_D, size: 8388608, writes: [w('0x31', 0, 262144)] }]),
    original: async ({ calls }) => {
      calls.version();
      calls.list_();
      calls.mount('nfs', '10.40.1.20:/vol/cs-backup', 'vers=3');
      const rel = `i-9-77-VM/2025.02.03.04.00.00/root.${VOL_D}.qcow2`;
      await run('mkdir', ['-p', mpOnNas('i-9-77-VM/2025.02.03.04.00.00')]);
      await run(REAL.qemuImg, ['convert', '-O', 'qcow2', `${PRIMARY}/${POOL}/${VOL_D}`, mpOnNas(rel)]);
      calls.add('qemu-img', ['convert', '-O', 'qcow2', `<PRIMARY>/${POOL}/${VOL_D}`, `<MOUNT_POINT>/${rel}`]);
      const err = 'qemu-img: Operation add on bitmap backup-1738555200 failed: Bitmap already exists: backup-1738555200';
      calls.add('qemu-img', ['bitmap', '--add', `<PRIMARY>/${POOL}/${VOL_D}`, 'backup-1738555200'], { stderr: `${err}\n`, exitCode: 1 });
      calls.sync();
      return { exitCode: 0, stdout: sizeLines(mpOnNas('i-9-77-VM/2025.02.03.04.00.00')), log: [err], leftMounted: true };
    },
  },
  {
    name: 'rebase-old-backing-gone',
    group: 'rebase',
    description:
      'Chain repair on cifs (empty -m, so "-o ,nobrl") after the middle backup was already removed: the safe qemu-img rebase cannot open the old backing, "qemu-img rebase failed", then the NAS-wiping cleanup, exit 20.',
    argv: [
      '-o',
      'rebase',
      '-t',
      'cifs',
      '-s',
      '//192.168.50.4/cloudbackup',
      '-m',
      '',
      '--rebase-target',
      `i-5-33-VM/2025.02.03.03.15.00/root.${VOL_A}.qcow2`,
      '--rebase-new-backing',
      `i-5-33-VM/2025.02.01.03.15.00/root.${VOL_A}.qcow2`,
    ],
    host: host([vm33('running')]),
    nasSteps: [
      ...NAS_33,
      ...backupSteps(
        'i-5-33-VM/2025.02.03.03.15.00',
        [{ ...rootA, writes: [w('0x25', 12582912, 65536)] }],
        'i-5-33-VM/2025.02.02.03.15.00',
      ),
      { op: 'remove', path: 'i-5-33-VM/2025.02.02.03.15.00' },
    ],
    original: async ({ calls }) => {
      calls.version();
      calls.mount('cifs', '//192.168.50.4/cloudbackup', ',nobrl');
      const target = `<MOUNT_POINT>/i-5-33-VM/2025.02.03.03.15.00/root.${VOL_A}.qcow2`;
      const backing = `../2025.02.01.03.15.00/root.${VOL_A}.qcow2`;
      const err = `qemu-img: Could not open '${target}': Could not open backing file: Could not open '<MOUNT_POINT>/i-5-33-VM/2025.02.03.03.15.00/../2025.02.02.03.15.00/root.${VOL_A}.qcow2': No such file or directory`;
      calls.add('qemu-img', ['rebase', '-b', backing, '-F', 'qcow2', target], { stderr: `${err}\n`, exitCode: 1 });
      // cleanup(): rm -rf "<mount point>/" empties the share, then fails on the busy mount point.
      for (const n of readdirSync(NAS)) rmSync(join(NAS, n), { recursive: true });
      calls.umount();
      return {
        exitCode: 20,
        stdout: [`qemu-img rebase failed for ${target} onto ${backing}`, 'Failed to delete <MOUNT_POINT>/', 'Backup cleanup failed'],
        stderr: [err, "rm: cannot remove '<MOUNT_POINT>/': Device or resource busy"],
        log: logMounted('cifs'),
      };
    },
  },
  {
    name: 'backup-paused-vm',
    group: 'backup-stopped',
    description:
      'A paused VM (listed, but not as running) with -d "" and -q true takes the stopped path with no disks: one empty line, exit 0, NAS left mounted.',
    argv: [
      '-o',
      'backup',
      '-v',
      'i-5-33-VM',
      '-t',
      'nfs',
      '-s',
      '10.40.1.20:/vol/cs-backup',
      '-m',
      '',
      '-p',
      'i-5-33-VM/2025.02.03.03.15.00',
      '-q',
      'true',
      '-d',
      '',
      '-M',
      'full',
      '--bitmap-new',
      'backup-1738552500',
    ],
    host: host([vm33('paused', { agent: { 'guest-fsfreeze-freeze': { return: 1 }, 'guest-fsfreeze-thaw': { return: 1 } } })]),
    nasSteps: NAS_33,
    original: async ({ calls }) => {
      calls.version();
      calls.list_();
      calls.mount('nfs', '10.40.1.20:/vol/cs-backup', '');
      await run('mkdir', ['-p', mpOnNas('i-5-33-VM/2025.02.03.03.15.00')]);
      calls.sync();
      return { exitCode: 0, stdout: sizeLines(mpOnNas('i-5-33-VM/2025.02.03.03.15.00')), log: logMounted('nfs'), leftMounted: true };
    },
  },
  {
    name: 'backup-running-thaw-fails',
    group: 'backup-running',
    description:
      '-q true: the freeze works, backup-begin starts the job, the thaw fails: "Failed to thaw the filesystem for vm …" with virsh\'s error, cleanup, exit 1; the new checkpoint stays registered.',
    argv: [
      '-o',
      'backup',
      '-v',
      'i-9-77-VM',
      '-t',
      'nfs',
      '-s',
      '10.10.0.5:/export/backup',
      '-m',
      '',
      '-p',
      'i-9-77-VM/2025.02.03.04.00.00',
      '-q',
      'true',
      '-d',
      '',
      '-M',
      'full',
      '--bitmap-new',
      'backup-1738555200',
    ],
    host: host([
      {
        name: 'i-9-77-VM',
        id: 31,
        uuid: '0f1e2d3c-4b5a-4697-8877-665544332211',
        state: 'running',
        vcpus: 1,
        memoryKiB: 1048576,
        disks: [
          {
            type: 'file',
            device: 'disk',
            target: 'vda',
            source: `<PRIMARY>/${POOL}/${VOL_D}`,
            virtualSize: 8388608,
            writes: [w('0x31', 0, 262144)],
            bitmaps: [],
          },
          { type: 'file', device: 'cdrom', target: 'hdc', source: '-' },
        ],
        interfaces: [{ name: 'vnet2', type: 'bridge', source: 'cloudbr0', model: 'e1000', mac: '02:00:0f:1e:00:1f' }],
        checkpoints: [],
        agent: {
          'guest-fsfreeze-freeze': { return: 1 },
          'guest-fsfreeze-thaw': { error: 'Guest agent is not responding: Guest agent not available for now' },
        },
      },
    ]),
    nasSteps: [],
    original: async ({ calls }) => {
      const vm = 'i-9-77-VM';
      const dest = '<MOUNT_POINT>/i-9-77-VM/2025.02.03.04.00.00';
      calls.version();
      calls.list_();
      calls.mount('nfs', '10.10.0.5:/export/backup', '');
      calls.domblklist(vm, true);
      calls.virsh(['qemu-agent-command', vm, '{"execute":"guest-fsfreeze-freeze"}'], { stdout: '{"return":1}\n\n' });
      calls.virsh(['backup-begin', '--domain', vm, '--backupxml', `${dest}/backup.xml`, '--checkpointxml', `${dest}/checkpoint.xml`], {
        stdout: 'Backup started\n\n',
        effects: [
          {
            op: 'create-store',
            mode: 'full',
            disk: 'vda',
            target: `${dest}/root.${VOL_D}.qcow2`,
            source: `<PRIMARY>/${POOL}/${VOL_D}`,
            fileMode: '0600',
            how: 'qemu-img convert -O qcow2 <source> <target>',
          },
          { op: 'register-checkpoint', domain: vm, name: 'backup-1738555200', disks: ['vda'] },
        ],
      });
      calls.virsh(['qemu-agent-command', vm, '{"execute":"guest-fsfreeze-thaw"}'], {
        stdout: '\n',
        stderr: 'error: Guest agent is not responding: Guest agent not available for now\n',
        exitCode: 1,
      });
      // mkdir -p made the instance folder; cleanup() removes the timestamp folder only.
      await run('mkdir', ['-p', mpOnNas('i-9-77-VM')]);
      calls.umount();
      return {
        exitCode: 1,
        stdout: ['Failed to thaw the filesystem for vm i-9-77-VM: error: Guest agent is not responding: Guest agent not available for now'],
        log: logMounted('nfs'),
        checkpoints: { 'i-3-12-VM': [], [vm]: ['backup-1738555200'] },
      };
    },
  },
];

const only = process.argv.slice(2);
await acquireSuiteLock(15 * 60_000);
try {
  for (const sc of scenarios) {
    if (only.length && !only.includes(sc.name)) continue;
    const fx = await build(sc);
    writeFileSync(join(HERE, `${sc.name}.json`), `${JSON.stringify(fx, null, 2)}\n`);
    console.log(`wrote ${sc.name}.json`);
  }
  await resetSandbox();
} finally {
  releaseSuiteLock();
}
