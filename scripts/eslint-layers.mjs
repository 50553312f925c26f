// ESLint plugin `layers`, rule `layers/imports`: the project's layer rules as a lint check
// (the table itself is in eslint.config.js). Each zone names the files it governs (`from`)
// and either the only places they may import from (`allow`) or the places they must not
// (`deny`). A place is a folder ending in '/' or one file, from the repository root.
// Relative specifiers are resolved against the importing file, so '../ops/x.js' and
// '../../lib/ops/x.js' are the same target however deep the importer sits. Static imports,
// `import type`, re-exports and import() with a literal are all checked: a type import
// couples layers as much as a value import does. Built-in modules always pass; other
// packages are refused in an `allow` zone unless it lists them in `packages`.
import { isBuiltin } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');

const posix = (p) => p.split(path.sep).join('/');
const inPlace = (rel, place) => (place.endsWith('/') ? rel.startsWith(place) : rel === place);
const inAny = (rel, places) => places.some((p) => inPlace(rel, p));

/** @type {import('eslint').Rule.RuleModule} */
const imports = {
  meta: {
    type: 'problem',
    docs: { description: 'Enforce the layer rules: which folders may import which' },
    schema: [
      {
        type: 'object',
        properties: {
          zones: {
            type: 'array',
            items: {
              type: 'object',
              properties: {
                from: { type: 'array', items: { type: 'string' } },
                allow: { type: 'array', items: { type: 'string' } },
                deny: { type: 'array', items: { type: 'string' } },
                packages: { type: 'array', items: { type: 'string' } },
                why: { type: 'string' },
              },
              required: ['from', 'why'],
              additionalProperties: false,
            },
          },
        },
        additionalProperties: false,
      },
    ],
    messages: { layer: "'{{spec}}' is outside what {{file}} may import: {{why}}." },
  },
  create(context) {
    const file = posix(path.relative(ROOT, context.filename));
    const zones = (context.options[0]?.zones ?? []).filter((z) => inAny(file, z.from));
    if (zones.length === 0) return {};

    const check = (node, spec) => {
      let target = null; // repository-relative path, or null for a package
      if (spec.startsWith('.') || spec.startsWith('/')) {
        target = posix(path.relative(ROOT, path.resolve(path.dirname(context.filename), spec)));
      } else if (isBuiltin(spec)) {
        return;
      }
      for (const z of zones) {
        const bad =
          target === null
            ? z.allow !== undefined && !(z.packages ?? []).some((p) => spec === p || spec.startsWith(`${p}/`))
            : (z.allow !== undefined && !inAny(target, z.allow)) || (z.deny !== undefined && inAny(target, z.deny));
        if (bad) context.report({ node, messageId: 'layer', data: { spec, file, why: z.why } });
      }
    };
    const fromSource = (node) => {
      if (node.source && typeof node.source.value === 'string') check(node.source, node.source.value);
    };
    return {
      ImportDeclaration: fromSource,
      ExportNamedDeclaration: fromSource,
      ExportAllDeclaration: fromSource,
      ImportExpression(node) {
        if (node.source.type === 'Literal' && typeof node.source.value === 'string') check(node.source, node.source.value);
      },
      // `import x = require('...')` in TypeScript.
      TSExternalModuleReference(node) {
        if (node.expression.type === 'Literal' && typeof node.expression.value === 'string') check(node.expression, node.expression.value);
      },
    };
  },
};

export default { meta: { name: 'layers' }, rules: { imports } };
