// A backup chain on a NAS folder, laid out as the agent's backups are:
// <vm>/<timestamp>/root.<vol>.qcow2 with side files, incrementals backed by relative names.
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { makeImage, type Write } from './qemu.js';

export const VM = 'i-2-10-VM';
export const VOL = 'b3f4c2a0-6d1e-4f7a-9c2b-1e5d8a7f3c01';
export const TS = ['2025.01.01.00.00.00', '2025.01.02.00.00.00', '2025.01.03.00.00.00'] as const;
export const rootFile = (ts: string): string => `${VM}/${ts}/root.${VOL}.qcow2`;

const WRITES: Write[][] = [
  [
    { pattern: 0x11, offset: 0, length: 1 << 20 },
    { pattern: 0x44, offset: 4 << 20, length: 256 << 10 },
  ],
  [{ pattern: 0x22, offset: 1 << 20, length: 512 << 10 }],
  [{ pattern: 0x33, offset: 2 << 20, length: 128 << 10 }],
];

/** full <- inc1 <- inc2, each in its own timestamp folder with the four side files. */
export function seedChain(nas: string): void {
  TS.forEach((ts, i) => {
    const backing = i === 0 ? undefined : `../${TS[i - 1]}/root.${VOL}.qcow2`;
    makeImage(join(nas, rootFile(ts)), { size: 16 << 20, ...(backing ? { backing } : {}), writes: WRITES[i]! });
    for (const f of ['domain-config.xml', 'dominfo.xml', 'domiflist.xml', 'domblklist.xml']) {
      writeFileSync(join(nas, VM, ts, f), `<!-- ${f} of ${ts} -->\n`);
    }
  });
}
