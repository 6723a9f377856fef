// `ferry worker`: run a host agent in the foreground until SIGINT/SIGTERM.
import { Command } from 'commander';
import { ConfigError, loadAgentConfig, type AgentFlags } from './config';

export function workerCommand(): Command {
  return new Command('worker')
    .description('run a host agent: a Temporal worker on task queue host-NAME, the data-plane endpoint and the VMs under --home')
    .option('--host <name>', 'host name; the agent serves task queue host-<name> (env FERRY_HOST)')
    .option('--home <dir>', 'state directory of this host: VMs, ownership epochs, bases (env FERRY_HOME; default ./.ferry/<host>)')
    .option('--data-listen <addr:port>', 'data-plane listen address; port 0 picks one (env FERRY_DATA_LISTEN; default 127.0.0.1:0)')
    .option('--data-advertise <addr:port>', 'address other hosts use to reach this data plane (env FERRY_DATA_ADVERTISE)')
    .option('--data-secret-file <file>', 'file holding the shared data-plane secret (env FERRY_DATA_SECRET_FILE or FERRY_DATA_SECRET)')
    .option('--data-tls-cert <file>', 'data-plane TLS certificate (env FERRY_DATA_TLS_CERT)')
    .option('--data-tls-key <file>', 'data-plane TLS key (env FERRY_DATA_TLS_KEY)')
    .option('--data-tls-ca <file>', 'CA that signed the other hosts\' data-plane certificates (env FERRY_DATA_TLS_CA)')
    .option('--temporal-address <host:port>', 'Temporal frontend (env TEMPORAL_ADDRESS; default localhost:7233)')
    .option('--namespace <ns>', 'Temporal namespace (env TEMPORAL_NAMESPACE; default default)')
    .option('--task-queue <name>', 'task queue of this Ferry deployment\'s workflows, the same for all its agents and clients (env FERRY_TASK_QUEUE; default ferry-migrations)')
    .option('--api-key <key>', 'Temporal API key (env TEMPORAL_API_KEY)')
    .option('--tls', 'connect to Temporal with TLS (env TEMPORAL_TLS=true)')
    .option('--tls-cert <file>', 'Temporal mTLS client certificate (env TEMPORAL_TLS_CLIENT_CERT_PATH)')
    .option('--tls-key <file>', 'Temporal mTLS client key (env TEMPORAL_TLS_CLIENT_KEY_PATH)')
    .option('--tls-ca <file>', 'Temporal server CA certificate (env TEMPORAL_TLS_SERVER_CA_CERT_PATH)')
    .option('--tls-server-name <name>', 'TLS server name override (env TEMPORAL_TLS_SERVER_NAME)')
    .option('--hypervisor <kind>', 'the hypervisor of this host\'s VMs: sim (Ferry\'s simulator) or qemu (env FERRY_HYPERVISOR; default sim)')
    .option('--metrics-listen <addr:port>', 'serve Prometheus metrics at http://ADDR:PORT/metrics; port 0 picks one (env FERRY_METRICS_LISTEN; default off)')
    .option('--metrics-port <port>', 'the same on all interfaces: --metrics-listen 0.0.0.0:PORT (env FERRY_METRICS_PORT)')
    .option('--max-migrations <n>', 'migrations that may run at once touching this host, as source or destination (env FERRY_MAX_MIGRATIONS; default 4)')
    .option('--reconcile-seconds <n>', 'how often to remove orphaned shells and leftovers, checked against Temporal (env FERRY_RECONCILE_SECONDS; default 60)')
    .option('--cluster-max-migrations <n>', 'migrations that may run at once in the whole cluster; the latest asking agent\'s value applies (env FERRY_CLUSTER_MAX_MIGRATIONS; default 32)')
    .action(async (flags: AgentFlags) => {
      let config;
      try {
        config = loadAgentConfig(flags);
      } catch (err) {
        if (err instanceof ConfigError) {
          process.stderr.write(`ferry worker: ${err.message}\n`);
          process.exit(2);
        }
        throw err;
      }
      // Loaded here, not at the top: every other ferry command starts faster without the worker SDK.
      const [{ startAgent }, { installTemporalRuntime }, { createLogger }] = await Promise.all([import('./agent'), import('./runtime'), import('../common/log')]);
      const log = createLogger({ host: config.host });
      const temporalMetricsUrl = await installTemporalRuntime({ log, metrics: config.metricsListen !== null, host: config.host });
      const agent = await startAgent(config, { log, temporalMetricsUrl });
      const stop = (signal: string) => {
        agent.log.info({ signal }, 'shutting down');
        void agent.shutdown().then(() => process.exit(0));
      };
      process.once('SIGINT', () => stop('SIGINT'));
      process.once('SIGTERM', () => stop('SIGTERM'));
      await agent.done;
    });
}
