#!/usr/bin/env bash
# `make stop`: stop exactly what scripts/serve.sh started (process groups from its pid files).
set -uo pipefail
cd "$(dirname "$0")/.."
RUN_DIR=$(realpath -m "${M3DR_SERVE_DIR:-$PWD/.serve}")
# Seconds a service gets to exit after SIGTERM before SIGKILL. Prefect 3.8.8's `prefect worker start`
# answers SIGTERM/SIGINT with "Sending SIGINT to the process worker" and then stays up while idle (seen),
# so the worker always uses its whole grace: keep it short where nothing runs (tests set 6; the
# server exits on SIGTERM in ~4 s).
GRACE_S=${M3DR_STOP_GRACE_S:-15}
for name in worker server; do
  pidfile="$RUN_DIR/$name.pid"
  [ -f "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
    for _ in $(seq $((GRACE_S * 2))); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    # "stopped" means gone: a SIGKILLed process with a large heap takes a moment to exit
    for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    echo "stopped $name (pid $pid)"
  fi
  rm -f "$pidfile"
done
