// @ts-check
// `npm run lint`. TypeScript (lib, compat, test, scripts) is linted with type information,
// each file through the tsconfig of its folder (tsconfig.json, test/tsconfig.json,
// scripts/tsconfig.json). Plain JavaScript (bin, scripts, test fakes) gets the core rules.
// The layer rules below are what docs and reviews call "qcow2 and compat stand alone,
// ops never reach into cli": change them here, with the reason, not by a disable comment.
import js from '@eslint/js';
import { defineConfig, globalIgnores } from 'eslint/config';
import globals from 'globals';
import tseslint from 'typescript-eslint';
import layers from './scripts/eslint-layers.mjs';

// Modules the operations and the CLI build on; they never call back up into either.
const DOMAIN = [
  'lib/chain/',
  'lib/backup/',
  'lib/nas/',
  'lib/engine/',
  'lib/paths.ts',
  'lib/errors.ts',
  'lib/log.ts',
  'lib/config.ts',
  'lib/exec.ts',
  'lib/agent-output.ts',
];

const ZONES = [
  { from: ['lib/qcow2/'], allow: ['lib/qcow2/'], why: 'the qcow2 engine imports nothing outside lib/qcow2 but built-in modules' },
  { from: ['compat/'], allow: ['compat/'], why: 'compat imports nothing outside compat/ but built-in modules' },
  { from: ['lib/clients/'], deny: ['lib/ops/', 'lib/cli/'], why: 'clients never import ops or cli' },
  { from: ['lib/ops/'], deny: ['lib/cli/'], why: 'ops never import cli' },
  { from: DOMAIN, deny: ['lib/ops/', 'lib/cli/'], why: 'domain modules never import ops or cli' },
];

export default defineConfig(
  globalIgnores(['dist/', 'node_modules/', 'test/golden/fixtures/', '.e2e-cache/']),
  {
    files: ['**/*.{js,mjs,cjs,ts,mts}', 'bin/nasbackup'],
    extends: [js.configs.recommended],
    languageOptions: { globals: globals.node },
    linterOptions: { reportUnusedDisableDirectives: 'error' },
  },
  {
    files: ['**/*.cjs'],
    languageOptions: { sourceType: 'commonjs' },
  },
  {
    files: ['**/*.{ts,mts}'],
    extends: [tseslint.configs.recommendedTypeChecked],
    languageOptions: {
      parserOptions: {
        projectService: true,
        tsconfigRootDir: import.meta.dirname,
      },
    },
    rules: {
      '@typescript-eslint/no-floating-promises': 'error',
      '@typescript-eslint/no-misused-promises': 'error',
      // A `default` handles the rest: what it catches is a union switch with no default.
      '@typescript-eslint/switch-exhaustiveness-check': ['error', { considerDefaultExhaustiveForUnions: true }],
      '@typescript-eslint/consistent-type-imports': ['error', { fixStyle: 'inline-type-imports' }],
      '@typescript-eslint/no-unused-vars': ['error', { argsIgnorePattern: '^_', varsIgnorePattern: '^_', caughtErrors: 'none' }],
      // compat models Java's exceptions as values (class name + getMessage), thrown like Java does.
      '@typescript-eslint/only-throw-error': ['error', { allow: [{ from: 'file', name: 'JavaException', path: 'compat/java.ts' }] }],
    },
  },
  {
    // The build and lab scripts are async throughout: check their promises with the types
    // TypeScript infers for them (scripts/tsconfig.json has allowJs, not checkJs).
    files: ['scripts/*.{mjs,cjs}'],
    languageOptions: {
      parser: tseslint.parser,
      parserOptions: { projectService: true, tsconfigRootDir: import.meta.dirname },
    },
    plugins: { '@typescript-eslint': tseslint.plugin },
    rules: {
      '@typescript-eslint/no-floating-promises': 'error',
      '@typescript-eslint/no-misused-promises': 'error',
    },
  },
  {
    // Root config files sit in no tsconfig: lint them without type information.
    files: ['*.{ts,mts}'],
    extends: [tseslint.configs.disableTypeChecked],
  },
  {
    // Tests read the program's JSON output untyped and give fakes async signatures without
    // awaiting anything: the "unsafe any" and require-await rules guard product code, not these.
    files: ['test/**/*.ts'],
    rules: {
      '@typescript-eslint/no-unsafe-assignment': 'off',
      '@typescript-eslint/no-unsafe-member-access': 'off',
      '@typescript-eslint/no-unsafe-return': 'off',
      '@typescript-eslint/no-unsafe-argument': 'off',
      '@typescript-eslint/no-unsafe-call': 'off',
      '@typescript-eslint/require-await': 'off',
      // Byte-format tests match control characters on purpose.
      'no-control-regex': 'off',
    },
  },
  {
    files: ['lib/**/*.ts', 'compat/**/*.ts'],
    plugins: { layers },
    rules: { 'layers/imports': ['error', { zones: ZONES }] },
  },
);
