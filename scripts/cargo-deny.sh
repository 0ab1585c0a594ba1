#!/usr/bin/env bash
# cargo deny (make lint; deny.toml): licenses, duplicate versions and sources always; advisories
# against the RustSec database, fetched from GitHub when it can be (else the last copy fetched),
# and skipped with a warning on a machine that has neither.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo deny --locked check licenses bans sources

db="${CARGO_HOME:-$HOME/.cargo}/advisory-dbs"
if timeout 120 cargo deny --locked fetch db >/dev/null 2>&1; then
  cargo deny --locked check --disable-fetch advisories
elif compgen -G "$db/advisory-db-*/.git" >/dev/null; then
  echo "warning: the RustSec advisory database could not be fetched: checking against the copy in $db" >&2
  cargo deny --locked check --disable-fetch advisories
else
  echo "warning: the RustSec advisory database cannot be fetched (no access to github.com) and there is no copy in $db: advisories NOT checked" >&2
fi
