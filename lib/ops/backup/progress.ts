// A progress bar for an operator running a backup by hand. Never on the agent's
// path: only when stdout is a terminal, and drawn on stderr.
export interface Progress {
  update(processed: number, total: number): void;
  stop(): void;
}

const NONE: Progress = { update() {}, stop() {} };

export async function createProgress(enabled: boolean, label = 'backup'): Promise<Progress> {
  if (!enabled) return NONE;
  const { default: cliProgress } = await import('cli-progress');
  const bar = new cliProgress.SingleBar(
    { stream: process.stderr, format: `${label} [{bar}] {percentage}% | {value}/{total} MiB`, hideCursor: true },
    cliProgress.Presets.shades_classic,
  );
  let started = false;
  return {
    update(processed, total) {
      const mib = (n: number) => Math.round(n / 1048576);
      if (!started) {
        bar.start(Math.max(1, mib(total)), mib(processed));
        started = true;
      } else {
        bar.setTotal(Math.max(1, mib(total)));
        bar.update(mib(processed));
      }
    },
    stop() {
      if (started) bar.stop();
    },
  };
}
