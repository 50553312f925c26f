// Prints one plain closing line, `tests: N passed, N failed[, N skipped]`, after the
// default reporter, so any CI log reader can tell how many tests ran.
import type { Reporter } from 'vitest/reporters';

interface Task {
  type: string;
  mode?: string;
  result?: { state?: string };
  tasks?: Task[];
}

function count(tasks: Task[], acc = { passed: 0, failed: 0, skipped: 0 }): typeof acc {
  for (const t of tasks) {
    if (t.tasks) count(t.tasks, acc);
    if (t.type !== 'test') continue;
    if (t.result?.state === 'pass') acc.passed++;
    else if (t.result?.state === 'fail') acc.failed++;
    else acc.skipped++;
  }
  return acc;
}

export default class SummaryReporter implements Reporter {
  onFinished(files: Task[] = [], errors: unknown[] = []): void {
    const c = count(files);
    // A file that failed to load has no tests: count it as a failure.
    const broken = files.filter((f) => f.result?.state === 'fail' && !(f.tasks ?? []).length).length + errors.length;
    const failed = c.failed + broken;
    process.stdout.write(`\ntests: ${c.passed} passed, ${failed} failed${c.skipped ? `, ${c.skipped} skipped` : ''}\n`);
  }
}
