// The client's error codes are PROTOCOL.md's closed set: checked against the server's schema and
// its ErrorCode enum, so neither side can add or rename a code alone.
import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import { test } from 'node:test';
import { CLIENT_ERROR_CODES, isRetryable, PROTOCOL_ERROR_CODES, toErrorCode } from '../../src/codes.js';
import { fromResponse, fromWire, SluiceError } from '../../src/errors.js';

const repo = new URL('../../../../../', import.meta.url);
const schemaPath = new URL('protocol/schema/messages.schema.json', repo);

test('protocol codes equal protocol/errors.py ErrorCode', () => {
  const source = readFileSync(new URL('protocol/errors.py', repo), 'utf8');
  const block = source.slice(
    source.indexOf('class ErrorCode'),
    source.indexOf('\n\n\n', source.indexOf('class ErrorCode')),
  );
  const codes = [...block.matchAll(/^\s+[A-Z_]+ = "([a-z_]+)"$/gm)].map((m) => m[1]);
  assert.deepEqual([...PROTOCOL_ERROR_CODES], codes);
});

test('protocol codes equal the JSON Schema enum', (t) => {
  if (!existsSync(schemaPath)) {
    t.skip('protocol/schema/messages.schema.json is not committed yet');
    return;
  }
  const text = readFileSync(schemaPath, 'utf8');
  const enums: string[][] = [];
  JSON.parse(text, (key, value) => {
    if (key === 'enum' && Array.isArray(value) && value.includes('invalid_message')) enums.push(value);
    return value;
  });
  assert.ok(enums.length > 0, 'the schema names the error codes');
  for (const found of enums) assert.deepEqual([...found].sort(), [...PROTOCOL_ERROR_CODES].sort());
});

test('retryable codes match protocol/errors.py, plus the client-only transient ones', () => {
  const source = readFileSync(new URL('protocol/errors.py', repo), 'utf8');
  const block = source.slice(
    source.indexOf('_RETRYABLE'),
    source.indexOf(')', source.indexOf('_RETRYABLE')) + 40,
  );
  const names = [...block.matchAll(/ErrorCode\.([A-Z_]+)/g)].map((m) => m[1]!.toLowerCase());
  assert.deepEqual(PROTOCOL_ERROR_CODES.filter(isRetryable).sort(), names.sort());
  assert.deepEqual(CLIENT_ERROR_CODES.filter(isRetryable).sort(), ['connection_failed', 'session_lost']);
});

test('an unknown code from a newer server becomes internal', () => {
  assert.equal(toErrorCode('brand_new_code'), 'internal');
  assert.equal(toErrorCode(42), 'internal');
  assert.equal(toErrorCode('rate_limited'), 'rate_limited');
});

test('a wire error maps every field', () => {
  const error = fromWire({
    type: 'error',
    id: 'r1',
    seq: 3,
    code: 'rate_limited',
    message: 'slow down',
    retryable: true,
    retry_after_ms: 1500,
  } as never);
  assert.ok(error instanceof SluiceError);
  assert.ok(error instanceof Error);
  assert.equal(error.name, 'SluiceError');
  assert.equal(error.code, 'rate_limited');
  assert.equal(error.message, 'slow down');
  assert.equal(error.retryable, true);
  assert.equal(error.retryAfterMs, 1500);
  assert.equal(error.requestId, 'r1');
  const refused = fromWire({ code: 'duplicate_id', message: 'dup', retryable: false, ref: 'r9' });
  assert.equal(refused.requestId, 'r9');
  assert.equal(refused.retryAfterMs, undefined);
});

test('an HTTP typed error body maps; a bare status falls back to a code', async () => {
  const typed = await fromResponse(
    new Response(JSON.stringify({ error: { code: 'unauthorized', message: 'bad key', retryable: false } }), {
      status: 401,
    }),
  );
  assert.equal(typed.code, 'unauthorized');
  assert.equal(typed.message, 'bad key');
  assert.equal(typed.retryable, false);
  const limited = await fromResponse(
    new Response(JSON.stringify({ error: { code: 'rate_limited', message: 'later', retryable: true } }), {
      status: 429,
      headers: { 'retry-after': '2' },
    }),
  );
  assert.equal(limited.retryAfterMs, 2000);
  const bare = await fromResponse(new Response('<html>bad gateway</html>', { status: 503 }));
  assert.equal(bare.code, 'overloaded');
  assert.equal(bare.retryable, true);
  const notFound = await fromResponse(new Response('{"detail":"Not Found"}', { status: 404 }));
  assert.equal(notFound.code, 'invalid_request');
});
