// Host sanity check: the QEMU and libvirt versions from `virsh version`, with the
// original's minimums. Unlike the original, every failure says why on stdout.
import { NasbackupError } from './errors.js';
import type { VirshClient } from './clients/virsh.js';
import type { Logger } from './log.js';

export const MIN_QEMU = '4.2.0';
export const MIN_LIBVIRT = '7.2.0';

export interface HostVersions {
  qemu: string;
  libvirt: string;
  api: string;
}

/** Numeric dot-segment comparison; missing segments count as 0 (like the original's vercomp). */
export function compareVersions(a: string, b: string): -1 | 0 | 1 {
  const pa = a.split('.');
  const pb = b.split('.');
  for (let i = 0; i < Math.max(pa.length, pb.length); i++) {
    const x = parseInt(pa[i] ?? '0', 10) || 0;
    const y = parseInt(pb[i] ?? '0', 10) || 0;
    if (x !== y) return x < y ? -1 : 1;
  }
  return 0;
}

export function unsupportedMessage(v: HostVersions): string {
  return (
    `Failure... Your QEMU version ${v.qemu} or libvirt version ${v.libvirt} is unsupported. ` +
    `Consider upgrading to the required minimum version of QEMU: ${MIN_QEMU} and Libvirt: ${MIN_LIBVIRT}`
  );
}

export async function checkHostVersions(virsh: VirshClient, logger: Logger): Promise<HostVersions> {
  const p = await virsh.version();
  if (!p.qemu || !p.libvirt) {
    throw new NasbackupError('VERSION_UNPARSEABLE', 'Cannot determine the QEMU/libvirt versions from `virsh version`', { details: p.text });
  }
  const v: HostVersions = { qemu: p.qemu, libvirt: p.libvirt, api: p.api ?? '' };
  if (compareVersions(v.qemu, MIN_QEMU) < 0 || compareVersions(v.libvirt, MIN_LIBVIRT) < 0) {
    throw new NasbackupError('VERSION_UNSUPPORTED', unsupportedMessage(v));
  }
  logger.log(`Success... [ QEMU: ${v.qemu} Libvirt: ${v.libvirt} apiVersion: ${v.api} ]`);
  logger.log('Environment Sanity Checks successfully passed');
  return v;
}
