// Entry of the single-file bundle (dist/nasbackup.cjs, built by scripts/bundle.mjs):
// the version is inlined at build time, so the bundle reads no file beside itself.
import { installSignalHandlers } from './signals.js';
import { start } from './entry.js';

installSignalHandlers(); // first: a signal while starting is then kept, not fatal (see signals.ts)

declare const __NASBACKUP_VERSION__: string | undefined;

void start(() => (typeof __NASBACKUP_VERSION__ === 'string' ? __NASBACKUP_VERSION__ : 'unknown'));
