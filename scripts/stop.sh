#!/usr/bin/env bash
# `make stop`: stop exactly what scripts/serve.sh started (process groups from its pid files).
set -uo pipefail
cd "$(dirname "$0")/.."
RUN_DIR=$(realpath -m "${M3DR_SERVE_DIR:-$PWD/.serve}")
for name in worker server; do
  pidfile="$RUN_DIR/$name.pid"
  [ -f "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    echo "stopped $name (pid $pid)"
  fi
  rm -f "$pidfile"
done
