#!/bin/sh
# First start: a cluster, the `hodei` database with its owner (who runs the migrations) and
# the services' role, which gets only SELECT, INSERT, UPDATE, DELETE on what the owner
# creates (default privileges). Passwords come from the environment.
set -eu
BIN=/usr/lib/postgresql/15/bin
mkdir -p "$PGDATA" /var/run/postgresql
chown -R postgres:postgres "$PGDATA" /var/run/postgresql
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  printf '%s\n' "$POSTGRES_PASSWORD" > /tmp/pw && chown postgres /tmp/pw
  su postgres -c "$BIN/initdb -D $PGDATA -U postgres -A scram-sha-256 --pwfile=/tmp/pw >/dev/null"
  rm -f /tmp/pw
  echo "host all all 0.0.0.0/0 scram-sha-256" >> "$PGDATA/pg_hba.conf"
  su postgres -c "$BIN/pg_ctl -D $PGDATA -o '-c listen_addresses=' -w start >/dev/null"
  PGPASSWORD=$POSTGRES_PASSWORD su postgres -c "psql -q -h /var/run/postgresql -v ON_ERROR_STOP=1" <<SQL
CREATE ROLE hodei_owner LOGIN PASSWORD '$HODEI_OWNER_PASSWORD';
CREATE ROLE hodei_app LOGIN PASSWORD '$HODEI_APP_PASSWORD';
CREATE DATABASE hodei OWNER hodei_owner;
\c hodei
ALTER DEFAULT PRIVILEGES FOR ROLE hodei_owner IN SCHEMA public
  GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO hodei_app;
ALTER DEFAULT PRIVILEGES FOR ROLE hodei_owner IN SCHEMA public
  GRANT USAGE, SELECT ON SEQUENCES TO hodei_app;
SQL
  su postgres -c "$BIN/pg_ctl -D $PGDATA -m fast -w stop >/dev/null"
fi
exec su postgres -c "exec $BIN/postgres -D $PGDATA -c listen_addresses='*'"
