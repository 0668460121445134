#!/usr/bin/env bash
# Make this machine ready to build, run and test Hodei: installs what is missing (Debian
# packages, cargo-nextest) and starts PostgreSQL and NATS (JetStream) on loopback if they
# are not running. Safe to run again; changes nothing that is already in place.
#
# Prints `export` lines for the settings it found working; the other scripts source it.
set -euo pipefail

log() { echo "[setup] $*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

APT_UPDATED=""
apt_install() {
  if [ -z "$APT_UPDATED" ]; then as_root apt-get update -qq >&2; APT_UPDATED=1; fi
  log "installing $*"
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@" >&2
}

command -v cargo >/dev/null || { log "Rust (cargo) is required: https://rustup.rs"; exit 1; }
command -v cc >/dev/null || apt_install build-essential
command -v python3 >/dev/null || apt_install python3
command -v psql >/dev/null || apt_install postgresql postgresql-client

# --- PostgreSQL on 127.0.0.1:5432 -------------------------------------------------------
if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then apt_install postgresql; fi
  version=$(ls /etc/postgresql | sort -V | tail -1)
  log "starting PostgreSQL $version"
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start >&2 || true
  for _ in $(seq 50); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 0.2; done
fi
PG_ADMIN_URL=${HODEI_TEST_ADMIN_DATABASE_URL:-}
if [ -z "$PG_ADMIN_URL" ]; then
  for url in postgres://postgres@127.0.0.1:5432/postgres postgres://postgres:postgres@127.0.0.1:5432/postgres; do
    if psql "$url" -Atqc 'select 1' >/dev/null 2>&1; then PG_ADMIN_URL=$url; break; fi
  done
fi
if [ -z "$PG_ADMIN_URL" ]; then
  # A fresh Debian install asks for a password on TCP: give the postgres role a known one.
  log "setting a password for the postgres role (local development only)"
  as_root su postgres -c "psql -qc \"ALTER USER postgres PASSWORD 'postgres'\"" >&2
  PG_ADMIN_URL=postgres://postgres:postgres@127.0.0.1:5432/postgres
  psql "$PG_ADMIN_URL" -Atqc 'select 1' >/dev/null
fi

# --- NATS with JetStream on 127.0.0.1:4222 --------------------------------------------
NATS_SERVER=$(command -v nats-server || true)
[ -z "$NATS_SERVER" ] && [ -x /usr/sbin/nats-server ] && NATS_SERVER=/usr/sbin/nats-server
if [ -z "$NATS_SERVER" ]; then apt_install nats-server; NATS_SERVER=$(command -v nats-server || echo /usr/sbin/nats-server); fi
if ! (exec 3<>/dev/tcp/127.0.0.1/4222) 2>/dev/null; then
  log "starting nats-server with JetStream"
  as_root mkdir -p /var/lib/nats-server
  as_root start-stop-daemon --start --oknodo --background --exec "$NATS_SERVER" -- \
    -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log
  for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/4222) 2>/dev/null && break; sleep 0.2; done
fi

echo "export HODEI_TEST_ADMIN_DATABASE_URL='$PG_ADMIN_URL'"
echo "export HODEI_TEST_NATS_SERVER='$NATS_SERVER'"
echo "export HODEI_PG_BASE_URL='${PG_ADMIN_URL%/*}'"
