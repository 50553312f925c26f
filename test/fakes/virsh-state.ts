// The fake virsh (test/fakes/virsh.mjs) from the tests' side: build its state file,
// put it on a sandbox's PATH as `virsh`, and read back the calls it answered and what
// they changed (checkpoints, bitmaps, domain state, guest freeze).
import { execFileSync } from 'node:child_process';
import { chmodSync, existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { Sandbox } from '../helpers/cli.js';
import type { Write } from '../helpers/qemu.js';
import { renderFastAnswers } from './virsh.mjs';

export const FAKE_VIRSH = fileURLToPath(new URL('./virsh.mjs', import.meta.url));

export interface FakeBitmap {
  name: string;
  /** Dirty bytes (query-block's count). */
  count?: number;
  persistent?: boolean;
  inconsistent?: boolean;
  recording?: boolean;
  busy?: boolean;
}

export interface FakeDisk {
  type?: string;
  device?: 'disk' | 'cdrom';
  target: string;
  /** Absolute image path, or '-' (cdrom without media). */
  source?: string;
  format?: 'qcow2' | 'raw';
  /** Persistent bitmaps in the live image (what query-block shows). */
  bitmaps?: Array<string | FakeBitmap>;
  /**
   * The bitmaps are the qcow2 source's own (`bitmaps` is ignored): query-block reads them
   * with qemu-img info (`auto` = recording, `in-use` = inconsistent), checkpoints add and
   * remove them with qemu-img bitmap.
   */
  bitmapsInImage?: boolean;
  /** Written into an incremental target by backup-begin (the changes since the parent). */
  dirty?: Write[];
}

export interface FakeCheckpoint {
  name: string;
  creationTime?: number;
  disks?: string[];
}

export type JobBehaviour = 'completed' | 'failed' | 'never' | 'vanish';

export interface FakeJob {
  behaviour?: JobBehaviour;
  /** Polls that still see the job running (Unbounded) before it ends. */
  runningPolls?: number;
  errorMessage?: string;
  /** A failed job leaves the domain paused (an I/O error with werror=stop). */
  pauseOnFailure?: boolean;
  /** After this many polls the domain pauses on an I/O error while the job runs on. */
  pauseAfterPolls?: number;
  /** With pauseAfterPolls: first grow the first target until its (small, test) file system is full. */
  fillTargetFs?: boolean;
  timeElapsedMs?: number;
}

export interface FakeDomain {
  name: string;
  id: number;
  uuid: string;
  /** 'running', 'paused', 'shut off', 'in shutdown', or any other text virsh may print. */
  state: string;
  /** What `domstate --reason` adds (default: booted when running, user when paused). */
  stateReason?: string;
  vcpus?: number;
  memoryKiB?: number;
  persistent?: boolean;
  description?: string;
  interfaces?: Array<{ name: string; type: string; source: string; model: string; mac: string }>;
  disks: FakeDisk[];
  checkpoints?: Array<string | FakeCheckpoint>;
  /** Absent or connected:false: "QEMU guest agent is not connected". */
  agent?: { connected: boolean; frozen?: boolean; filesystems?: number };
  job?: FakeJob;
  /** Kept by the fake: every block-job-set-speed it was given, in order. */
  jobSpeeds?: Array<{ device: string; speed: number }>;
  /** Kept by the fake: the active job and the completed job's statistics. */
  runtime?: { active: unknown; completed: { type: string } | null };
}

export interface FakeInjection {
  exitCode?: number;
  stderr?: string;
  stdout?: string;
  /** Do what the call does, then fail anyway (a reply lost to a timeout). */
  apply?: boolean;
  /** Affect only this many calls (then answer normally). */
  times?: number;
  /** Let this many calls through first. */
  skip?: number;
  delayMs?: number;
}

export interface FakeState {
  version?: { compiled?: string; library?: string; api?: string; hypervisor?: string };
  connectError?: { stderr: string; exitCode?: number };
  queryBlock?: 'inserted' | 'top-level';
  domains: FakeDomain[];
  /** Keyed by sub-command, or `<sub-command>:<detail>` (agent/QMP command name; domjobinfo: completed|active). */
  fail?: Record<string, FakeInjection>;
}

export interface FakeCall {
  /** Everything after `virsh`, e.g. ['-c', 'qemu:///system', 'list']. */
  argv: string[];
  exitCode: number;
  /** When the call ended (ms since the epoch). */
  t: number;
  /** The XML files the call was given (--xmlfile, --backupxml, --checkpointxml), as they were then. */
  inputs?: Record<string, string>;
  /** Answered by the shim from the rendered answers (not by the fake itself). */
  fast?: boolean;
}

export class FakeVirsh {
  constructor(readonly statePath: string) {}

  read(): FakeState {
    return JSON.parse(readFileSync(this.statePath, 'utf8')) as FakeState;
  }

  write(s: FakeState): void {
    writeFileSync(this.statePath, JSON.stringify(s, null, 2));
    renderFastAnswers(this.statePath); // the shim's answers follow the new state
  }

  update(fn: (s: FakeState) => void): void {
    const s = this.read();
    fn(s);
    this.write(s);
  }

  domain(name: string): FakeDomain {
    const d = this.read().domains.find((x) => x.name === name);
    if (!d) throw new Error(`fake virsh has no domain ${name}`);
    return d;
  }

  calls(): FakeCall[] {
    const f = `${this.statePath}.calls`;
    if (!existsSync(f)) return [];
    return readFileSync(f, 'utf8')
      .split('\n')
      .filter(Boolean)
      .map((l) => JSON.parse(l) as FakeCall);
  }

  /** Each call's arguments without the `-c qemu:///system` prefix, e.g. ['domjobinfo', 'vm', '--completed']. */
  commands(): string[][] {
    return this.calls().map((c) => (c.argv[0] === '-c' ? c.argv.slice(2) : c.argv));
  }

  /** The calls of one sub-command, e.g. 'backup-begin'. */
  callsOf(sub: string): FakeCall[] {
    return this.calls().filter((c) => (c.argv[0] === '-c' ? c.argv[2] : c.argv[0]) === sub);
  }

  /** Just the sub-command names, in call order. */
  names(): string[] {
    return this.commands().map((c) => c[0] ?? '');
  }

  checkpointNames(vm: string): string[] {
    return (this.domain(vm).checkpoints ?? []).map((c) => (typeof c === 'string' ? c : c.name));
  }

  checkpoint(vm: string, name: string): FakeCheckpoint | undefined {
    return (this.domain(vm).checkpoints ?? []).map((c) => (typeof c === 'string' ? { name: c } : c)).find((c) => c.name === name);
  }

  bitmaps(vm: string, target: string): string[] {
    const disk = this.domain(vm).disks.find((k) => k.target === target);
    if (disk?.bitmapsInImage) {
      const info = JSON.parse(execFileSync('qemu-img', ['info', '--output=json', '-U', disk.source!], { encoding: 'utf8' })) as {
        'format-specific'?: { data?: { bitmaps?: Array<{ name: string }> } };
      };
      return (info['format-specific']?.data?.bitmaps ?? []).map((b) => b.name);
    }
    return (disk?.bitmaps ?? []).map((b) => (typeof b === 'string' ? b : b.name));
  }
}

/**
 * Write the state file next to the sandbox and install `virsh` on its PATH (the shim
 * dir comes first), so the program runs the fake exactly as it would run virsh.
 */
export function installFakeVirsh(sb: Sandbox, state: FakeState): FakeVirsh {
  const path = join(sb.root, 'virsh-state.json');
  const fake = new FakeVirsh(path);
  fake.write(state);
  const p = join(sb.shims, 'virsh');
  writeFileSync(p, shimScript(path));
  chmodSync(p, 0o755);
  return fake;
}

/**
 * The `virsh` on PATH: answers read-only queries from the answers the fake rendered
 * for the current state (see renderFast in virsh.mjs), logging them like the fake
 * does; everything else runs the fake itself.
 */
function shimScript(state: string): string {
  return `#!/bin/bash
S='${state}'
if [[ -d "$S.fast" ]]; then
  if [[ $1 == -c ]]; then k="\${*:3}"; else k="$*"; fi
  if [[ $k =~ ^[A-Za-z0-9._\\ -]+$ && -f "$S.fast/$k" ]]; then
    j=''
    for a in "$@"; do j+="\${j:+,}\\"$a\\""; done
    t=\${EPOCHREALTIME/./}
    printf '{"argv":[%s],"exitCode":0,"t":%s,"fast":true}\\n' "$j" "\${t:0:-3}" >> "$S.calls"
    exec cat "$S.fast/$k"
  fi
fi
FAKE_VIRSH_STATE="$S" exec '${process.execPath}' '${FAKE_VIRSH}' "$@"
`;
}

/** The bystander every golden scenario has: another running VM on the host. */
export const BYSTANDER: FakeDomain = {
  name: 'i-3-12-VM',
  id: 3,
  uuid: '9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d',
  state: 'running',
  vcpus: 2,
  memoryKiB: 2097152,
  disks: [{ type: 'file', device: 'disk', target: 'vda', source: '/var/lib/libvirt/images/0d1e2f3a-4b5c-4d6e-8f70-8192a3b4c5d6' }],
  interfaces: [],
  checkpoints: [],
};
