#!/usr/bin/env node
// `npm run bundle`: the whole program, dependencies included, in ONE file that runs with
// the host's Node.js >= 18.19 and no node_modules: dist/nasbackup.cjs (CommonJS, so no
// ESM loader quirks on old Node; every dynamic import() of ours and of the dependencies
// is inlined, nothing is split into chunks). The version is inlined: the bundle reads
// no file beside itself. Fails if anything would still be loaded from outside.
// `--outfile <path>` builds elsewhere (the tests build their own fresh copy).
import { build } from 'esbuild';
import { chmodSync, readFileSync, statSync } from 'node:fs';
import { builtinModules } from 'node:module';
import { dirname, join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const pkg = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8'));
const at = process.argv.indexOf('--outfile');
const outfile = at > 0 && process.argv[at + 1] ? resolve(process.argv[at + 1]) : join(root, 'dist', 'nasbackup.cjs');
// bin/nasbackup's first line, so the two start Node alike (its V8 flags are the launcher's NODE_FLAGS: test/ship/bundle.test.ts).
const shebang = readFileSync(join(root, 'bin', 'nasbackup'), 'utf8').split('\n', 1)[0];
if (!shebang.startsWith('#!')) throw new Error('bin/nasbackup does not start with a shebang');

const result = await build({
  absWorkingDir: root,
  entryPoints: ['lib/cli/bundle.ts'],
  outfile,
  bundle: true,
  splitting: false,
  platform: 'node',
  format: 'cjs',
  target: 'node18.19',
  // y18n would read locale files relative to the bundle at run time: English stand-in.
  alias: { y18n: './scripts/y18n-english.cjs' },
  define: { __NASBACKUP_VERSION__: JSON.stringify(pkg.version) },
  banner: {
    js: `${shebang}\n// nasbackup ${pkg.version}: single-file build (npm run bundle); ${pkg.license}.`,
  },
  legalComments: 'none',
  // Every command parses the whole file at start: without comments and spaces (names kept, so
  // stack traces still name functions) it is ~30% smaller and each call starts ~5-10 ms sooner.
  minifyWhitespace: true,
  minifySyntax: true,
  keepNames: true,
  metafile: true,
  logLevel: 'warning',
});

// Every import must be inside the file or a Node.js built-in.
const builtins = new Set([...builtinModules, ...builtinModules.map((m) => `node:${m}`)]);
const outside = [];
for (const out of Object.values(result.metafile.outputs)) {
  for (const imp of out.imports ?? []) if (imp.external && !builtins.has(imp.path)) outside.push(imp.path);
}
if (outside.length > 0) {
  console.error(`bundle: not self-contained, would load: ${[...new Set(outside)].join(', ')}`);
  process.exit(1);
}
chmodSync(outfile, 0o755);
const kib = Math.round(statSync(outfile).size / 1024);
const shown = relative(root, outfile).startsWith('..') ? outfile : relative(root, outfile);
console.log(`bundle: ${shown} (${kib} KiB, nasbackup ${pkg.version}, node >= 18.19)`);
