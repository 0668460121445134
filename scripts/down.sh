#!/usr/bin/env bash
# Stop the services and the nats-server started by scripts/up.sh (SIGTERM, then SIGKILL
# after 10 s). PostgreSQL is left running.
set -euo pipefail
cd "$(dirname "$0")/.."
for pidfile in $(ls .hodei/run/*.pid 2>/dev/null | grep -v nats-server) .hodei/run/nats-server.pid; do
  [ -f "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    echo "[down] stopped $(basename "$pidfile" .pid)"
  fi
  rm -f "$pidfile"
done
