#!/usr/bin/env bash
# The fault suite (tests/chaos.rs), the Redis Cluster failovers (tests/failover.rs) and the load
# bursts (tests/load.rs) at soak size (FANOUT_SOAK=1), then the figures they print (`chaos:`,
# `failover:` and `load:` lines) written into
# docs/reliability.md between its `soak-figures` markers, with the date, commit and machine.
# A failing scenario fails the run and leaves the document as it was.
#
# Usage: scripts/soak.sh            (what `make soak` runs)
set -euo pipefail
cd "$(dirname "$0")/.."

doc=docs/reliability.md
log=$(mktemp)
block=$(mktemp)
trap 'rm -f "$log" "$block"' EXIT

started=$(date +%s)
for t in chaos failover load; do
  set +e
  FANOUT_SOAK=1 "${CARGO:-cargo}" test --release --locked -p fanout-cli --test "$t" \
    -- --nocapture --test-threads 1 2>&1 | tee -a "$log"
  status=${PIPESTATUS[0]}
  set -e
  [ "$status" -eq 0 ] || { echo "soak: $t failed; $doc not updated" >&2; exit 1; }
done
minutes=$(( ($(date +%s) - started + 59) / 60 ))

cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
mem=$(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo)
{
  echo "<!-- soak-figures: written by scripts/soak.sh (make soak); do not edit by hand -->"
  echo
  echo "\`make soak\` on $(date -u +%Y-%m-%d), commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- crates tests || echo ' with local changes'),"
  echo "$(nproc) cores ($cpu), $mem; $minutes minutes in all. Every line is one scenario's figures:"
  echo
  echo '```text'
  grep -E '^(chaos|failover|load): ' "$log" | sed -E 's/^(chaos|load): //'
  echo '```'
  echo
  echo "<!-- /soak-figures -->"
} > "$block"
awk -v block="$block" '
  /^<!-- soak-figures/ { while ((getline line < block) > 0) print line; skip = 1; next }
  /^<!-- \/soak-figures -->/ { skip = 0; next }
  !skip { print }
' "$doc" > "$doc.new"
mv "$doc.new" "$doc"
echo "soak: figures written to $doc"
