// Entry of the single-file bundle (dist/nasbackup.cjs, built by scripts/bundle.mjs):
// the version is inlined at build time, so the bundle reads no file beside itself.
import { start } from './entry.js';

declare const __NASBACKUP_VERSION__: string | undefined;

void start(() => (typeof __NASBACKUP_VERSION__ === 'string' ? __NASBACKUP_VERSION__ : 'unknown'));
