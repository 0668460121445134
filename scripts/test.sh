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

# The system tests run the service binaries: build them first.
cargo build --workspace --bins
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast "$@"
else
  cargo test --workspace --no-fail-fast "$@"
fi
