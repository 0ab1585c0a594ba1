# A private local stack for the scripts that drive the API from outside (schemathesis.sh,
# generated-clients.sh): sourced, not run. Loopback only; everything stops when the script exits.
#
#   source scripts/lib/local-stack.sh   # builds fanout, picks ports, sets WORK and the exit trap
#   start_redis_and_sim <time-scale>    # redis-server and `fanout sim` (REDIS_PORT, SIM_PORT)
#   export REDIS_URL=… OPENAI_BASE_URL=… …   # the caller's environment for the fanout processes
#   start_fanout <worker concurrency>   # `fanout api` on API_PORT, a worker, an aggregator
#   wait_ready                          # until /readyz answers; prints the api's log if never

cargo build --locked -q -p fanout-cli
BIN="${CARGO_TARGET_DIR:-target}/debug"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
REDIS_PORT=$(free_port); SIM_PORT=$(free_port); API_PORT=$(free_port)
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

start_redis_and_sim() {
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$WORK" \
    --loglevel warning >"$WORK/redis.log" 2>&1 &
  PIDS+=($!)
  "$BIN/fanout" sim --listen "127.0.0.1:$SIM_PORT" --time-scale "$1" >"$WORK/sim.log" 2>&1 &
  PIDS+=($!)
}

start_fanout() {
  "$BIN/fanout" api --listen "127.0.0.1:$API_PORT" >"$WORK/api.log" 2>&1 &
  PIDS+=($!)
  "$BIN/fanout" worker --concurrency "$1" >"$WORK/worker.log" 2>&1 &
  PIDS+=($!)
  "$BIN/fanout" aggregator >"$WORK/aggregator.log" 2>&1 &
  PIDS+=($!)
}

wait_ready() {
  for _ in $(seq 1 300); do
    curl -fsS "http://127.0.0.1:$API_PORT/readyz" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "the api did not become ready; its log:" >&2
  cat "$WORK/api.log" >&2 || true
  return 1
}
