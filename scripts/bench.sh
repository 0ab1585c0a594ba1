#!/usr/bin/env bash
# Runs benchmarks and writes each one's result into BENCHMARKS.md, between its markers
# (scripts/bench-splice.sh); the blocks of benchmarks not run stay as they were. It measures;
# nothing here passes or fails on a time.
#
#   scripts/bench.sh [NAME...]          (make bench runs them all; make bench BENCH="NAME...")
#
#   reports        the startup report and a persona panel against their critical paths
#   budget         the shared-budget matrix: real worker processes against every provider shape
#                  (about 25 minutes)
#   memory         one worker's resident memory with 1,000 calls in flight
#   queue          queue_bench: no-op jobs/s, Redis commands per job, idle pick-up latency
#   budget-script  budget_bench: admissions/s and Redis time per budget script call
#   waiting-room   waiting_room: 4,000 callers waiting on one budget of 30,000 RPM
#   cluster        cluster_bench: one redis-server against a 3-master Redis Cluster, 3 rounds:
#                  no-op jobs/s, report wall time, each master's load at 30,000 RPM (~8 minutes)
#   batch          batch_bench: a 50-persona panel live and through the Batch API, 3 rounds:
#                  cost and wall time (~2 minutes)
#
# The queue against BullMQ is `make bench-bullmq` (bench/bullmq/run.sh; it needs node). Each
# output is also kept in $CARGO_TARGET_DIR/bench/NAME.md (target/bench/ by default).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cargo=${CARGO:-cargo}
target=${CARGO_TARGET_DIR:-$root/target}
out=$target/bench
all=(reports budget memory queue budget-script waiting-room cluster batch)
if [[ $# -gt 0 ]]; then names=("$@"); else names=("${all[@]}"); fi

# The command that reproduces each benchmark, as BENCHMARKS.md shows it.
command_for() {
  case $1 in
    reports | budget | memory) echo "target/release/fanout bench --only $1" ;;
    queue) echo "cargo run --release --locked -p fanout-queue --example queue_bench" ;;
    budget-script) echo "cargo run --release --locked -p fanout-ratelimit --example budget_bench" ;;
    waiting-room) echo "cargo run --release --locked -p fanout-ratelimit --example waiting_room" ;;
    cluster) echo "cargo run --release --locked -p fanout-cli --example cluster_bench" ;;
    batch) echo "cargo run --release --locked -p fanout-cli --example batch_bench" ;;
    *) return 1 ;;
  esac
}
for name in "${names[@]}"; do
  command_for "$name" >/dev/null || {
    echo "bench.sh: no benchmark named '$name' (one of: ${all[*]}; bullmq is make bench-bullmq)" >&2
    exit 2
  }
done

cd "$root"
"$cargo" build --release --locked -p fanout-cli
fanout=$target/release/fanout
mkdir -p "$out"
for name in "${names[@]}"; do
  echo "== $name: $(command_for "$name")"
  case $name in
    reports | budget | memory) "$fanout" bench --only "$name" ;;
    queue) "$cargo" run --quiet --release --locked -p fanout-queue --example queue_bench ;;
    budget-script) "$cargo" run --quiet --release --locked -p fanout-ratelimit --example budget_bench ;;
    waiting-room) "$cargo" run --quiet --release --locked -p fanout-ratelimit --example waiting_room ;;
    cluster)
      # It runs target/release/fanout and queue_bench as child processes.
      "$cargo" build --quiet --release --locked -p fanout-queue --example queue_bench
      "$cargo" run --quiet --release --locked -p fanout-cli --example cluster_bench
      ;;
    batch)
      # It runs target/release/fanout as child processes.
      "$cargo" run --quiet --release --locked -p fanout-cli --example batch_bench
      ;;
  esac | tee "$out/$name.md"
  scripts/bench-splice.sh "$name" "$out/$name.md" "$(command_for "$name")"
  echo
done
