// After `tsc`: what the compiled package needs besides JavaScript. The CLI is executable, and the
// guest's sources sit where dist/scripts/qemu/guest-build.js looks for them (the QEMU driver builds
// the guest from them at setup and keys its cache by their hash).
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
fs.chmodSync(path.join(root, 'dist', 'client', 'cli', 'main.js'), 0o755);
fs.mkdirSync(path.join(root, 'dist', 'guest'), { recursive: true });
for (const name of ['ferry-guest.c', 'init']) {
  const from = path.join(root, 'guest', name);
  const to = path.join(root, 'dist', 'guest', name);
  fs.copyFileSync(from, to);
  fs.chmodSync(to, fs.statSync(from).mode & 0o777);
}
