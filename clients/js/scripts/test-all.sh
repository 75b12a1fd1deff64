#!/usr/bin/env bash
# Everything the JS client is tested with, from a fresh checkout: installs the node packages
# (npm ci, from the committed lock file) and Debian's Chromium when they are missing, then runs
# the unit tests, the integration tests (Node against the real server) and the browser tests
# (the chat page in headless Chromium). Integration and browser tests start `sluice serve` and
# the Ollama emulator themselves and skip, saying why, when the server side is not there.
# Usage (from anywhere): bash clients/js/scripts/test-all.sh
set -euo pipefail
cd "$(dirname "$0")/.."

# playwright-core never downloads a browser; this makes sure nothing else tries either.
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1
CHROMIUM="${CHROMIUM_PATH:-/usr/bin/chromium}"

if ! command -v node >/dev/null 2>&1 || [ "$(node -p 'process.versions.node.split(".")[0]')" -lt 20 ]; then
  echo "test-all.sh: Node 20 or newer is required" >&2
  exit 1
fi
if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --no-audit --no-fund --loglevel=error
fi
if [ ! -x "$CHROMIUM" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "test-all.sh: no Chromium at $CHROMIUM and cannot install it: the browser tests will skip" >&2
  fi
fi

# Formatted, and type-checked without Node's types (the package runs in browsers too).
npx prettier --check --log-level warn src test page scripts
npx tsc -p tsconfig.lib.json --noEmit
npx tsc -p tsconfig.json
# One at a time: the integration and browser files each start a server, and the machine is small.
node --test --test-concurrency=1 .build/test/unit/ .build/test/integration/ .build/test/browser/
