// compat/: CloudStack's wire formats and the agent's Java wrappers, reproduced in
// TypeScript. Pure: nothing here touches files, processes or the clock.
export * from './errors.js';
export * from './json.js';
export * from './gson.js';
export * from './java.js';
export * from './schema.js';
export * from './commands.js';
export * from './answer-classes.js';
export * from './profiles.js';
export * from './disks.js';
export * from './argv.js';
export * from './answers.js';
export * from './serve.js';
