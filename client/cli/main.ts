#!/usr/bin/env node
// The `ferry` command line.
import { Command } from 'commander';
import { workerCommand } from '../../worker/main';

const program = new Command('ferry')
  .description('Live and incremental whole-system migration of virtual machines, on Temporal')
  .showHelpAfterError()
  .addCommand(workerCommand());

program.parseAsync(process.argv).catch((err: Error) => {
  process.stderr.write(`ferry: ${err.message}\n`);
  process.exit(1);
});
