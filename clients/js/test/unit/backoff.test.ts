import assert from 'node:assert/strict';
import { test } from 'node:test';
import { backoffDelay } from '../../src/backoff.js';

const options = { minDelayMs: 100, maxDelayMs: 2000 };

test('the delay grows exponentially with full jitter and stays within [min, max]', () => {
  assert.equal(
    backoffDelay(0, options, () => 0),
    100,
  );
  assert.equal(
    backoffDelay(0, options, () => 1),
    200,
  );
  assert.equal(
    backoffDelay(2, options, () => 1),
    800,
  );
  assert.equal(
    backoffDelay(2, options, () => 0.5),
    450,
  );
  assert.equal(
    backoffDelay(10, options, () => 1),
    2000,
  );
  assert.equal(
    backoffDelay(1000, options, () => 1),
    2000,
  );
  for (let attempt = 0; attempt < 50; attempt += 1) {
    const delay = backoffDelay(attempt, options);
    assert.ok(delay >= 100 && delay <= 2000, `attempt ${attempt}: ${delay}`);
  }
});

test('jitter spreads clients that reconnect at once', () => {
  const delays = new Set(Array.from({ length: 50 }, () => backoffDelay(4, options)));
  assert.ok(delays.size > 10, `only ${delays.size} distinct delays`);
});
