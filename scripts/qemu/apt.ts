// Debian's apt, as the provisioning scripts use it: every apt-get waits for the dpkg lock (another
// apt-get may be running) and `apt-get update` runs at most once per process, only when needed.
import { spawnSync } from 'node:child_process';
import { runStreaming, type LogFn, type StreamResult } from '../provisioning';

const LOCK_WAIT = ['-o', 'DPkg::Lock::Timeout=600'];

export class Apt {
  private updated = false;

  constructor(private readonly log: LogFn) {}

  /** apt-get is there (a Debian-like system). */
  static available(): boolean {
    return process.platform === 'linux' && spawnSync('apt-get', ['--version'], { stdio: 'ignore' }).status === 0;
  }

  /** Installing needs root as well. */
  static canInstall(): boolean {
    return Apt.available() && process.getuid?.() === 0;
  }

  /** `apt-get install -y PKGS`; on failure one `apt-get update` (lists may be stale) and a retry. */
  async install(packages: string[]): Promise<void> {
    const args = ['install', '-y', '--no-install-recommends', ...packages];
    let result = await this.aptGet(args);
    if (result.code !== 0 && (await this.updateOnce())) result = await this.aptGet(args);
    if (result.code !== 0) throw new Error(`apt-get install ${packages.join(' ')} failed (exit ${result.code}):\n${result.tail.join('\n')}`);
  }

  /** `apt-get download PKG` into `dir`; retried after one `apt-get update` (the file may be gone from the mirror). */
  async download(pkg: string, dir: string): Promise<void> {
    // As root apt drops to the _apt user for downloads, which cannot write into a private temp dir.
    const sandbox = process.getuid?.() === 0 ? ['-o', 'APT::Sandbox::User=root'] : [];
    const args = [...sandbox, 'download', pkg];
    let result = await this.aptGet(args, dir);
    if (result.code !== 0 && (await this.updateOnce())) result = await this.aptGet(args, dir);
    if (result.code !== 0) throw new Error(`apt-get download ${pkg} failed (exit ${result.code}):\n${result.tail.join('\n')}`);
  }

  /** Runs `apt-get update` the first time it is called as root; false when it did not (or could not) run now. */
  async updateOnce(): Promise<boolean> {
    if (this.updated || !Apt.canInstall()) return false;
    this.updated = true;
    const result = await this.aptGet(['update']);
    if (result.code !== 0) this.log(`apt-get update failed (exit ${result.code}); going on with the lists there are`);
    return result.code === 0;
  }

  private aptGet(args: string[], cwd?: string): Promise<StreamResult> {
    this.log(`apt-get ${args.join(' ')}`);
    return runStreaming('apt-get', [...LOCK_WAIT, ...args], {
      log: (line) => this.log(`apt: ${line}`),
      env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive' },
      cwd,
    });
  }
}
