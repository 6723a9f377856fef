import js from '@eslint/js';
import tseslint from 'typescript-eslint';
import globals from 'globals';
import { builtinModules } from 'node:module';

// Workflow code runs in Temporal's deterministic sandbox: no Node built-ins, no I/O, no activity APIs.
const forbiddenInWorkflows = [
  ...builtinModules,
  ...builtinModules.map((m) => `node:${m}`),
  '@temporalio/activity',
  '@temporalio/client',
  '@temporalio/worker',
].map((name) => ({ name, message: 'Workflow code must be deterministic: do I/O in activities.' }));

export default tseslint.config(
  { ignores: ['node_modules/', 'dist/', 'coverage/', 'artifacts/', 'jest.config.js'] },
  js.configs.recommended,
  ...tseslint.configs.recommended,
  {
    languageOptions: { globals: { ...globals.node, ...globals.jest } },
    rules: {
      '@typescript-eslint/no-unused-vars': ['error', { argsIgnorePattern: '^_', varsIgnorePattern: '^_' }],
      'no-constant-condition': ['error', { checkLoops: false }],
    },
  },
  {
    // common/progress.ts: the progress model the workflow computes with.
    files: ['workflows/**/*.ts', 'common/progress.ts'],
    rules: {
      'no-restricted-imports': ['error', { paths: forbiddenInWorkflows }],
      'no-restricted-globals': ['error',
        { name: 'setTimeout', message: 'Use sleep() from @temporalio/workflow.' },
        { name: 'setInterval', message: 'Use sleep() in a loop from @temporalio/workflow.' },
        { name: 'process', message: 'Workflows must not read the environment.' }],
      'no-restricted-properties': ['error', { object: 'Date', property: 'now', message: 'Date.now is replayed deterministically; use workflow time deliberately.' },
        { object: 'Math', property: 'random', message: 'Use the workflow-safe random from @temporalio/workflow (uuid4) or pass values in.' }],
    },
  },
);
