import { ApplicationFailure } from '@temporalio/common';
import { bandwidthError, validateInput } from '../../workflows/validate';
import type { MigrateVmInput } from '../../common/migration';

const ok: MigrateVmInput = { vmId: 'vm1', sourceHost: 'a', destinationHosts: ['b'] };

function refusal(input: unknown): ApplicationFailure {
  try {
    validateInput(input as MigrateVmInput);
  } catch (err) {
    return err as ApplicationFailure;
  }
  throw new Error('input was accepted');
}

describe('migrateVm input validation', () => {
  it('accepts a live bandwidth of null or a positive number, and names the fix otherwise', () => {
    expect([null, 1, 125e6].map(bandwidthError)).toEqual([null, null, null]);
    for (const bad of [0, -1, NaN, Infinity, '5', undefined]) expect(bandwidthError(bad)).toMatch(/positive number of bytes per second, or null for unlimited/);
  });

  it('fills defaults for a minimal input', () => {
    expect(validateInput(ok)).toMatchObject({ mode: 'tpm', incremental: 'auto', blockBytes: 65536, cutover: 'auto' });
  });

  it.each([
    ['same source and destination', { ...ok, destinationHosts: ['a'] }, /cannot migrate to the host it runs on/],
    ['no destination', { ...ok, destinationHosts: [] }, /at least one destination/],
    ['bad VM id', { ...ok, vmId: 'Bad VM!' }, /not a valid VM id/],
    ['bad host name', { ...ok, sourceHost: '' }, /not a valid host name/],
    ['duplicate destination', { ...ok, destinationHosts: ['b', 'b'] }, /lists a host twice/],
    ['block size too small', { ...ok, blockBytes: 512 }, /blockBytes/],
    ['block size too large', { ...ok, blockBytes: 4 << 20 }, /power of two between/],
    ['block size not a power of two', { ...ok, blockBytes: 65536 + 4096 }, /power of two/],
    ['unknown mode', { ...ok, mode: 'yolo' }, /mode must be one of tpm, precopy/],
    ['unknown incremental policy', { ...ok, incremental: 'maybe' }, /incremental must be one of/],
    ['negative bandwidth', { ...ok, bandwidthBytesPerSecond: -1 }, /bandwidthBytesPerSecond/],
    ['zero max rounds', { ...ok, convergence: { maxRounds: 0 } }, /maxRounds/],
    ['unknown cutover', { ...ok, cutover: 'later' }, /cutover must be one of auto, manual/],
    ['not an object', null, /must be an object/],
    ['an array', [ok], /must be an object/],
    ['a misspelt field', { ...ok, bandwith: 1000 }, /unknown field "bandwith": the fields are vmId, sourceHost/],
    ['a misspelt convergence field', { ...ok, convergence: { maxRound: 3 } }, /convergence has unknown field "maxRound"/],
    ['convergence not an object', { ...ok, convergence: 'fast' }, /convergence must be an object/],
    ['bandwidth as a string', { ...ok, bandwidthBytesPerSecond: '100MB' }, /positive number of bytes per second, or null for unlimited/],
    ['infinite bandwidth', { ...ok, bandwidthBytesPerSecond: Infinity }, /bandwidthBytesPerSecond/],
    ['zero downtime target', { ...ok, downtimeTargetMs: 0 }, /downtimeTargetMs must be a number >= 1 \(got 0\)/],
    ['non-integer block size', { ...ok, blockBytes: 65536.5 }, /blockBytes must be an integer/],
    ['destinations not a list', { ...ok, destinationHosts: 'b' }, /destinationHosts must name at least one/],
  ])('refuses %s, non-retryably, naming the fix', (_name, input, message) => {
    const err = refusal(input);
    expect(err).toBeInstanceOf(ApplicationFailure);
    expect(err.nonRetryable).toBe(true);
    expect(err.type).toBe('ValidationError');
    expect(err.message).toMatch(message);
  });
});
