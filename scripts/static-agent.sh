#!/usr/bin/env bash
# Build hodei-agent statically linked (glibc, crt-static), so that the Docker provider can
# bind-mount it into any image, and put it at target/static/hodei-agent. Prints its path.
set -euo pipefail
cd "$(dirname "$0")/.."
triple=$(rustc -vV | sed -n 's/^host: //p')
RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --quiet --target "$triple" -p hodei-agent
mkdir -p target/static
cp -f "target/$triple/debug/hodei-agent" target/static/hodei-agent.tmp
mv -f target/static/hodei-agent.tmp target/static/hodei-agent
echo "$PWD/target/static/hodei-agent"
