// Test order: jest's own (failed first, then slowest first), except that the files which wait for the
// Temporal server's cold build (started in the background by global setup) run last, so that the build
// overlaps the rest of the suite instead of holding a worker.
// eslint-disable-next-line @typescript-eslint/no-require-imports -- jest loads a sequencer untransformed: plain CommonJS
const Sequencer = require('@jest/test-sequencer').default;

const LAST = [/temporal-postgres\.test\.ts$/];

class FerrySequencer extends Sequencer {
  sort(tests) {
    const sorted = super.sort(tests);
    const last = (t) => LAST.some((re) => re.test(t.path));
    return [...sorted.filter((t) => !last(t)), ...sorted.filter(last)];
  }
}

module.exports = FerrySequencer;
