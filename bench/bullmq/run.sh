#!/usr/bin/env bash
# Fanout's queue against BullMQ, side by side on one private redis-server on this machine:
# crates/fanout-queue/examples/queue_bench.rs and bench/bullmq/bench.mjs, same jobs and
# concurrency, ROUNDS times with the order alternating (Fanout first in odd rounds, BullMQ first
# in even ones), then every run's figures and their range, written into BENCHMARKS.md
# (scripts/bench-splice.sh, block `bullmq`). The ratio moves a lot between runs on a shared
# machine, so every run is shown. It measures; it does not pass or fail.
#
#   bench/bullmq/run.sh [jobs=50000] [concurrency=64] [rounds=3]      (or: make bench-bullmq)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
jobs=${1:-50000}
concurrency=${2:-64}
rounds=${3:-3}
cargo=${CARGO:-cargo}
results=${CARGO_TARGET_DIR:-$root/target}/bench

for tool in redis-server redis-cli node npm "$cargo"; do
  command -v "$tool" >/dev/null || {
    echo "run.sh: $tool not found (scripts/install-deps.sh installs redis-server; node 20+ and npm come from your distribution)" >&2
    exit 1
  }
done
# The committed lock file pins BullMQ and everything under it.
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
redis_version=$(redis-server --version | grep -o 'v=[^ ]*' | cut -c3-)
bullmq_version=$(cd "$here" && node -p 'require("bullmq/package.json").version')
echo "redis-server $redis_version on $url, $(nproc) cores, node $(node --version), bullmq $bullmq_version"
echo

fanout() {
  echo "## Run $1: Fanout (queue_bench)"
  (cd "$root" && "$cargo" run --quiet --release --locked -p fanout-queue --example queue_bench -- \
    "$jobs" "$concurrency" --redis-url "$url") | tee "$out/fanout-$1.md"
  echo
  redis-cli -p "$port" flushall >/dev/null
}
bullmq() {
  echo "## Run $1: BullMQ (bench/bullmq/bench.mjs)"
  (cd "$here" && node bench.mjs "$port" "$jobs" "$concurrency") | tee "$out/bullmq-$1.md"
  echo
  redis-cli -p "$port" flushall >/dev/null
}
for run in $(seq "$rounds"); do
  if ((run % 2 == 1)); then fanout "$run"; bullmq "$run"; else bullmq "$run"; fanout "$run"; fi
done

# A field of a throughput table's row: | processes | jobs | enqueue/s | process/s | cmds/job |
# enqueue cmds/job | worker cmds/job |, for `processes` worker processes.
field() { awk -F'|' -v p="$2" -v j="$jobs" -v f="$3" '$2+0==p && $3+0==j { gsub(/ /, "", $f); print $f }' "$1"; }
# Total commands per job, then enqueue + worker.
cmds() { echo "$(field "$1" "$2" 6) ($(field "$1" "$2" 7) + $(field "$1" "$2" 8))"; }
thousands() { awk -v n="$1" 'BEGIN { s = sprintf("%.0f", n); while (s ~ /[0-9][0-9][0-9][0-9]/) sub(/[0-9][0-9][0-9]($|,)/, ",&", s); print s }'; }
report=$(mktemp)
{
  echo "bench-bullmq: $jobs no-op jobs, concurrency $concurrency per worker process, $rounds runs," \
    "one private redis-server $redis_version; BullMQ $bullmq_version on node $(node --version)."
  echo
  echo "| run (first) | worker processes | Fanout jobs/s | BullMQ jobs/s | Fanout / BullMQ | Fanout cmds/job (enqueue + worker) | BullMQ cmds/job (enqueue + worker) |"
  echo "|---|---:|---:|---:|---:|---:|---:|"
  for run in $(seq "$rounds"); do
    if ((run % 2 == 1)); then first=Fanout; else first=BullMQ; fi
    for p in 1 2; do
      f=$(field "$out/fanout-$run.md" "$p" 5)
      b=$(field "$out/bullmq-$run.md" "$p" 5)
      ratio=$(awk -v f="$f" -v b="$b" 'BEGIN { if (b > 0) printf "%.2f", f / b; else print "n/a" }')
      echo "| $run ($first) | $p | $(thousands "$f") | $(thousands "$b") | ${ratio}× | $(cmds "$out/fanout-$run.md" "$p") | $(cmds "$out/bullmq-$run.md" "$p") |"
      echo "$p $f $b $ratio" >>"$out/ratios"
    done
  done
  echo
  for p in 1 2; do
    awk -v p="$p" -v n="$rounds" '
      function fmt(x) { s = sprintf("%.0f", x); while (s ~ /[0-9][0-9][0-9][0-9]/) sub(/[0-9][0-9][0-9]($|,)/, ",&", s); return s }
      $1 == p {
        if (!seen++) { rmin = rmax = $4; fmin = fmax = $2; bmin = bmax = $3 }
        if ($4 < rmin) rmin = $4; if ($4 > rmax) rmax = $4
        if ($2 < fmin) fmin = $2; if ($2 > fmax) fmax = $2
        if ($3 < bmin) bmin = $3; if ($3 > bmax) bmax = $3
      }
      END {
        printf "- **%d worker process%s:** Fanout / BullMQ %.2f–%.2f× over %d runs (Fanout %s–%s jobs/s, BullMQ %s–%s jobs/s).\n",
          p, (p == 1 ? "" : "es"), rmin, rmax, n, fmt(fmin), fmt(fmax), fmt(bmin), fmt(bmax)
      }' "$out/ratios"
  done
  echo
  echo "<details><summary>Redis commands per job by command, run 1</summary>"
  echo
  grep -h '^- ' "$out/fanout-1.md" | sed 's/^- /- Fanout, /'
  grep -h '^- ' "$out/bullmq-1.md" | sed 's/^- /- BullMQ, /'
  echo
  echo "</details>"
} >"$report"
mkdir -p "$results"
cp "$report" "$results/bullmq.md"
rm -f "$report"
echo "## Side by side"
echo
cat "$results/bullmq.md"
echo
command="bench/bullmq/run.sh $jobs $concurrency $rounds"
if [[ "$jobs $concurrency $rounds" == "50000 64 3" ]]; then command="make bench-bullmq"; fi
"$root/scripts/bench-splice.sh" bullmq "$results/bullmq.md" "$command"
