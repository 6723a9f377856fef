// Arguments for `spawn(process.execPath, [...nodeEntryArgs(p), ...])` that run the module `p` (an absolute
// path without extension) the same way this process runs: TypeScript sources through tsx when we are
// running from the repository (jest, tsx), compiled JavaScript when we are running from dist/.
import { existsSync } from 'node:fs';
import { pathToFileURL } from 'node:url';

export function nodeEntryArgs(absPathWithoutExt: string): string[] {
  if (__filename.endsWith('.ts')) {
    // An absolute loader URL, so the child does not depend on its working directory to find tsx.
    const loader = pathToFileURL(require.resolve('tsx')).href;
    return ['--import', loader, `${absPathWithoutExt}.ts`];
  }
  const js = `${absPathWithoutExt}.js`;
  if (!existsSync(js)) throw new Error(`${js} not found: run \`npm run build\` or run from the sources with tsx`);
  return [js];
}
