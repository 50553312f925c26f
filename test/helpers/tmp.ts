// Unique temp folders per test; removed afterwards (only what the test created).
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const made: string[] = [];

export function tempDir(tag: string): string {
  const d = mkdtempSync(join(tmpdir(), `nbtest-${tag}-`));
  made.push(d);
  return d;
}

export function removeTempDirs(): void {
  for (const d of made.splice(0)) rmSync(d, { recursive: true, force: true });
}
