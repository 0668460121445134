#!/usr/bin/env bash
# Run docker-compose.yml on this machine: builds what it needs without a registry
# (scripts/images.sh: the Debian base, NATS, PostgreSQL, the services and the static agent),
# makes its keys, credentials and passwords on first run (.hodei/compose/<project>/, never
# committed), then runs docker-compose with them.
#   scripts/compose.sh up        build, start, and wait until Hodei answers
#   scripts/compose.sh down      stop; remove its volumes, its state and the jobs' containers
#   scripts/compose.sh ARGS...   any other docker-compose arguments (e.g. `run --rm cli list`)
# The project is COMPOSE_PROJECT_NAME (default `hodei`).
set -euo pipefail
cd "$(dirname "$0")/.."
export COMPOSE_PROJECT_NAME=${COMPOSE_PROJECT_NAME:-hodei}
export HODEI_ROOT=$PWD
export HODEI_COMPOSE_STATE=$PWD/.hodei/compose/$COMPOSE_PROJECT_NAME
compose() { docker-compose -f "$HODEI_ROOT/docker-compose.yml" "$@"; }
log() { echo "[compose] $*" >&2; }

secret() {
  [ -s "$HODEI_COMPOSE_STATE/$1" ] || (umask 077; python3 -c 'import secrets; print(secrets.token_hex(16))' >"$HODEI_COMPOSE_STATE/$1")
  cat "$HODEI_COMPOSE_STATE/$1"
}

prepare() {
  mkdir -p "$HODEI_COMPOSE_STATE/workers"
  chmod 700 "$HODEI_COMPOSE_STATE"
  export HODEI_POSTGRES_PASSWORD=$(secret postgres.password)
  export HODEI_OWNER_PASSWORD=$(secret owner.password)
  export HODEI_APP_PASSWORD=$(secret app.password)
}

case "${1:-}" in
  up)
    command -v docker-compose >/dev/null || { log "docker-compose is required"; exit 1; }
    eval "$(scripts/setup.sh)"
    cargo build --workspace --bins --quiet
    scripts/images.sh >&2
    prepare
    target/debug/hodei auth init --dir "$HODEI_COMPOSE_STATE/nats" --listen 0.0.0.0:4222 --store-dir /data >/dev/null
    # The server reads its configuration as root in its container; the services read their
    # own credential files (root as well).
    compose up -d >&2
    log "waiting for Hodei to answer"
    for _ in $(seq 120); do
      if compose run --rm -T cli --timeout-secs 2 list >/dev/null 2>&1; then
        log "up: docker-compose -p $COMPOSE_PROJECT_NAME run --rm cli run -- echo hello"
        exit 0
      fi
      sleep 1
    done
    log "Hodei did not answer; see: docker-compose -p $COMPOSE_PROJECT_NAME logs"
    exit 1
    ;;
  down)
    prepare
    compose --profile cli down -v --remove-orphans >&2 || true
    docker ps -aq --filter "label=hodei.owner=$COMPOSE_PROJECT_NAME" | xargs -r docker rm -f >/dev/null
    rm -rf "$HODEI_COMPOSE_STATE"
    ;;
  *)
    prepare
    compose "$@"
    ;;
esac
