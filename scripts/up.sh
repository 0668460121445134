#!/usr/bin/env bash
# Bring Hodei up on this machine and run a real job through it:
# NATS with JetStream and PostgreSQL (installed and started if missing), the database and
# its migrations, the five services and the outbox relay as background processes, then
# `hodei run` of a job whose output is printed here. Stop everything with scripts/down.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/setup.sh)"

STATE=.hodei
mkdir -p "$STATE/logs" "$STATE/run"
export HODEI_NATS_URL=${HODEI_NATS_URL:-nats://127.0.0.1:4222}
export HODEI_DATABASE_URL=${HODEI_DATABASE_URL:-$HODEI_PG_BASE_URL/hodei}

echo "[up] building"
cargo build --workspace --bins --quiet
BIN=target/debug

if ! psql "$HODEI_TEST_ADMIN_DATABASE_URL" -Atqc "select 1 from pg_database where datname = 'hodei'" | grep -q 1; then
  psql "$HODEI_TEST_ADMIN_DATABASE_URL" -qc "create database hodei"
fi

for service in relay scheduler dispatcher registry provider-manager audit; do
  pidfile=$STATE/run/$service.pid
  if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    echo "[up] $service already running (pid $(cat "$pidfile"))"
    continue
  fi
  setsid "$BIN/hodei-$service" >>"$STATE/logs/$service.log" 2>&1 </dev/null &
  echo $! >"$pidfile"
  echo "[up] started $service (pid $!), log $STATE/logs/$service.log"
done

echo "[up] waiting for the services to answer"
for _ in $(seq 100); do
  if "$BIN/hodei" --timeout-secs 1 list >/dev/null 2>&1 && "$BIN/hodei" --timeout-secs 1 workers >/dev/null 2>&1 \
     && "$BIN/hodei" --timeout-secs 1 audit --limit 1 >/dev/null 2>&1; then break; fi
  sleep 0.2
done

echo "[up] running a job: hodei run -- sh -c '...'"
echo "----------------------------------------------------------------------"
set +e
"$BIN/hodei" run -e GREETING="Hello from Hodei" -- sh -c 'echo "$GREETING: job $HODEI_JOB_ID on $(uname -n)"; echo "correlation id $HODEI_CORRELATION_ID"; ls / | head -3'
code=$?
set -e
echo "----------------------------------------------------------------------"
echo "[up] the job exited with $code. Its audit trail:"
job=$("$BIN/hodei" list --limit 1 --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["items"][0]["correlation_id"])')
"$BIN/hodei" audit --correlation-id "$job"
echo
echo "[up] Hodei is running. Try: $BIN/hodei run -- echo hi | $BIN/hodei list | $BIN/hodei workers"
echo "[up] Stop it with: scripts/down.sh"
exit "$code"
