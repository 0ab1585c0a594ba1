#!/usr/bin/env bash
# Fanout's queue against BullMQ, side by side on one private redis-server on this machine:
# crates/fanout-queue/examples/queue_bench.rs, then bench/bullmq/bench.mjs, same jobs and
# concurrency, then both tables and the ratios. It measures; it does not pass or fail.
#
#   bench/bullmq/run.sh [jobs=50000] [concurrency=64]      (or: make bench-bullmq)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
jobs=${1:-50000}
concurrency=${2:-64}
cargo=${CARGO:-cargo}

for tool in redis-server redis-cli node npm "$cargo"; do
  command -v "$tool" >/dev/null || { echo "run.sh: $tool not found (scripts/install-deps.sh installs redis-server)" >&2; exit 1; }
done
if [[ ! -d "$here/node_modules" ]]; then
  (cd "$here" && npm ci --no-audit --no-fund)
fi
(cd "$root" && "$cargo" build --release --locked -p fanout-queue --example queue_bench)

port=$(node -e 'const s=require("net").createServer().listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})')
dir=$(mktemp -d)
out=$(mktemp -d)
redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$dir" \
  --loglevel warning >"$dir/redis.log" 2>&1 &
redis_pid=$!
cleanup() {
  kill "$redis_pid" 2>/dev/null || true
  wait "$redis_pid" 2>/dev/null || true
  rm -rf "$dir" "$out"
}
trap cleanup EXIT
for _ in $(seq 100); do
  redis-cli -p "$port" ping >/dev/null 2>&1 && break
  sleep 0.1
done
redis-cli -p "$port" ping >/dev/null
url="redis://127.0.0.1:$port"
echo "redis-server $(redis-server --version | grep -o 'v=[^ ]*') on $url, $(nproc) cores, node $(node --version)"
echo

echo "## Fanout (queue_bench)"
(cd "$root" && "$cargo" run --quiet --release --locked -p fanout-queue --example queue_bench -- \
  "$jobs" "$concurrency" --redis-url "$url") | tee "$out/fanout.md"
echo
redis-cli -p "$port" flushall >/dev/null

echo "## BullMQ (bench/bullmq/bench.mjs)"
(cd "$here" && node bench.mjs "$port" "$jobs" "$concurrency") | tee "$out/bullmq.md"
echo

# Rows of the throughput tables: | processes | jobs | enqueue/s | process/s | cmds/job | ...
row() { awk -F'|' -v p="$2" -v j="$jobs" '$2+0==p && $3+0==j {gsub(/ /,""); print $'"$3"'}' "$1"; }
echo "## Side by side ($jobs no-op jobs, concurrency $concurrency per process, one redis-server)"
echo
echo "| worker processes | Fanout jobs/s | BullMQ jobs/s | Fanout / BullMQ | Fanout cmds/job | BullMQ cmds/job |"
echo "|---:|---:|---:|---:|---:|---:|"
for p in 1 2; do
  f=$(row "$out/fanout.md" "$p" 5); b=$(row "$out/bullmq.md" "$p" 5)
  fc=$(row "$out/fanout.md" "$p" 6); bc=$(row "$out/bullmq.md" "$p" 6)
  ratio=$(awk -v f="$f" -v b="$b" 'BEGIN { if (b > 0) printf "%.2f×", f / b; else print "n/a" }')
  echo "| $p | $f | $b | $ratio | $fc | $bc |"
done
