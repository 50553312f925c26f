// The simulated hypervisor and NAS server a replay runs against. Every command the
// program starts through a shim ends up in FakeHost.handle(): virsh, mount, df, sync
// and sleep are answered here (the recorded answer of the same call when the fixture
// has one for this state, otherwise a synthetic one from `host`), and the recorded
// effects are performed for real (bind mounts, backup targets written with qemu-img,
// checkpoints). umount and qemu-img run for real, except qemu-img on a running
// domain's disk, which QEMU's image lock refuses.
import { execFile } from 'node:child_process';
import { chmodSync, readFileSync } from 'node:fs';
import {
  NAS,
  resolvePaths,
  type Effect,
  type Fixture,
  type HostDisk,
  type HostDomain,
  type JobStep,
  type RecordedCall,
} from '../fixture.js';
import { callKey, denormText, normArgv, normText, subcommand, type ArgvRule } from '../normalize.js';
import { REAL } from '../sandbox.js';
import * as synth from './synth.js';
import type { Answer } from './synth.js';

export interface OurCall {
  seq: number;
  cmd: string;
  /** As the program passed them. */
  argv: string[];
  /** Normalized (placeholders, declared argv rewrites), and the comparable key. */
  norm: string[];
  key: string;
  cwd: string;
  stdout: string;
  stderr: string;
  exitCode: number;
  /** `recorded #<seq>`, `synthetic` or `real`. */
  source: string;
  effects: Effect[];
}

type Provenance = 'initial' | 'redefined' | 'created' | 'backup';

interface Job {
  steps: JobStep[];
  polls: number;
  status: 'running' | 'Completed' | 'Failed' | 'Cancelled';
  stats: synth.JobStats;
}

interface DomState {
  def: HostDomain;
  checkpoints: Array<{ name: string; provenance: Provenance }>;
  job: Job | null;
  checkpointCreates: number;
}

interface ShimMount {
  source: string;
  target: string;
  type: string;
  options: string;
}

function runReal(bin: string, args: string[], cwd: string): Promise<Answer> {
  return new Promise((res) => {
    execFile(bin, args, { cwd, encoding: 'utf8', maxBuffer: 64 << 20, timeout: 300_000 }, (err, stdout, stderr) => {
      const code = err ? (typeof (err as { code?: unknown }).code === 'number' ? (err as { code: number }).code : 1) : 0;
      res({ stdout, stderr, exitCode: code });
    });
  });
}

const unxml = (s: string): string =>
  s
    .replace(/&lt;/g, '<')
    .replace(/&gt;/g, '>')
    .replace(/&quot;/g, '"')
    .replace(/&apos;/g, "'")
    .replace(/&amp;/g, '&');

/** Writes the qcow2-relevant disks of a domain (device disk with a file source). */
const imageDisks = (d: HostDomain): HostDisk[] => d.disks.filter((k) => k.device === 'disk' && k.source !== '-');
const isLive = (d: HostDomain): boolean => d.state === 'running' || d.state === 'paused';
const firstLine = (s: string): string => s.split('\n')[0] ?? '';
const fileLine = (s: string): string => s.split('\n').find((l) => l.startsWith('File processed:')) ?? '';

export class FakeHost {
  readonly calls: OurCall[] = [];
  private readonly domains = new Map<string, DomState>();
  private readonly mounts: ShimMount[] = [];
  private readonly recorded: RecordedCall[];
  private readonly recordedKeys: string[];
  private readonly host: Fixture['host'];
  /** How many times each recorded key has been answered (sequenced answers). */
  private readonly used = new Map<string, number>();
  private monitorId = 0;

  constructor(
    fx: Fixture,
    private readonly argvRules: readonly ArgvRule[],
  ) {
    this.host = resolvePaths(fx.host);
    for (const d of this.host.domains) {
      this.domains.set(d.name, {
        def: d,
        checkpoints: d.checkpoints.map((name) => ({ name, provenance: 'initial' })),
        job: null,
        checkpointCreates: 0,
      });
    }
    this.recorded = fx.expect.calls;
    this.recordedKeys = this.recorded.map((c) => callKey(c.cmd, normArgv(c.cmd, c.argv, this.argvRules)));
  }

  /** Libvirt checkpoints registered now, per domain (hostAfter.checkpoints). */
  checkpoints(): Record<string, string[]> {
    return Object.fromEntries([...this.domains].map(([n, s]) => [n, s.checkpoints.map((c) => c.name)]));
  }

  /** Mounts made by the fake `mount` that are still mounted (hostAfter.shimMounts). */
  shimMounts(mounted: (target: string) => boolean): ShimMount[] {
    return this.mounts.filter((m) => mounted(m.target)).map((m) => ({ ...m, target: normText(m.target) }));
  }

  private get mountPoint(): string | null {
    return this.mounts.at(-1)?.target ?? null;
  }

  async handle(cmd: string, argv: string[], cwd: string): Promise<OurCall> {
    const norm = normArgv(cmd, argv, this.argvRules);
    const call: OurCall = {
      seq: this.calls.length + 1,
      cmd,
      argv,
      norm,
      key: callKey(cmd, norm),
      cwd,
      stdout: '',
      stderr: '',
      exitCode: 0,
      source: 'synthetic',
      effects: [],
    };
    this.calls.push(call);
    let a: Answer;
    try {
      a = await this.dispatch(call);
    } catch (e) {
      a = { stdout: '', stderr: `fake ${cmd}: internal error: ${(e as Error).stack ?? String(e)}\n`, exitCode: 99 };
      call.source = 'fake-error';
    }
    call.stdout = a.stdout;
    call.stderr = a.stderr;
    call.exitCode = a.exitCode;
    return call;
  }

  /**
   * The recorded answer of this call, when the fixture has one that `fits` (the n-th
   * recording for sequenced calls), with its placeholders resolved; else `fallback`.
   */
  private recordedOr(call: OurCall, fallback: Answer, opts: { fits?: (r: RecordedCall) => boolean; sequenced?: boolean } = {}): Answer {
    const idx = this.recordedKeys.flatMap((k, i) => (k === call.key && (opts.fits?.(this.recorded[i]!) ?? true) ? [i] : []));
    if (idx.length === 0) return fallback;
    let pick = idx[0]!;
    if (opts.sequenced) {
      const n = this.used.get(call.key) ?? 0;
      this.used.set(call.key, n + 1);
      pick = idx[Math.min(n, idx.length - 1)]!;
    }
    const r = this.recorded[pick]!;
    call.source = `recorded #${r.seq}`;
    const mp = this.mountPoint;
    return { stdout: denormText(r.stdout, mp), stderr: denormText(r.stderr, mp), exitCode: r.exitCode };
  }

  private recordedEffects(call: OurCall): Effect[] | undefined {
    const m = /^recorded #(\d+)$/.exec(call.source);
    return m ? this.recorded.find((r) => r.seq === Number(m[1]))?.effects : undefined;
  }

  private async dispatch(call: OurCall): Promise<Answer> {
    switch (call.cmd) {
      case 'virsh':
        return this.virsh(call);
      case 'mount':
        return this.mount(call);
      case 'umount': {
        call.source = 'real';
        const a = await runReal(REAL.umount, call.argv, call.cwd);
        if (a.exitCode === 0) call.effects.push({ op: 'unmount', target: normText(call.argv.at(-1) ?? '') });
        return a;
      }
      case 'df':
        return this.recordedOr(call, this.df(call));
      case 'sync':
        call.effects.push({ op: 'noop' });
        return this.recordedOr(call, synth.ok(''));
      case 'sleep':
        call.effects.push({ op: 'sleep', requestedSeconds: Number(call.argv[0]), actualSeconds: 0 });
        return synth.ok('');
      case 'qemu-img':
        return this.qemuImg(call);
      default:
        return { stdout: '', stderr: `fake: no simulation for ${call.cmd}\n`, exitCode: 127 };
    }
  }

  // ---------------------------------------------------------------- NAS server

  private async mount(call: OurCall): Promise<Answer> {
    const a = call.argv;
    const t = a.indexOf('-t');
    const o = a.indexOf('-o');
    const positional = a.filter((_, i) => i !== t && i !== t + 1 && i !== o && i !== o + 1);
    const [source = '', target = ''] = positional;
    const type = t >= 0 ? (a[t + 1] ?? '') : '';
    const options = o >= 0 ? (a[o + 1] ?? '') : '';
    const exportDir = this.host.nas.exports[source] ?? (source === NAS ? NAS : undefined);
    let fallback: Answer;
    let effects: Effect[];
    if (this.host.nas.mountFailure) {
      fallback = { stdout: '', stderr: this.host.nas.mountFailure.stderr, exitCode: this.host.nas.mountFailure.exitCode };
      effects = [{ op: 'mount-failed', note: 'nothing mounted' }];
    } else if (exportDir) {
      fallback = synth.ok('');
      effects = [{ op: 'bind-mount', from: '<NAS>', to: '<MOUNT_POINT>' }];
    } else {
      fallback = { stdout: '', stderr: `mount.${type}: access denied by server while mounting ${source}\n`, exitCode: 32 };
      effects = [{ op: 'mount-failed', note: 'unknown export' }];
    }
    const ans = this.recordedOr(call, fallback);
    effects = this.recordedEffects(call) ?? effects;
    for (const e of effects) {
      if (e.op === 'bind-mount') {
        const from = String(e.from) === '<NAS>' ? NAS : denormText(String(e.from), null);
        const r = await runReal(REAL.mount, ['--bind', from, target], call.cwd);
        if (r.exitCode !== 0) return { stdout: '', stderr: `fake mount: bind mount failed: ${r.stderr}`, exitCode: 32 };
        this.mounts.push({ source, target, type, options });
      }
      call.effects.push(e);
    }
    return ans;
  }

  private df(call: OurCall): Answer {
    const target = call.argv.at(-1) ?? '';
    const m = this.mounts.find((x) => x.target === target);
    const { blocks1k, used1k } = this.host.nas.df;
    const avail = blocks1k - used1k;
    const pct = Math.ceil((used1k * 100) / blocks1k);
    return synth.ok(
      `Filesystem                1024-blocks     Used Available Capacity Mounted on\n${m?.source ?? 'none'}   ${blocks1k} ${used1k}  ${avail}      ${pct}% ${target}\n`,
    );
  }

  // ---------------------------------------------------------------- qemu-img

  private async qemuImg(call: OurCall): Promise<Answer> {
    // QEMU holds the image lock of a running domain's disk: qemu-img cannot open it
    // (read-only opens with -U/--force-share aside).
    if (!call.argv.includes('-U') && !call.argv.includes('--force-share')) {
      for (const s of this.domains.values()) {
        if (!isLive(s.def)) continue;
        const disk = imageDisks(s.def).find((k) => call.argv.includes(k.source));
        if (disk) {
          call.effects.push({ op: 'image-locked', path: normText(disk.source), note: 'disk of a running domain' });
          return this.recordedOr(call, synth.lockedText(disk.source));
        }
      }
    }
    call.source = 'real';
    return runReal(REAL.qemuImg, call.argv, call.cwd);
  }

  // ---------------------------------------------------------------- libvirt

  private virsh(call: OurCall): Promise<Answer> | Answer {
    const ce = this.host.virsh.connectError;
    if (ce) return this.recordedOr(call, { stdout: '', stderr: ce.stderr, exitCode: ce.exitCode });
    const sub = subcommand('virsh', call.argv);
    const args = call.argv[0] === '-c' ? call.argv.slice(3) : call.argv.slice(1);
    if (sub === 'version') return this.recordedOr(call, synth.ok(synth.versionText(this.host.virsh.version)));
    if (sub === 'list') return this.recordedOr(call, synth.ok(synth.listText(this.host.domains)));
    if (sub === 'backup-begin') return this.backupBegin(call, args);
    const vm = args.find((x) => !x.startsWith('-')) ?? '';
    const s = this.domains.get(vm);
    if (!s) return synth.virshError(`failed to get domain '${vm}'`);
    const d = s.def;
    const live = isLive(d);
    const notRunning = synth.virshError('Requested operation is not valid: domain is not running');
    switch (sub) {
      case 'domblklist':
        return this.recordedOr(call, synth.ok(synth.domblklistText(d, args.includes('--details'))));
      case 'dumpxml':
        return this.recordedOr(call, synth.ok(synth.dumpxmlText(d)));
      case 'dominfo':
        return this.recordedOr(call, synth.ok(synth.dominfoText(d)));
      case 'domiflist':
        return this.recordedOr(call, synth.ok(synth.domiflistText(d)));
      case 'domstate':
        return synth.ok(`${d.state}\n\n`);
      case 'resume':
        return live ? synth.ok(`Domain '${vm}' resumed\n\n`) : notRunning;
      case 'checkpoint-list':
        return synth.ok(synth.checkpointListText(s.checkpoints.map((c) => c.name)));
      case 'checkpoint-create':
        return this.checkpointCreate(call, s, args);
      case 'checkpoint-delete': {
        const name = args[1] ?? '';
        const i = s.checkpoints.findIndex((c) => c.name === name);
        if (i < 0) return synth.virshError(`Domain checkpoint not found: no domain checkpoint with matching name '${name}'`);
        s.checkpoints.splice(i, 1);
        call.effects.push({ op: 'delete-checkpoint', domain: vm, name });
        return synth.ok(`Domain checkpoint ${name} deleted\n\n`);
      }
      case 'qemu-monitor-command': {
        if (!live) return notRunning;
        if (!(args[1] ?? '').includes('query-block')) return synth.virshError('fake: only query-block is simulated');
        const names = s.checkpoints.map((c) => c.name);
        const disks = imageDisks(d).map((disk) => ({ disk, bitmaps: [...new Set([...(disk.bitmaps ?? []), ...names])] }));
        return synth.ok(synth.queryBlockText(disks, ++this.monitorId));
      }
      case 'qemu-agent-command': {
        if (!live) return notRunning;
        const json = args.at(-1) ?? '';
        const command = (/"execute"\s*:\s*"([^"]+)"/.exec(json) ?? [])[1] ?? '';
        const r = d.agent?.[command];
        const fallback = !d.agent
          ? synth.virshError('Guest agent is not responding: QEMU guest agent is not connected')
          : r?.error
            ? synth.virshError(r.error)
            : synth.ok(`${JSON.stringify({ return: r?.return ?? {} })}\n\n`);
        return this.recordedOr(call, fallback, { sequenced: true });
      }
      case 'domjobinfo':
        return this.jobInfo(call, s, args);
      case 'domjobabort': {
        if (s.job?.status !== 'running') return synth.virshError('Requested operation is not valid: no job is active on the domain');
        s.job.status = 'Cancelled';
        s.job.stats.errorMessage = 'operation aborted: job cancelled by client';
        call.effects.push({ op: 'abort-job', domain: vm });
        return synth.ok('');
      }
      default:
        return synth.virshError(`fake: virsh ${sub ?? ''} is not simulated`);
    }
  }

  private checkpointCreate(call: OurCall, s: DomState, args: string[]): Answer {
    const xmlFile = args[args.indexOf('--xmlfile') + 1] ?? '';
    let xml: string;
    try {
      xml = readFileSync(xmlFile, 'utf8');
    } catch {
      return synth.virshError(`Failed to open file '${xmlFile}': No such file or directory`);
    }
    const name = unxml((/<name>([^<]*)<\/name>/.exec(xml) ?? [])[1] ?? '');
    const disks = imageDisks(s.def);
    if (args.includes('--redefine')) {
      // Registers a checkpoint whose bitmap already exists in every disk.
      const missing = disks.filter((k) => !(k.bitmaps ?? []).includes(name));
      if (s.checkpoints.some((c) => c.name === name))
        return synth.virshError(`invalid argument: domain checkpoint '${name}' already exists`);
      if (missing.length) return synth.virshError(`internal error: bitmap '${name}' not found in disk '${missing[0]!.target}'`);
      s.checkpoints.push({ name, provenance: 'redefined' });
      call.effects.push({ op: 'register-checkpoint', domain: s.def.name, name, disks: disks.map((k) => k.target), redefined: true });
      return synth.ok(`Domain checkpoint ${name} created from '${xmlFile}'\n`);
    }
    // A plain create makes a fresh bitmap: successive results as the fixture scripts them.
    const plan = s.def.checkpointCreate ?? [{ ok: true }];
    const step = plan[Math.min(s.checkpointCreates++, plan.length - 1)]!;
    const fallback = step.error ? synth.virshError(step.error) : synth.ok(`Domain checkpoint ${name} created from '${xmlFile}'\n`);
    const a = this.recordedOr(call, fallback, { sequenced: true });
    if (a.exitCode === 0) {
      s.checkpoints.push({ name, provenance: 'created' });
      call.effects.push({ op: 'register-checkpoint', domain: s.def.name, name, disks: disks.map((k) => k.target) });
    }
    return a;
  }

  private async backupBegin(call: OurCall, args: string[]): Promise<Answer> {
    const opt = (f: string): string | undefined => (args.includes(f) ? args[args.indexOf(f) + 1] : undefined);
    const vm = opt('--domain') ?? '';
    const s = this.domains.get(vm);
    if (!s) return synth.virshError(`failed to get domain '${vm}'`);
    const d = s.def;
    if (d.backupBegin) return this.recordedOr(call, synth.virshError(d.backupBegin.error), { fits: (r) => r.exitCode !== 0 });
    if (!isLive(d)) return synth.virshError('Requested operation is not valid: domain is not running');
    if (s.job?.status === 'running') return synth.virshError('Requested operation is not valid: another job is already running');
    const xml = readFileSync(opt('--backupxml') ?? '', 'utf8');
    const incremental = /<incremental>([^<]*)<\/incremental>/.exec(xml);
    const base = incremental ? s.checkpoints.find((c) => c.name === unxml(incremental[1]!)) : undefined;
    if (incremental && !base) return synth.virshError(`invalid argument: missing parent checkpoint '${unxml(incremental[1]!)}'`);
    // A bitmap created during this run is empty: what was written before is not in it.
    const carriesDirty = base?.provenance === 'initial' || base?.provenance === 'redefined';
    let total = 0;
    for (const m of xml.matchAll(/<disk\b([^>]*)>([\s\S]*?)<\/disk>/g)) {
      const attrs = m[1]!;
      const name = (/\bname=["']([^"']+)["']/.exec(attrs) ?? [])[1];
      if (/\bbackup=["']no["']/.test(attrs)) continue;
      const target = unxml((/<target\s+file=["']([^"']+)["']/.exec(m[2]!) ?? [])[1] ?? '');
      const disk = imageDisks(d).find((k) => k.target === name);
      if (!disk || !target) return synth.virshError(`invalid argument: no disk '${name}' with a target file`);
      if (incremental) {
        const dirty = carriesDirty ? (disk.dirty ?? []) : [];
        const c = await runReal(REAL.qemuImg, ['create', '-q', '-f', 'qcow2', '-b', disk.source, '-F', 'qcow2', target], call.cwd);
        if (c.exitCode !== 0) return synth.virshError(`fake backup-begin: ${c.stderr}`);
        if (dirty.length) {
          const io = await runReal(
            REAL.qemuIo,
            ['-f', 'qcow2', ...dirty.flatMap((w) => ['-c', `write -P ${w.pattern} ${w.offset} ${w.length}`]), target],
            call.cwd,
          );
          if (io.exitCode !== 0) return synth.virshError(`fake backup-begin: ${io.stderr}`);
        }
        total += synth.dirtyBytes(dirty);
        call.effects.push({
          op: 'create-store',
          mode: 'incremental',
          disk: name,
          target: normText(target),
          backing: normText(disk.source),
          backingFormat: 'qcow2',
          dirty,
          fileMode: '0600',
        });
      } else {
        const c = await runReal(REAL.qemuImg, ['convert', '-O', 'qcow2', disk.source, target], call.cwd);
        if (c.exitCode !== 0) return synth.virshError(`fake backup-begin: ${c.stderr}`);
        total += disk.virtualSize ?? 0;
        call.effects.push({
          op: 'create-store',
          mode: 'full',
          disk: name,
          target: normText(target),
          source: normText(disk.source),
          fileMode: '0600',
        });
      }
      chmodSync(target, 0o600);
    }
    const cxml = opt('--checkpointxml');
    if (cxml) {
      const name = unxml((/<name>([^<]*)<\/name>/.exec(readFileSync(cxml, 'utf8')) ?? [])[1] ?? '');
      s.checkpoints.push({ name, provenance: 'backup' });
      call.effects.push({ op: 'register-checkpoint', domain: vm, name, disks: imageDisks(d).map((k) => k.target) });
    }
    const job = d.job;
    s.job = {
      steps: job?.sequence ?? ['Completed'],
      polls: 0,
      status: 'running',
      stats: {
        elapsedMs: job?.timeElapsedMs ?? 133,
        totalBytes: total,
        processedBytes: total,
        ...(job?.errorMessage ? { errorMessage: job.errorMessage } : {}),
      },
    };
    return this.recordedOr(call, synth.ok('Backup started\n\n'), { fits: (r) => r.exitCode === 0 });
  }

  /**
   * `domjobinfo <vm> --completed [--keep-completed] [--anystats]`: the job's next
   * scripted answer (host.job.sequence, the last one repeating); `domjobinfo <vm>`:
   * the active job (Unbounded while it runs).
   */
  private jobInfo(call: OurCall, s: DomState, args: string[]): Answer {
    const job = s.job;
    const fits = (want: Answer) => (r: RecordedCall) =>
      r.exitCode === want.exitCode &&
      firstLine(r.stdout) === firstLine(want.stdout) &&
      fileLine(r.stdout) === fileLine(want.stdout) &&
      r.stderr === want.stderr;
    if (!args.includes('--completed')) {
      const a = synth.ok(
        job?.status === 'running' ? synth.jobInfoText('Unbounded', { ...job.stats, processedBytes: 0 }) : synth.jobInfoText('None'),
      );
      return this.recordedOr(call, a, { fits: fits(a) });
    }
    let a: Answer;
    if (!job) a = synth.ok(synth.jobInfoText('None'));
    else {
      if (job.status === 'running') {
        const step = job.steps[Math.min(job.polls++, job.steps.length - 1)]!;
        if (typeof step === 'object') {
          a = synth.virshError(step.error);
          return this.recordedOr(call, a, { fits: fits(a) });
        }
        if (step === 'Completed' || step === 'Failed') job.status = step;
      }
      a = synth.ok(job.status === 'running' ? synth.jobInfoText('None') : synth.jobInfoText(job.status, job.stats));
      // Without --keep-completed libvirt hands out the completed statistics once.
      if (job.status !== 'running' && !args.includes('--keep-completed')) s.job = null;
    }
    return this.recordedOr(call, a, { fits: fits(a) });
  }
}
