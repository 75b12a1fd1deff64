// src/messages.gen.ts must be exactly what the server's committed JSON Schema generates, so the
// client's message types cannot drift from the server's messages.
import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';

const root = new URL('../../../', import.meta.url);
const schema = new URL('../../protocol/schema/messages.schema.json', root);

test('messages.gen.ts equals a fresh generation from protocol/schema/messages.schema.json', async (t) => {
  if (!existsSync(schema)) {
    t.skip('protocol/schema/messages.schema.json is not committed yet');
    return;
  }
  const { generate } = (await import(fileURLToPath(new URL('scripts/gen-types.mjs', root)))) as {
    generate(path: string): Promise<string>;
  };
  const fresh = await generate(fileURLToPath(schema));
  const committed = readFileSync(new URL('src/messages.gen.ts', root), 'utf8');
  assert.ok(
    committed === fresh,
    'src/messages.gen.ts is stale: run `npm run gen` in clients/js and commit it',
  );
});

test('the generated types cover every message of the protocol', () => {
  const committed = readFileSync(new URL('src/messages.gen.ts', root), 'utf8');
  for (const name of [
    'Hello',
    'Embed',
    'Classify',
    'Cancel',
    'Ping',
    'Ack',
    'Welcome',
    'Delta',
    'Done',
    'Embedding',
    'Classification',
    'Error',
    'Pong',
    'Goaway',
  ]) {
    assert.match(committed, new RegExp(`export interface ${name} \\{`), name);
  }
  assert.match(committed, /export type Generate = /);
});
