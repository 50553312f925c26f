// The launcher install-agent-hook puts at the agent's script path: a few lines of /bin/sh
// that exec an ABSOLUTE Node.js with the absolute path of this program (the agent's PATH
// may not contain Node.js, and the agent runs the script with no shell). Pure text: what
// it says, and how we recognise our own (the marker on line 2).
import { basename } from 'node:path';

/** Marks a file as our launcher: the only files install-agent-hook ever overwrites or removes. */
export const LAUNCHER_MARKER = '# nasbackup-agent-hook launcher';
/** The original script is kept beside the launcher under this suffix. */
export const ORIG_SUFFIX = '.orig';

/** POSIX sh single quotes: everything literal, a quote as '\''. */
export function shQuote(s: string): string {
  return `'${s.replace(/'/g, `'\\''`)}'`;
}

export interface LauncherSpec {
  /** Absolute Node.js binary. */
  node: string;
  /** The program Node.js runs (the bundle or bin/nasbackup). */
  entry: string;
  /** Where the launcher lives (the agent's script path). */
  target: string;
  /** nasbackup's version, for people reading the file. */
  version: string;
}

/**
 * V8 flags every launch passes (bin/nasbackup's shebang and the bundle's say the same): a
 * young generation of 1 MiB semi-spaces (V8 grows them to 16 MiB under the copy engine's
 * allocation rate) and one V8 worker thread keep peak RSS near the idle program's, whatever a
 * copy or rebase moves (issue 18). Both only cost more frequent small scavenges.
 * `--no-liftoff`: the XXH64 module (our only WebAssembly) is compiled by the optimizing
 * compiler at once (0.4 ms) instead of V8's baseline one, which calls out to C for every
 * 64-bit rotate and hashes at ~1 GiB/s, not ~7: the switch to optimized code waits for that
 * one worker, busy compiling our JavaScript early in a command, and `chain verify` hashes
 * from its first second (measured: 7-9% of a warm verify's time).
 */
export const NODE_FLAGS = ['--max-semi-space-size=1', '--v8-pool-size=1', '--no-liftoff'];

/** The launcher: no logic beyond naming the script and exec'ing Node with absolute paths. */
export function launcherText(opts: LauncherSpec): string {
  const self = `${shQuote(opts.node)} ${NODE_FLAGS.join(' ')} ${shQuote(opts.entry)}`;
  return [
    '#!/bin/sh',
    `${LAUNCHER_MARKER} (nasbackup ${opts.version}); the original script is ${basename(opts.target)}${ORIG_SUFFIX} beside it.`,
    `# Written by install-agent-hook; do not edit. Roll back: ${self} install-agent-hook --uninstall --target ${shQuote(opts.target)}`,
    'NASBACKUP_SCRIPT_NAME=$0',
    'export NASBACKUP_SCRIPT_NAME',
    // No TLS here: with it set, Node parses that CA bundle on every start (~40 ms), as bin/nasbackup's shebang says.
    'unset NODE_EXTRA_CA_CERTS',
    `exec ${self} "$@"`,
    '',
  ].join('\n');
}

/** Ours only when line 2 starts with the marker (a script merely mentioning it is not). */
export function isLauncher(text: string): boolean {
  return text.split('\n', 3)[1]?.startsWith(LAUNCHER_MARKER) === true;
}
