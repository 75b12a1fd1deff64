// Pins the public API: a name added to or dropped from index.ts must be a decision, not a slip.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import * as api from '../../src/index.js';

test('index exports exactly the public runtime names', () => {
  assert.deepEqual(Object.keys(api).sort(), [
    'CLIENT_ERROR_CODES',
    'GenerateStream',
    'PROTOCOL_ERROR_CODES',
    'Session',
    'SluiceError',
    'ToolCall',
    'connect',
    'isRetryable',
  ]);
});

test('package.json exports point at the built entry and its types', async () => {
  const { readFile } = await import('node:fs/promises');
  const pkg = JSON.parse(await readFile(new URL('../../../package.json', import.meta.url), 'utf8'));
  assert.equal(pkg.type, 'module');
  assert.deepEqual(pkg.exports['.'], { types: './dist/index.d.ts', import: './dist/index.js' });
  assert.deepEqual(pkg.dependencies ?? {}, {}, 'the client has no runtime dependencies');
});
