#!/usr/bin/env node
// The `ferry` command line: one module per command group, registered here.
import { basesCommand } from './bases';
import { Command, CommanderError } from 'commander';
import { workerCommand } from '../../worker/main';
import { exitCodeFor } from './common';
import { abortCommand, approveCommand, bandwidthCommand, resolveCommand } from './control';
import { listCommand, migrateCommand, statusCommand } from './migrate';
import { serverCommand } from './server';
import { slotsCommand } from './slots';
import { vmCommand } from './vm';

const EPILOG = `
Exit codes:
  0    success; the migration completed (for status: completed or still running)
  1    error: Temporal unreachable, the migration failed, ...
  2    bad flags or arguments
  3    the migration rolled back: the VM runs on its source
  4    refused, nothing changed: invalid input, VM already migrating, unknown VM or
       migration, host without an agent, abort past the commit point, approve of an
       automatic cutover, resolve of a migration that does not wait for a lost host
  130  interrupted: Ctrl-C stops watching, the migration goes on

Client commands connect with --address, --namespace, --api-key, --tls, --tls-cert,
--tls-key, --tls-ca, --tls-server-name, or the TEMPORAL_ADDRESS, TEMPORAL_NAMESPACE,
TEMPORAL_API_KEY, TEMPORAL_TLS, TEMPORAL_TLS_CLIENT_CERT_PATH, TEMPORAL_TLS_CLIENT_KEY_PATH,
TEMPORAL_TLS_SERVER_CA_CERT_PATH and TEMPORAL_TLS_SERVER_NAME environment variables; and with
--task-queue or FERRY_TASK_QUEUE when the deployment's agents run with one.

Example:
  ferry server &                       # Temporal with the Web UI on :8233
  ferry worker --host a &  ferry worker --host b &
  ferry vm create vm1 --host a --disk 1GiB --memory 256MiB --workload mixed --fill
  ferry migrate vm1 --from a --to b --wait
  ferry migrate vm1 --to a --wait      # back again, from where it runs now`;

const program = new Command('ferry')
  .description('Live and incremental whole-system migration of virtual machines, on Temporal')
  .addCommand(serverCommand())
  .addCommand(workerCommand())
  .addCommand(vmCommand())
  .addCommand(basesCommand())
  .addCommand(migrateCommand())
  .addCommand(statusCommand())
  .addCommand(listCommand())
  .addCommand(abortCommand())
  .addCommand(approveCommand())
  .addCommand(resolveCommand())
  .addCommand(bandwidthCommand())
  .addCommand(slotsCommand())
  .addHelpText('after', EPILOG);

/** Settings commander copies only to commands made with .command(), applied to the whole tree. */
function configure(cmd: Command, path: string): void {
  cmd
    .exitOverride()
    .configureOutput({ outputError: (text, write) => write(`ferry: ${text.replace(/^error: /, '')}`) })
    .showHelpAfterError(`(see: ${path} --help)`);
  for (const sub of cmd.commands) configure(sub, `${path} ${sub.name()}`);
}
configure(program, 'ferry');

// `ferry list | head`: a closed pipe ends the output, not with a stack trace.
process.stdout.on('error', (err: NodeJS.ErrnoException) => {
  if (err.code === 'EPIPE') process.exit(process.exitCode ?? 0);
  throw err;
});

// Exit once the command is done: after Ctrl-C while the server is away, the SDK would otherwise retry
// its calls on a closed connection (and throw from a timer).
program.parseAsync(process.argv).then(() => process.exit(), (err: unknown) => {
  // commander has printed its own errors (and the help) already
  if (!(err instanceof CommanderError)) process.stderr.write(`ferry: ${err instanceof Error ? err.message : String(err)}\n`);
  process.exit(exitCodeFor(err));
});
