// The agent's listen addresses (the data plane and --metrics-listen, with the older --metrics-port) and its deployment's task queue.
import { ConfigError, loadAgentConfig } from '../../worker/config';

const env = { FERRY_DATA_SECRET: 'secret' };

describe('agent configuration', () => {
  it('serves no metrics unless asked', () => {
    expect(loadAgentConfig({ host: 'a' }, env).metricsListen).toBeNull();
  });

  it('takes the metrics listen address from --metrics-listen or FERRY_METRICS_LISTEN', () => {
    expect(loadAgentConfig({ host: 'a', metricsListen: '10.0.0.5:9464' }, env).metricsListen).toEqual({ host: '10.0.0.5', port: 9464 });
    expect(loadAgentConfig({ host: 'a' }, { ...env, FERRY_METRICS_LISTEN: '[::1]:0' }).metricsListen).toEqual({ host: '::1', port: 0 });
  });

  it('keeps --metrics-port as all interfaces', () => {
    expect(loadAgentConfig({ host: 'a', metricsPort: '9464' }, env).metricsListen).toEqual({ host: '0.0.0.0', port: 9464 });
  });

  it('refuses a bad or doubled metrics address, naming the fix', () => {
    expect(() => loadAgentConfig({ host: 'a', metricsListen: '9464' }, env)).toThrow(/--metrics-listen 9464: expected HOST:PORT/);
    expect(() => loadAgentConfig({ host: 'a', metricsListen: '127.0.0.1:70000' }, env)).toThrow(/out of range/);
    expect(() => loadAgentConfig({ host: 'a', metricsListen: '127.0.0.1:1', metricsPort: '2' }, env)).toThrow(ConfigError);
    expect(() => loadAgentConfig({ host: 'a', metricsPort: 'x' }, env)).toThrow(/--metrics-port x is not a port number/);
  });

  it('serves the deployment task queue of --task-queue or FERRY_TASK_QUEUE, default ferry-migrations', () => {
    expect(loadAgentConfig({ host: 'a' }, env).taskQueue).toBe('ferry-migrations');
    expect(loadAgentConfig({ host: 'a' }, { ...env, FERRY_TASK_QUEUE: 'staging' }).taskQueue).toBe('staging');
    expect(loadAgentConfig({ host: 'a', taskQueue: 'canary-2' }, { ...env, FERRY_TASK_QUEUE: 'staging' }).taskQueue).toBe('canary-2');
    expect(() => loadAgentConfig({ host: 'a', taskQueue: 'has space' }, env)).toThrow(/--task-queue has space: use letters, digits/);
  });
});
