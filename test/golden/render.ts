// DIVERGENCES.md from divergences.json: the one table of deliberate divergences, with
// the fixtures each rule currently applies to. `npm run golden:divergences` writes it;
// golden.test.ts fails when it is out of date.
import { fileURLToPath } from 'node:url';
import type { Fixture } from './fixture.js';
import { FACTS, HOST_FACTS, matches, type Expectation, type Table, type When } from './rules.js';

export const DIVERGENCES_MD = fileURLToPath(new URL('./DIVERGENCES.md', import.meta.url));

const cell = (s: string): string => s.replace(/\|/g, '\\|').replace(/\n/g, ' ');
const code = (s: string): string => `\`${s.replace(/`/g, "'")}\``;

function describeWhen(w: When): string {
  const parts: string[] = [];
  const list = (v: unknown): string => (Array.isArray(v) ? v.join(' or ') : String(v));
  if (w.group) parts.push(`group ${list(w.group)}`);
  if (w.exit !== undefined) parts.push(`recorded exit ${list(w.exit)}`);
  if (w.recordedStdout) parts.push(`recorded stdout matches ${code(w.recordedStdout)}`);
  if (w.recordedStderr !== undefined) parts.push(w.recordedStderr ? 'recorded stderr not empty' : 'recorded stderr empty');
  if (w.recordedLeftovers !== undefined)
    parts.push(w.recordedLeftovers ? 'the original left mounts or mount points' : 'no recorded leftovers');
  if (w.recordedEffect) parts.push(`a recorded ${code(w.recordedEffect)} effect`);
  if (w.recordedCall)
    parts.push(w.recordedCall.startsWith('!') ? `no recorded ${code(w.recordedCall.slice(1))}` : `a recorded ${code(w.recordedCall)}`);
  if (w.failedCall) parts.push(`a recorded failing ${code(w.failedCall)}`);
  for (const [k, v] of Object.entries(w.args ?? {})) parts.push(v === null ? `no ${code(k)}` : `${code(k)} matches ${code(v)}`);
  for (const h of Array.isArray(w.host) ? w.host : w.host ? [w.host] : [])
    parts.push(h.startsWith('!') ? `host: not ${h.slice(1)}` : `host: ${h}`);
  for (const h of Array.isArray(w.facts) ? w.facts : w.facts ? [w.facts] : []) parts.push(h.startsWith('!') ? `not ${h.slice(1)}` : h);
  if (w.scenarios) parts.push(`scenarios ${w.scenarios.join(', ')}`);
  return parts.length ? parts.join('; ') : 'every scenario';
}

function describeExpect(x: Expectation): string {
  const parts: string[] = [];
  if (x.exit !== undefined) parts.push(`exit ${x.exit}`);
  if (x.stdout)
    parts.push(
      x.stdout === 'recorded'
        ? 'stdout as recorded'
        : `stdout ${x.stdout.lines.map((l) => code(typeof l === 'string' ? l : `/${l.re}/${l.optional ? '?' : ''}`)).join(' ')}`,
    );
  if (x.stdoutContains?.length) parts.push(`stdout contains ${x.stdoutContains.map(code).join(', ')}`);
  if (x.stdoutExcludes?.length) parts.push(`no stdout line matches ${x.stdoutExcludes.map((e) => code(`/${e}/`)).join(', ')}`);
  if (x.stderr) parts.push(`stderr ${x.stderr}`);
  if (x.log) parts.push(`log ${x.log}`);
  if (x.nas) parts.push(`NAS ${x.nas}`);
  if (x.primary) parts.push(`primary ${x.primary}`);
  if (x.checkpoints) parts.push(`checkpoints ${x.checkpoints}`);
  if (x.leftovers) parts.push(`leftovers ${x.leftovers}`);
  if (x.nasAdds?.length) parts.push(`NAS also holds ${x.nasAdds.map(code).join(', ')}`);
  const c = x.calls;
  if (c) {
    if (c.none) parts.push('no calls at all');
    if (c.recorded === false) parts.push('calls not compared with the recording');
    if (c.dropFrom) parts.push(`recorded calls from ${code(c.dropFrom)} on not made`);
    if (c.drop?.length) parts.push(`not made: ${c.drop.map(code).join(', ')}`);
    if (c.extra?.length) parts.push(`added: ${c.extra.map(code).join(', ')}`);
    if (c.optional?.length) parts.push(`may or may not be made: ${c.optional.map(code).join(', ')}`);
    if (c.unordered?.length) parts.push(`in any order: ${c.unordered.map(code).join(', ')}`);
    if (c.require?.length) parts.push(`must call ${c.require.map(code).join(', ')}`);
    if (c.sequence?.length) parts.push(`calls in order ${c.sequence.map(code).join(' → ')}`);
    if (c.forbid?.length) parts.push(`never ${c.forbid.map(code).join(', ')}`);
  }
  return parts.join('; ');
}

const RULE_LANGUAGE = [
  'A rule is `{ id, title, when, original, ours, why, expect }`.',
  '',
  '* `when` (all given conditions must hold): `group`; `exit` (recorded exit code, `nonzero`, `timeout`); `recordedStdout` (regex); ' +
    '`recordedStderr` / `recordedLeftovers` (true: the original printed to stderr / left mounts); `recordedEffect` (an effect op such as ' +
    '`mount-failed`); `recordedCall` / `failedCall` (a recorded call, or a recorded failing call, matches a call pattern; `!pattern`: none ' +
    'does); `args` (flag, short or long spelling → regex on its value, `null`: the flag is absent); `host` (named facts of the simulated ' +
    'host: HOST_FACTS; `!fact` negates); `facts` (named facts of the argv and the NAS before the run: FACTS).',
  '* `expect`: `exit` (`any`: the recording cannot say, the original never ran the operation); `stdout` (`recorded`, or `lines`: literal ' +
    'lines, `{re}` regexes (`optional`: zero or one such line, shown `/re/?`), `@recorded[:n[-m]]`, `@recorded-through:<regex>`, ' +
    '`@recorded-normalized-paths` (as recorded, with `//`, `/./` and a trailing `/` taken out of quoted paths), ' +
    '`@markers[:<prefix>]` (the recorded `NAME=` lines), `@job-block`, `@du-total`, `@file-sizes` (one size per qcow2 of the new backup, ' +
    'in `ls` order), `@any*`); `stdoutExcludes` (regexes no line may match); `stdoutContains` (text; `@tool-errors`: the stderr of each failing ' +
    'call we also made; `@tool-error-reasons`: the reason part of failing recorded calls we did not make); `stderr` (`recorded`, `empty`); ' +
    '`log` (`recorded`: the recorded lines appear in order; `append-only`); `calls` (`none`, `recorded: false`, `drop`, `dropFrom`, ' +
    '`extra`, `optional`, `unordered`, `require`, `forbid`, `sequence`); `nas` (`recorded`, `unchanged`, `any`, `backup-full`, `backup-incremental`: the ' +
    'new folder holds the side files, a `manifest.json` and one qcow2 per disk whose guest-visible content equals the live disk, a full copy or a thin ' +
    "incremental relinked onto its parent, a disk without a parent path taking the file of its name from the parents' folder); " +
    '`primary` (`recorded`, `unchanged`, `any`); `checkpoints` (`recorded`, `unchanged`, `any`, ' +
    '`after-success`: before + `--bitmap-new` − `--bitmap-parent`); `leftovers` (`recorded`, `none`); ' +
    '`nasAdds` (NAS-relative files we add, `${-p}` substituted: each must exist, a `manifest.json` must decode and list the new qcow2 files).',
  '* Call patterns are call keys (`virsh` without `-c qemu:///system`): `*` is one argument, `**` any number, a trailing `!word` ' +
    "excludes calls with that argument. `${-v}`, `${--bitmap-new}`, … are the fixture's argv values (`${argv.last}` its last element); " +
    '`${qemu}`, `${libvirt}`, `${job.errorMessage}` come from its host section; `${cifsOptions}` / `${originalCifsOptions}` are the ' +
    "`-o` value of a cifs mount, ours and the original's.",
];

export function renderDivergences(table: Table, fixtures: Fixture[]): string {
  const out: string[] = [];
  out.push('# Deliberate divergences from the original `nasbackup.sh`');
  out.push('');
  out.push('<!-- Generated from divergences.json by `npm run golden:divergences`; do not edit. A test checks it is current. -->');
  out.push('');
  out.push(table.about);
  out.push('');
  out.push(
    `The golden suite (\`npm run test:golden\`) replays ${fixtures.length} scenarios of the original against \`bin/nasbackup\`: the recorded ones ` +
      '(`fixtures/`) and ours, in the same shape, for kinds the recordings lack (`extra-fixtures/`, see its README).',
  );
  out.push('');
  out.push('## How calls and files are compared');
  out.push('');
  for (const n of table.compare.notes) out.push(`* ${n}`);
  out.push(`* Queries: ${table.compare.queries.map(code).join(', ')}.`);
  out.push('');
  out.push('## The rule language');
  out.push('');
  out.push(
    ...RULE_LANGUAGE.map((l) =>
      l
        .replace('HOST_FACTS', Object.keys(HOST_FACTS).map(code).join(', '))
        .replace('FACTS)', `${Object.keys(FACTS).map(code).join(', ')})`),
    ),
  );
  out.push('');
  out.push('## Argument rewrites (our extra arguments)');
  out.push('');
  out.push('| id | the original | ours | why |');
  out.push('|---|---|---|---|');
  for (const a of table.argv) out.push(`| ${a.id} | ${cell(a.original)} | ${cell(a.ours)} | ${cell(a.why)} |`);
  out.push('');
  out.push('## Divergences');
  out.push('');
  out.push('| # | rule | applies to (scenario) | the original | ours | why | asserted instead |');
  out.push('|---|---|---|---|---|---|---|');
  table.rules.forEach((r, i) => {
    const hits = fixtures.filter((fx) => matches(r.when, fx, table.argv)).map((fx) => code(fx.name));
    const scope = `${describeWhen(r.when)}: ${hits.length ? hits.join(', ') : '(no fixture yet)'}`;
    out.push(
      `| ${i + 1} | **${cell(r.title)}** (${code(r.id)}) | ${cell(scope)} | ${cell(r.original)} | ${cell(r.ours)} | ${cell(r.why)} | ${cell(describeExpect(r.expect))} |`,
    );
  });
  out.push('');
  const covered = fixtures.filter((fx) => !table.rules.some((r) => matches(r.when, fx, table.argv))).map((fx) => code(fx.name));
  out.push(
    `Scenarios no rule touches (everything as recorded, apart from the comparison notes above): ${covered.length ? covered.join(', ') : 'none'}.`,
  );
  out.push('');
  return out.join('\n');
}
