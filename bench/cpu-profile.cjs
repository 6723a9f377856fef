// Preloaded into the host agents by `bench --cpu-prof DIR` (NODE_OPTIONS=--require, since Node
// refuses --cpu-prof there): profiles the whole process with the inspector and writes
// DIR/<pid>.cpuprofile when it exits (open it in Chrome DevTools or speedscope).
const inspector = process.getBuiltinModule('node:inspector');
const fs = process.getBuiltinModule('node:fs');
const path = process.getBuiltinModule('node:path');

const dir = process.env.FERRY_BENCH_CPU_PROF_DIR;
if (dir) {
  const session = new inspector.Session();
  session.connect();
  session.post('Profiler.enable');
  session.post('Profiler.setSamplingInterval', { interval: 1000 });
  session.post('Profiler.start');
  process.on('exit', () => {
    // The in-process inspector answers synchronously, so this works inside 'exit'.
    session.post('Profiler.stop', (err, res) => {
      if (!err) fs.writeFileSync(path.join(dir, `${process.pid}.cpuprofile`), JSON.stringify(res.profile));
    });
  });
}
