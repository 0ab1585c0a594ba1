#!/usr/bin/env bash
# Installs what `make demo` and `make test` need beyond the Rust toolchain: redis-server (every
# test starts its own), promtool (Debian's `prometheus` package; the metrics test checks the
# exposition with it) and openssl (the TLS test's certificate). Idempotent: does nothing when everything is present.
set -euo pipefail

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
if [ "${1:-}" != "--demo" ]; then
  command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
  # The TLS test makes a self-signed certificate for its redis-server.
  command -v openssl >/dev/null 2>&1 || missing+=(openssl)
fi
[ ${#missing[@]} -eq 0 ] && exit 0

echo "installing ${missing[*]} (apt-get)" >&2
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# Only the binaries are needed: no service gets started.
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
