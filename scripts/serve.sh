#!/usr/bin/env bash
# `make serve`: a local Prefect server (SQLite, UI) + the `m3dr-process` work pool + every deployment
# of prefect.yaml + one process worker. Each service runs in its own session; its pid (= process group)
# goes to $M3DR_SERVE_DIR/*.pid so `make stop` (scripts/stop.sh) stops exactly what this started.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BIN=${M3DR_BIN:-$ROOT/.venv/bin}
RUN_DIR=$(realpath -m "${M3DR_SERVE_DIR:-$ROOT/.serve}")
HOST=${M3DR_SERVE_HOST:-127.0.0.1}
PORT=${M3DR_SERVE_PORT:-4200}
POOL=${M3DR_POOL:-m3dr-process}
export PREFECT_HOME=${PREFECT_HOME:-$RUN_DIR/prefect-home}
export PREFECT_API_URL=http://$HOST:$PORT/api
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export M3DR_ROOT=$ROOT
mkdir -p "$RUN_DIR" "$PREFECT_HOME"

alive() { [ -f "$RUN_DIR/$1.pid" ] && kill -0 "$(cat "$RUN_DIR/$1.pid")" 2>/dev/null; }

if alive server; then
  echo "already running (pid $(cat "$RUN_DIR/server.pid")); 'make stop' first" >&2
  exit 1
fi

setsid "$BIN/prefect" server start --host "$HOST" --port "$PORT" >"$RUN_DIR/server.log" 2>&1 </dev/null &
echo $! >"$RUN_DIR/server.pid"
for _ in $(seq 120); do
  if curl -sf "$PREFECT_API_URL/health" >/dev/null; then break; fi
  alive server || { echo "server exited; see $RUN_DIR/server.log" >&2; tail -20 "$RUN_DIR/server.log" >&2; exit 1; }
  sleep 1
done
curl -sf "$PREFECT_API_URL/health" >/dev/null || { echo "server did not answer in 120 s" >&2; exit 1; }

"$BIN/prefect" work-pool create "$POOL" --type process --overwrite >/dev/null
"$BIN/prefect" --no-prompt deploy --all >"$RUN_DIR/deploy.log" 2>&1 || {
  echo "prefect deploy failed; see $RUN_DIR/deploy.log" >&2; tail -20 "$RUN_DIR/deploy.log" >&2; exit 1; }

setsid "$BIN/prefect" worker start --pool "$POOL" >"$RUN_DIR/worker.log" 2>&1 </dev/null &
echo $! >"$RUN_DIR/worker.pid"

cat <<MSG
Prefect UI      : http://$HOST:$PORT
API             : $PREFECT_API_URL   (export PREFECT_API_URL=$PREFECT_API_URL in other shells)
work pool       : $POOL (worker pid $(cat "$RUN_DIR/worker.pid"), log $RUN_DIR/worker.log)
deployments     : synthesize/tiny, refresh/nightly (cron, paused), train-netra/tiny, benchmark-nayana/tiny, export-dataset/tiny
try             : prefect deployment run synthesize/tiny && prefect deployment run train-netra/tiny
stop            : make stop
MSG
