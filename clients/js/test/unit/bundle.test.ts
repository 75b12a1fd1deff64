// The chat page the server serves (server/static) must be exactly what page/ and src/ build to
// now: a change to the client or the page without `npm run build` fails here.
import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';

const root = fileURLToPath(new URL('../../../', import.meta.url));

test('server/static equals a fresh build of the chat page', async () => {
  const { buildPage, STATIC_DIR } = (await import(resolve(root, 'scripts/build.mjs'))) as {
    buildPage(): Promise<Record<string, string>>;
    STATIC_DIR: string;
  };
  const fresh = await buildPage();
  assert.deepEqual(Object.keys(fresh).sort(), ['app.css', 'app.js', 'index.html', 'sluice-client.js']);
  for (const [name, text] of Object.entries(fresh)) {
    const path = resolve(STATIC_DIR, name);
    assert.ok(existsSync(path), `server/static/${name} is missing: run \`npm run build\` in clients/js`);
    assert.ok(
      readFileSync(path, 'utf8') === text,
      `server/static/${name} is stale: run \`npm run build\` in clients/js`,
    );
  }
});

test('the page loads its own assets only, with relative URLs', () => {
  const html = readFileSync(resolve(root, 'page/index.html'), 'utf8');
  assert.match(html, /<script type="module" src="app\.js"><\/script>/);
  assert.match(html, /<link rel="stylesheet" href="app\.css" \/>/);
  assert.doesNotMatch(html, /https?:\/\//, 'no external resources');
});
