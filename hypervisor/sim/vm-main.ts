// Entry point of one simulated VM process: `node vm-main <vmDir> [--paused]`.
// Started detached by SimDriver; stdout/stderr go to <vmDir>/vm.log. SIGTERM/SIGINT = clean stop.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { ControlServer } from '../control/server';
import { Machine } from './machine';
import type { JsonObject } from '../control/protocol';
import { VmPaths, controlSocketPath, isVmProcessAlive, readJson, readPid, writeFileAtomic, type VmConfig } from './vm-files';

function main(): void {
  const dirArg = process.argv[2];
  if (!dirArg) {
    process.stderr.write('usage: vm-main <vmDir> [--paused]\n');
    process.exit(2);
  }
  const dir = path.resolve(dirArg);
  const paths = new VmPaths(dir);
  const config = readJson<VmConfig>(paths.config);
  const vmId = config?.spec.vmId ?? path.basename(dir);
  const log = (msg: string, extra: JsonObject = {}): void => {
    fs.writeSync(1, `${JSON.stringify({ time: new Date().toISOString(), pid: process.pid, vmId, msg, ...extra })}\n`);
  };
  if (!config) {
    log(`no vm.json in ${dir}: create the VM first`);
    process.exit(2);
  }
  const other = readPid(paths);
  if (other !== null && other !== process.pid && isVmProcessAlive(other, dir)) {
    log('another process already runs this VM; refusing to start a second copy', { otherPid: other });
    process.exit(3);
  }
  writeFileAtomic(paths.pid, String(process.pid));

  let server: ControlServer | null = null;
  let machine: Machine;
  const socketPath = controlSocketPath(paths);
  try {
    machine = new Machine(
      paths,
      config,
      { startPaused: process.argv.includes('--paused') },
      log,
      (event, data) => server?.broadcast(event, data),
      (code, reason) => {
        log('exiting', { code, reason });
        fs.rmSync(socketPath, { force: true });
        fs.rmSync(paths.pid, { force: true });
        setTimeout(() => process.exit(code), 50); // let the last events drain
      },
    );
  } catch (e) {
    log('cannot start the VM', { error: String((e as Error)?.stack ?? e) });
    fs.rmSync(paths.pid, { force: true });
    process.exit(1);
  }

  let quitting = false;
  const quit = (reason: string): void => {
    if (quitting) return;
    quitting = true;
    log('clean stop', { reason, ops: machine.guest.ops });
    let code = 0;
    try {
      machine.shutdownClean();
    } catch (e) {
      log('clean stop failed: persistent bitmaps stay invalid', { error: String((e as Error)?.stack ?? e) });
      code = 1;
    }
    server?.broadcast('SHUTDOWN', { ops: machine.guest.ops });
    fs.rmSync(socketPath, { force: true });
    fs.rmSync(paths.pid, { force: true });
    void server?.close();
    setTimeout(() => process.exit(code), 50); // let the last replies and events drain
  };

  fs.rmSync(socketPath, { force: true }); // left over by a crashed predecessor
  server = new ControlServer(vmId, machine.commands(() => quit('quit command')), log);
  server.listen(socketPath).then(
    () => log('VM process ready', { state: machine.state, ops: machine.guest.ops, socket: socketPath }),
    (e: unknown) => {
      log('cannot listen on the control socket', { error: String(e) });
      fs.rmSync(paths.pid, { force: true });
      process.exit(1);
    },
  );
  process.on('SIGTERM', () => quit('SIGTERM'));
  process.on('SIGINT', () => quit('SIGINT'));
  process.on('SIGHUP', () => undefined);
}

main();
