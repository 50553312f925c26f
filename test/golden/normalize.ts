// Our run's text and argv in the fixtures' normalized form: sandbox paths back to
// placeholders, our `.partial` work folder and our extra flags rewritten by the
// declared argv rules (divergences.json "argv"), and one comparable key per call.
import { NAS, PRIMARY, SCRIPT_NAME, TMP } from './fixture.js';

const MOUNT_POINT_RE = new RegExp(`${TMP.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}/csbackup\\.[A-Za-z0-9]{5}`, 'g');

/** Sandbox paths → `<MOUNT_POINT>`, `<NAS>`, `<PRIMARY>`, `<SCRIPT>`. */
export function normText(s: string): string {
  const seen: string[] = [];
  return s
    .replace(MOUNT_POINT_RE, (m) => {
      if (!seen.includes(m)) seen.push(m);
      const i = seen.indexOf(m);
      return i === 0 ? '<MOUNT_POINT>' : `<MOUNT_POINT_${i + 1}>`;
    })
    .replaceAll(NAS, '<NAS>')
    .replaceAll(PRIMARY, '<PRIMARY>')
    .replaceAll(SCRIPT_NAME, '<SCRIPT>');
}

/** `<NAS>`, `<PRIMARY>` and `<MOUNT_POINT>` → real paths (recorded outputs the fakes replay). */
export function denormText(s: string, mountPoint: string | null): string {
  let out = s.replaceAll('<NAS>', NAS).replaceAll('<PRIMARY>', PRIMARY);
  if (mountPoint) out = out.replaceAll('<MOUNT_POINT>', mountPoint);
  return out;
}

/** A declared argv rewrite (divergences.json "argv"). */
export interface ArgvRule {
  id: string;
  /** Strip this suffix from a folder name in `<MOUNT_POINT>/…` paths (our work folder). */
  pathSuffix?: string;
  /** Drop an option of ours that the original did not pass. */
  cmd?: string;
  sub?: string;
  dropOption?: string;
  takesValue?: boolean;
}

export const VIRSH_URI = ['-c', 'qemu:///system'];

/** The subcommand: virsh's first word after `-c <uri>`, otherwise the first argument. */
export function subcommand(cmd: string, argv: readonly string[]): string | undefined {
  if (cmd === 'virsh' && argv[0] === '-c') return argv[2];
  return argv[0];
}

export function normArgv(cmd: string, argv: readonly string[], rules: readonly ArgvRule[]): string[] {
  let out = argv.map(normText);
  for (const r of rules) {
    if (r.pathSuffix) {
      const suffix = r.pathSuffix.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
      const re = new RegExp(`^(<MOUNT_POINT>/.*?)${suffix}(?=/|$)`);
      out = out.map((a) => a.replace(re, '$1'));
    } else if (r.dropOption && r.cmd === cmd && (!r.sub || subcommand(cmd, out) === r.sub)) {
      const i = out.indexOf(r.dropOption);
      if (i >= 0) out.splice(i, r.takesValue ? 2 : 1);
    }
  }
  return out;
}

function token(a: string): string {
  return a === '' || /\s/.test(a) ? JSON.stringify(a) : a;
}

/**
 * The comparable form of a call: `cmd arg…`, virsh without its `-c qemu:///system`
 * (checked separately), arguments with spaces or empty ones JSON-quoted.
 */
export function callKey(cmd: string, argv: readonly string[]): string {
  const a = cmd === 'virsh' && argv[0] === VIRSH_URI[0] && argv[1] === VIRSH_URI[1] ? argv.slice(2) : argv;
  return [cmd, ...a.map(token)].join(' ');
}

/** Tokens of a key or pattern (inverse of callKey's quoting). */
export function tokens(s: string): string[] {
  const out: string[] = [];
  const re = /"(?:[^"\\]|\\.)*"|\S+/g;
  for (const m of s.matchAll(re)) {
    const t = m[0];
    out.push(t.length > 1 && t.startsWith('"') && t.endsWith('"') ? (JSON.parse(t) as string) : t);
  }
  return out;
}

/**
 * Call patterns: tokens compared one by one; `*` is any one argument, `**` any number
 * (also none), `!word` at the end means "and no argument equals word".
 */
export function matchesPattern(key: string, pattern: string): boolean {
  const k = tokens(key);
  let p = tokens(pattern);
  const negatives = p.filter((t) => t.startsWith('!') && t.length > 1).map((t) => t.slice(1));
  p = p.filter((t) => !(t.startsWith('!') && t.length > 1));
  if (negatives.some((n) => k.includes(n))) return false;
  const go = (i: number, j: number): boolean => {
    if (j === p.length) return i === k.length;
    if (p[j] === '**') {
      for (let x = i; x <= k.length; x++) if (go(x, j + 1)) return true;
      return false;
    }
    if (i === k.length) return false;
    return (p[j] === '*' || p[j] === k[i]) && go(i + 1, j + 1);
  };
  return go(0, 0);
}
