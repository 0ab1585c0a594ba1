#!/usr/bin/env bash
# Installs what `make demo`, `make test` and `make api-clients` need beyond the Rust toolchain:
# redis-server (every test starts its own) and redis-cli (`--cluster create` makes the tests'
# local Redis Clusters), promtool (Debian's `prometheus` package; the metrics
# test checks the exposition with it) and openssl (the TLS test's certificate); with --clients,
# python3's venv, node and npm (scripts/generated-clients.sh generates and runs API clients) and
# curl; Debian's chromium and chromium-driver (the web UI's test drives a real headless browser);
# with --lint, cargo-deny (from crates.io, built once: a few minutes). Idempotent: does
# nothing when everything is present.
#
# Usage: install-deps.sh [--demo | --clients | --lint]
set -euo pipefail

mode="${1:-}"
if [ "$mode" = --lint ]; then
  if ! cargo deny --version >/dev/null 2>&1; then
    echo "installing cargo-deny (cargo install)" >&2
    cargo install --locked cargo-deny@0.19.4
  fi
  exit 0
fi
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
case "$mode" in
  --demo) ;;
  --clients)
    command -v curl >/dev/null 2>&1 || missing+=(curl)
    # Debian's python3 has `venv` but not `ensurepip` without python3-venv.
    python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
    command -v node >/dev/null 2>&1 || missing+=(nodejs)
    command -v npm >/dev/null 2>&1 || missing+=(npm)
    ;;
  *)
    command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
    # The TLS test makes a self-signed certificate for its redis-server.
    command -v openssl >/dev/null 2>&1 || missing+=(openssl)
    # The web UI test (tests/ui.rs) drives Debian's Chromium through ChromeDriver.
    command -v chromium >/dev/null 2>&1 || missing+=(chromium)
    command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
    ;;
esac
[ ${#missing[@]} -eq 0 ] && exit 0

echo "installing ${missing[*]} (apt-get)" >&2
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# Only the binaries are needed: no service gets started.
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
