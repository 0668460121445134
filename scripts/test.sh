#!/usr/bin/env bash
# Run every test of Hodei: unit tests of each crate and the system tests, which start the
# real services as processes against their own nats-server and their own database.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/setup.sh)"

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "[test] installing cargo-nextest" >&2
  cargo install cargo-nextest --locked >&2 || true
fi

# The system tests run the service binaries: build them first, and the images and static
# agent of the Docker provider's tests.
cargo build --workspace --bins
scripts/images.sh >&2
started=$(date +%s)
status=0
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast "$@" || status=$?
else
  cargo test --workspace --no-fail-fast "$@" || status=$?
fi

# Nothing of the suite may outlive it: no agent, no job process (they run in the tests'
# cgroups, hodei-test-*, or as the jobs' user).
left=""
# A process that has ended but not been reaped yet (a zombie) runs nothing: a provider-manager
# killed -9 leaves its agent spawner to init, which reaps it a few seconds later.
for pid in $(pgrep -f 'hodei-agent' || true); do
  case "$(ps -o stat= -p "$pid" 2>/dev/null)" in Z*) continue ;; esac
  age=$(ps -o etimes= -p "$pid" 2>/dev/null | tr -d ' ')
  [ -n "$age" ] && [ "$age" -le $(( $(date +%s) - started + 1 )) ] && left="$left $pid"
done
for cgroup in /sys/fs/cgroup/unified/hodei-test-* /sys/fs/cgroup/hodei-test-*; do
  [ -d "$cgroup" ] || continue
  members=$(find "$cgroup" -name cgroup.procs -exec cat {} + 2>/dev/null | tr '\n' ' ')
  [ -n "${members// /}" ] && left="$left $members"
done
if [ -n "${left// /}" ]; then
  echo "[test] processes of the suite are still alive:$left" >&2
  ps -o pid,user,etimes,args -p "$(echo $left | tr ' ' ',')" >&2 || true
  status=1
fi
exit "$status"
