// Synthetic answers of the simulated hypervisor, derived from a fixture's `host`
// section, in virsh's own formats. The fake prefers the recorded text of a call; these
// answer what the original never asked (our job polls, query-block, domstate, …) or
// what it asked in another state. golden.test.ts checks that they reproduce the
// recorded texts wherever both exist.
import type { HostDisk, HostDomain, HostVersion, Write } from '../fixture.js';

export interface Answer {
  stdout: string;
  stderr: string;
  exitCode: number;
}

export const ok = (stdout: string): Answer => ({ stdout, stderr: '', exitCode: 0 });
/** virsh errors: message on stderr, an empty line on stdout, exit 1. */
export const virshError = (message: string): Answer => ({ stdout: '\n', stderr: `error: ${message}\n`, exitCode: 1 });

export function versionText(v: HostVersion): string {
  return `Compiled against library: libvirt ${v.compiledAgainst}\nUsing library: libvirt ${v.library}\nUsing API: ${v.api}\nRunning hypervisor: ${v.hypervisor}\n\n`;
}

/** virsh's table: one leading space, columns padded and separated by 3 spaces, dash line, empty line. */
export function table(headers: string[], rows: string[][]): string {
  const widths = headers.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const line = (cells: string[]): string => ' ' + cells.map((c, i) => (i === cells.length - 1 ? c : c.padEnd(widths[i]!))).join('   ');
  const dash = '-'.repeat(widths.reduce((a, b) => a + b, 0) + 3 * widths.length);
  return [line(headers), dash, ...rows.map(line)].join('\n') + '\n\n';
}

export function listText(domains: HostDomain[]): string {
  const running = domains.filter((d) => d.state === 'running' || d.state === 'paused');
  return table(
    ['Id', 'Name', 'State'],
    running.map((d) => [String(d.id), d.name, d.state]),
  );
}

export function domblklistText(d: HostDomain, details: boolean): string {
  return details
    ? table(
        ['Type', 'Device', 'Target', 'Source'],
        d.disks.map((k) => [k.type, k.device, k.target, k.source]),
      )
    : table(
        ['Target', 'Source'],
        d.disks.map((k) => [k.target, k.source]),
      );
}

export function domiflistText(d: HostDomain): string {
  return table(
    ['Interface', 'Type', 'Source', 'Model', 'MAC'],
    d.interfaces.map((i) => [i.name, i.type, i.source, i.model, i.mac]),
  );
}

export function dominfoText(d: HostDomain): string {
  const active = d.state === 'running' || d.state === 'paused';
  const rows: Array<[string, string]> = [
    ['Id', active ? String(d.id) : '-'],
    ['Name', d.name],
    ['UUID', d.uuid],
    ['OS Type', 'hvm'],
    ['State', d.state],
    ['CPU(s)', String(d.vcpus)],
    ...(active ? ([['CPU time', '12.3s']] as Array<[string, string]>) : []),
    ['Max memory', `${d.memoryKiB} KiB`],
    ['Used memory', `${d.memoryKiB} KiB`],
    ['Persistent', 'no'],
    ['Autostart', 'disable'],
    ['Managed save', 'no'],
    ['Security model', 'none'],
    ['Security DOI', '0'],
  ];
  return rows.map(([k, v]) => `${`${k}:`.padEnd(16)}${v}`).join('\n') + '\n\n';
}

const esc = (s: string): string => s.replace(/&/g, '&amp;').replace(/'/g, '&apos;').replace(/</g, '&lt;');

/** A plausible live domain XML (only used when the fixture did not record dumpxml). */
export function dumpxmlText(d: HostDomain): string {
  const disks = d.disks.map((k, i) =>
    [
      `    <disk type='${k.type}' device='${k.device}'>`,
      k.device === 'disk' ? `      <driver name='qemu' type='qcow2' cache='none'/>` : `      <driver name='qemu' type='raw'/>`,
      ...(k.source !== '-' ? [`      <source file='${esc(k.source)}' index='${i + 2}'/>`, '      <backingStore/>'] : []),
      `      <target dev='${k.target}' bus='${k.device === 'disk' ? 'virtio' : 'ide'}'/>`,
      ...(k.device === 'disk' ? [] : ['      <readonly/>']),
      '    </disk>',
    ].join('\n'),
  );
  const nics = d.interfaces.map((n) =>
    [
      `    <interface type='${n.type}'>`,
      `      <mac address='${n.mac}'/>`,
      `      <source bridge='${esc(n.source)}'/>`,
      `      <target dev='${n.name}'/>`,
      `      <model type='${n.model}'/>`,
      '    </interface>',
    ].join('\n'),
  );
  return [
    `<domain type='kvm' id='${d.id}'>`,
    `  <name>${esc(d.name)}</name>`,
    `  <uuid>${d.uuid}</uuid>`,
    `  <memory unit='KiB'>${d.memoryKiB}</memory>`,
    `  <currentMemory unit='KiB'>${d.memoryKiB}</currentMemory>`,
    `  <vcpu placement='static'>${d.vcpus}</vcpu>`,
    '  <os>',
    "    <type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type>",
    '  </os>',
    '  <devices>',
    '    <emulator>/usr/bin/qemu-system-x86_64</emulator>',
    ...disks,
    ...nics,
    '  </devices>',
    '</domain>',
    '',
    '',
  ].join('\n');
}

export function checkpointListText(names: string[]): string {
  return names.map((n) => `${n}\n`).join('') + '\n';
}

/** virsh's vshPrettyCapacity: "%.3f <unit>" with the largest unit not above the value. */
export function prettyCapacity(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let v = bytes;
  let u = 0;
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024;
    u++;
  }
  return `${v.toFixed(3)} ${units[u]}`;
}

export type JobType = 'None' | 'Unbounded' | 'Completed' | 'Failed' | 'Cancelled';

export interface JobStats {
  elapsedMs: number;
  /** Bytes the job copies (0: an empty incremental, no File lines). */
  totalBytes: number;
  processedBytes: number;
  errorMessage?: string;
}

/** `virsh domjobinfo` block: padded `Key:  value` lines, then an empty line. */
export function jobInfoText(type: JobType, stats?: JobStats): string {
  const kv = (k: string, v: string): string => `${`${k}:`.padEnd(18)}${v}`;
  const lines = [kv('Job type', type.padEnd(12))];
  if (type !== 'None' && stats) {
    lines.push(kv('Operation', 'Backup'.padEnd(12)));
    lines.push(kv('Time elapsed', `${String(stats.elapsedMs).padEnd(13)}ms`));
    // A failed or cancelled job reports no file statistics (as recorded).
    if (stats.totalBytes > 0 && (type === 'Completed' || type === 'Unbounded')) {
      lines.push(kv('File processed', prettyCapacity(stats.processedBytes)));
      lines.push(kv('File remaining', prettyCapacity(stats.totalBytes - stats.processedBytes)));
      lines.push(kv('File total', prettyCapacity(stats.totalBytes)));
    }
    if (stats.errorMessage && (type === 'Failed' || type === 'Cancelled')) lines.push(kv('Error message', stats.errorMessage));
  }
  return lines.join('\n') + '\n\n';
}

/** Bytes covered by a set of writes (overlaps counted once, at 64 KiB cluster granularity). */
export function dirtyBytes(writes: readonly Write[]): number {
  const clusters = new Set<number>();
  for (const w of writes) for (let c = Math.floor(w.offset / 65536); c * 65536 < w.offset + w.length; c++) clusters.add(c);
  return clusters.size * 65536;
}

/** QMP query-block through `qemu-monitor-command`: each disk's image and its dirty bitmaps. */
export function queryBlockText(disks: Array<{ disk: HostDisk; bitmaps: string[] }>, id: number): string {
  const ret = disks.map(({ disk, bitmaps }, i) => ({
    device: '',
    qdev: `/machine/peripheral/virtio-disk${i}/virtio-backend`,
    locked: false,
    removable: false,
    type: 'unknown',
    inserted: {
      file: disk.source,
      'node-name': `libvirt-${i + 1}-format`,
      drv: 'qcow2',
      ro: false,
      'dirty-bitmaps': bitmaps.map((name) => ({ name, recording: true, persistent: true, busy: false, granularity: 65536, count: 0 })),
    },
  }));
  return `${JSON.stringify({ return: ret, id: `libvirt-${id}` })}\n\n`;
}

export function lockedText(path: string): Answer {
  return {
    stdout: '',
    stderr: `qemu-img: Could not open '${path}': Failed to get "write" lock\nIs another process using the image [${path}]?\n`,
    exitCode: 1,
  };
}
