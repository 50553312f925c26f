import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    // The libvirt/QEMU lab suite runs separately (npm run test:e2e).
    exclude: ['test/e2e/**', 'node_modules/**'],
    reporters: ['default', './test/summary-reporter.ts'],
    testTimeout: 60_000,
    hookTimeout: 60_000,
  },
});
