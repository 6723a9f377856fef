// The agent's listen addresses: the data plane and --metrics-listen (with the older --metrics-port).
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
});
