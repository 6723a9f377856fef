import { ApplicationFailure } from '@temporalio/common';
import { validateInput } from '../../workflows/validate';
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
  ])('refuses %s, non-retryably, naming the fix', (_name, input, message) => {
    const err = refusal(input);
    expect(err).toBeInstanceOf(ApplicationFailure);
    expect(err.nonRetryable).toBe(true);
    expect(err.type).toBe('ValidationError');
    expect(err.message).toMatch(message);
  });
});
