// Separate config for the real-libvirt e2e tests:
//   npx vitest run --config test/e2e/vitest.config.ts
// They share one libvirtd and a 2-core machine, so files run one at a time.
import { fileURLToPath } from 'node:url';
import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    root: fileURLToPath(new URL('../..', import.meta.url)),
    include: ['test/e2e/**/*.e2e.test.ts'],
    testTimeout: 300_000,
    hookTimeout: 300_000,
    fileParallelism: false,
    globalSetup: ['test/e2e/global-setup.ts'],
    reporters: ['default', './test/summary-reporter.ts'],
  },
});
