#!/usr/bin/env bash
# Bring Hodei up on this machine and run a real job through it:
# PostgreSQL (installed and started if missing) with the database, its owner (who runs the
# migrations) and the services' role (only the grants they use); NATS with JetStream and
# authentication (operator, accounts and every credential made on first run under
# .hodei/nats, never committed); the five services and the outbox relay as background
# processes, each as its own NATS user; then `hodei run` of a job whose output is printed
# here. Stop everything with scripts/down.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/setup.sh)"

STATE=.hodei
mkdir -p "$STATE/logs" "$STATE/run"
NATS_PORT=${HODEI_NATS_PORT:-4222}
export HODEI_NATS_URL=${HODEI_NATS_URL:-nats://127.0.0.1:$NATS_PORT}
PG_HOSTPORT=${HODEI_PG_BASE_URL##*@}

echo "[up] building"
cargo build --workspace --bins --quiet
BIN=target/debug

# --- PostgreSQL: the database, its owner and the services' role ---------------------------
# Passwords are made once and kept (owner-only) under .hodei/; nothing runs as a superuser.
secret() { [ -s "$STATE/$1" ] || (umask 077; python3 -c 'import secrets; print(secrets.token_hex(16))' >"$STATE/$1"); cat "$STATE/$1"; }
OWNER_PW=$(secret pg-owner.password)
APP_PW=$(secret pg-app.password)
psql "$HODEI_TEST_ADMIN_DATABASE_URL" -v ON_ERROR_STOP=1 -q <<SQL
SELECT 'CREATE ROLE hodei_owner LOGIN' WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'hodei_owner')\gexec
SELECT 'CREATE ROLE hodei_app LOGIN' WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'hodei_app')\gexec
ALTER ROLE hodei_owner PASSWORD '$OWNER_PW' NOSUPERUSER NOCREATEDB NOCREATEROLE;
ALTER ROLE hodei_app PASSWORD '$APP_PW' NOSUPERUSER NOCREATEDB NOCREATEROLE;
SELECT 'CREATE DATABASE hodei OWNER hodei_owner' WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = 'hodei')\gexec
SQL
OWNER_URL="postgres://hodei_owner:$OWNER_PW@$PG_HOSTPORT/hodei"
export HODEI_DATABASE_URL=${HODEI_DATABASE_URL:-postgres://hodei_app:$APP_PW@$PG_HOSTPORT/hodei}
echo "[up] migrations, as the database's owner"
HODEI_DATABASE_URL=$OWNER_URL HODEI_MIGRATE=only "$BIN/hodei-relay" >>"$STATE/logs/migrate.log" 2>&1
psql "$OWNER_URL" -v ON_ERROR_STOP=1 -q <<SQL
GRANT CONNECT, TEMPORARY ON DATABASE hodei TO hodei_app;
GRANT USAGE ON SCHEMA public TO hodei_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO hodei_app;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO hodei_app;
REVOKE ALL ON _sqlx_migrations FROM hodei_app;
GRANT SELECT ON _sqlx_migrations TO hodei_app;
SQL

# --- NATS: keys and credentials (first run), configuration, server -------------------------
NATS_DIR=$STATE/nats
"$BIN/hodei" auth init --dir "$NATS_DIR" --listen "127.0.0.1:$NATS_PORT" --store-dir "$NATS_DIR/store" >/dev/null
pidfile=$STATE/run/nats-server.pid
if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
  echo "[up] nats-server already running (pid $(cat "$pidfile"))"
elif (exec 3<>"/dev/tcp/127.0.0.1/$NATS_PORT") 2>/dev/null; then
  echo "[up] port $NATS_PORT is taken by a server that is not ours: stop it, or set HODEI_NATS_PORT" >&2
  exit 1
else
  setsid "$HODEI_TEST_NATS_SERVER" -c "$NATS_DIR/nats-server.conf" -l "$STATE/logs/nats-server.log" </dev/null >/dev/null 2>&1 &
  echo $! >"$pidfile"
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$NATS_PORT") 2>/dev/null && break; sleep 0.1; done
  echo "[up] started nats-server (pid $!) with JWT authentication, log $STATE/logs/nats-server.log"
fi
export HODEI_MIGRATE=no
export HODEI_WORKER_CREDS_DIR=$PWD/$STATE/run/worker-creds

# --- Docker: jobs with an image run in containers (images built here, no registry) -------
DOCKER=""
if [ -S /var/run/docker.sock ] && docker info >/dev/null 2>&1; then
  echo "[up] docker engine found: building the images and the static agent (scripts/images.sh)"
  scripts/images.sh >/dev/null
  DOCKER=1
  export HODEI_DOCKER_SOCKET=unix:///var/run/docker.sock
  export HODEI_DOCKER_AGENT_BIN=$PWD/target/static/hodei-agent
  # NATS listens on loopback here: containers share the host's network to reach it.
  export HODEI_DOCKER_NETWORK=host
  export HODEI_DOCKER_NATS_URL=$HODEI_NATS_URL
fi

for service in relay scheduler dispatcher registry provider-manager audit; do
  pidfile=$STATE/run/$service.pid
  if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    echo "[up] $service already running (pid $(cat "$pidfile"))"
    continue
  fi
  own=()
  [ "$service" = provider-manager ] && own=(HODEI_WORKER_SIGNER="$NATS_DIR/signer.json")
  # The relay's housekeeping VACUUMs the tables it churns: PostgreSQL 15 lets only their owner.
  [ "$service" = relay ] && own=(HODEI_DATABASE_URL="$OWNER_URL")
  env HODEI_NATS_CREDS="$NATS_DIR/creds/$service.creds" "${own[@]}" \
    setsid "$BIN/hodei-$service" >>"$STATE/logs/$service.log" 2>&1 </dev/null &
  echo $! >"$pidfile"
  echo "[up] started $service (pid $!), log $STATE/logs/$service.log"
done

# The web console holds no credential: an operator logs in with theirs.
CONSOLE_ADDR=${HODEI_CONSOLE_ADDR:-127.0.0.1:8080}
pidfile=$STATE/run/console.pid
if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
  echo "[up] console already running (pid $(cat "$pidfile"))"
else
  env -u HODEI_NATS_CREDS HODEI_CONSOLE_ADDR="$CONSOLE_ADDR" \
    setsid "$BIN/hodei-console" >>"$STATE/logs/console.log" 2>&1 </dev/null &
  echo $! >"$pidfile"
  echo "[up] started the web console (pid $!) on http://$CONSOLE_ADDR/, log $STATE/logs/console.log"
fi

# The CLI below acts as the operator role; a submitter's credential is beside it.
export HODEI_NATS_CREDS=$NATS_DIR/creds/operator.creds
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
if [ -n "$DOCKER" ]; then
  echo "[up] and one in a container: hodei run --image hodei/job-base:latest -- ..."
  "$BIN/hodei" run --image hodei/job-base:latest --memory-mb 128 -- sh -c 'echo "in a container of $(. /etc/os-release; echo $PRETTY_NAME) as uid $(id -u)"' || code=$?
fi
set -e
echo "----------------------------------------------------------------------"
echo "[up] the job exited with $code. Its audit trail:"
job=$("$BIN/hodei" list --limit 1 --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["items"][0]["correlation_id"])')
"$BIN/hodei" audit --correlation-id "$job"
echo
echo "[up] Hodei is running. Try: HODEI_NATS_CREDS=$NATS_DIR/creds/submitter.creds $BIN/hodei run -- echo hi"
echo "[up] (operator: $NATS_DIR/creds/operator.creds; another client's credential: $BIN/hodei auth creds --role submitter --name NAME --out FILE)"
echo "[up] Web console: http://$CONSOLE_ADDR/ (log in with the content of $NATS_DIR/creds/operator.creds)"
echo "[up] Stop it with: scripts/down.sh"
exit "$code"
