#!/usr/bin/env bash
# The API contract as generated clients see it: generates a Python client (openapi-python-client)
# and a TypeScript client (openapi-typescript types for openapi-fetch) from the running API's
# /openapi.json, failing on any generator warning, then drives each against a real stack (a
# private redis-server, `fanout sim`, a worker, an aggregator and `fanout api`):
# tests/clients/client_test.py and tests/clients/client_test.ts.
#
# The generators are pinned: openapi-python-client in a venv under the cache dir, the npm tools
# by tests/clients/package-lock.json (`npm ci`). Needs python3 with venv, node and npm
# (scripts/install-deps.sh --clients).
#
# Env: FANOUT_CLIENTS_CACHE (default ~/.cache/fanout/generated-clients).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
OPENAPI_PYTHON_CLIENT=0.29.1
CACHE="${FANOUT_CLIENTS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fanout/generated-clients}"
for tool in redis-server python3 node npm; do
  command -v "$tool" >/dev/null || { echo "$tool is not installed (scripts/install-deps.sh --clients)" >&2; exit 2; }
done

# The generators.
VENV="$CACHE/venv-openapi-python-client-$OPENAPI_PYTHON_CLIENT"
if [ ! -x "$VENV/bin/openapi-python-client" ]; then
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "openapi-python-client==$OPENAPI_PYTHON_CLIENT"
fi
(cd tests/clients && npm ci --silent --no-audit --no-fund)

source scripts/lib/local-stack.sh
# A provider call takes a few hundred milliseconds: a report runs long enough to be cancelled,
# short enough to finish in a second or two.
start_redis_and_sim 0.05

TOKEN="clients-token-$(date +%s)"
export REDIS_URL="redis://127.0.0.1:$REDIS_PORT" \
  OPENAI_BASE_URL="http://127.0.0.1:$SIM_PORT/v1" \
  OPENAI_API_KEY="sk-clients-0000000000" \
  FANOUT_API_TOKENS="$TOKEN=tenant-a" \
  FANOUT_REDIS__NAMESPACE=clients \
  RUST_LOG="${RUST_LOG:-warn}"
start_fanout 20
wait_ready
curl -fsS "http://127.0.0.1:$API_PORT/openapi.json" -o "$WORK/openapi.json"

GEN="$ROOT/tests/clients/generated"
rm -rf "$GEN"
mkdir -p "$GEN"
status=0
on_failure() {
  echo "--- api log (tail) ---" >&2
  tail -n 30 "$WORK/api.log" >&2 || true
  exit 1
}

echo "python: openapi-python-client $OPENAPI_PYTHON_CLIENT"
# With the venv on PATH: the generator formats its output with the ruff it installed.
PATH="$VENV/bin:$PATH" openapi-python-client generate --path "$WORK/openapi.json" --meta none \
  --output-path "$GEN/python/fanout_api_client" --fail-on-warning >"$WORK/python-gen.log" 2>&1 || status=$?
if [ "$status" -ne 0 ] || grep -qi 'warning' "$WORK/python-gen.log"; then
  cat "$WORK/python-gen.log" >&2
  echo "openapi-python-client: warnings or errors" >&2
  exit 1
fi
PYTHONPATH="$GEN/python" FANOUT_URL="http://127.0.0.1:$API_PORT" FANOUT_TOKEN="$TOKEN" \
  "$VENV/bin/python" tests/clients/client_test.py || on_failure

echo "typescript: openapi-typescript + openapi-fetch"
status=0
(cd tests/clients && npx --no-install openapi-typescript "$WORK/openapi.json" \
  -o generated/typescript/schema.d.ts) >"$WORK/ts-gen.log" 2>&1 || status=$?
if [ "$status" -ne 0 ] || grep -qiE 'warn|error' "$WORK/ts-gen.log"; then
  cat "$WORK/ts-gen.log" >&2
  echo "openapi-typescript: warnings or errors" >&2
  exit 1
fi
# The type check is the point: the test must compile against the generated types.
(cd tests/clients && npx --no-install tsc -p tsconfig.json)
FANOUT_URL="http://127.0.0.1:$API_PORT" FANOUT_TOKEN="$TOKEN" \
  node tests/clients/generated/build/client_test.js || on_failure
echo "generated clients: ok"
