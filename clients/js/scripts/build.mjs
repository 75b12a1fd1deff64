// Builds the chat page (page/ → ../../server/static: index.html, app.js, app.css, bundled and
// minified by esbuild, and sluice-client.js, the client alone as one ES module) and the package (src/ → dist/ with tsc). The page is committed, since the
// server serves it as is: `--check` rebuilds it in memory and exits 1 when the committed files differ.
import { execFileSync } from 'node:child_process';
import { mkdirSync, readFileSync, writeFileSync, existsSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import * as esbuild from 'esbuild';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..');
export const STATIC_DIR = resolve(root, '../../server/static');

const COMMON = {
  bundle: true,
  minify: true,
  write: false,
  legalComments: 'none',
  charset: 'utf8',
  logLevel: 'error',
};

/** The page's files as {name: text}, exactly as they are committed under server/static. */
export async function buildPage() {
  const js = await esbuild.build({
    ...COMMON,
    entryPoints: [resolve(root, 'page/app.ts')],
    format: 'esm',
    target: ['es2022', 'chrome100', 'firefox100', 'safari15'],
    outfile: 'app.js',
  });
  // The client alone, so that any page can `import { connect } from '/sluice-client.js'`.
  const client = await esbuild.build({
    ...COMMON,
    entryPoints: [resolve(root, 'src/index.ts')],
    format: 'esm',
    target: ['es2022', 'chrome100', 'firefox100', 'safari15'],
    outfile: 'sluice-client.js',
  });
  const css = await esbuild.build({
    ...COMMON,
    entryPoints: [resolve(root, 'page/app.css')],
    outfile: 'app.css',
  });
  return {
    'index.html': readFileSync(resolve(root, 'page/index.html'), 'utf8'),
    'app.js': js.outputFiles[0].text,
    'app.css': css.outputFiles[0].text,
    'sluice-client.js': client.outputFiles[0].text,
  };
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const files = await buildPage();
  if (process.argv.includes('--check')) {
    const stale = Object.entries(files).filter(
      ([name, text]) =>
        !existsSync(resolve(STATIC_DIR, name)) || readFileSync(resolve(STATIC_DIR, name), 'utf8') !== text,
    );
    if (stale.length > 0) {
      console.error(
        `server/static is stale (${stale.map(([n]) => n).join(', ')}): run \`npm run build\` in clients/js`,
      );
      process.exit(1);
    }
  } else {
    mkdirSync(STATIC_DIR, { recursive: true });
    for (const [name, text] of Object.entries(files)) writeFileSync(resolve(STATIC_DIR, name), text);
    execFileSync(
      process.execPath,
      [resolve(root, 'node_modules/typescript/bin/tsc'), '-p', resolve(root, 'tsconfig.lib.json')],
      {
        stdio: 'inherit',
      },
    );
    console.log(`built server/static (${Object.keys(files).join(', ')}) and dist/`);
  }
}
