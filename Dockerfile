# Every Hodei binary in one image; docker-compose.yml picks the command per service.
#
# On a normal machine (official images from a registry):
#   docker build -t hodei/services:dev .
# On a machine without a registry, scripts/images.sh builds the same image from this
# checkout's binaries and its own Debian base (images/services.Dockerfile), e.g.
#   docker build --build-arg BUILDER=... --build-arg BASE=hodei/debian:bookworm .
# works too once a Rust builder image exists there.
ARG BUILDER=rust:1-bookworm
ARG BASE=debian:bookworm-slim

FROM ${BUILDER} AS build
WORKDIR /src
COPY . .
RUN cargo build --release --workspace --bins \
 && RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --target x86_64-unknown-linux-gnu -p hodei-agent \
 && mkdir -p /out/static && cp target/release/hodei* /out/ && rm -f /out/*.d \
 && cp target/x86_64-unknown-linux-gnu/release/hodei-agent /out/static/

FROM ${BASE}
RUN useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin hodei-job
COPY --from=build /out/hodei* /usr/local/bin/
# The static agent the Docker provider mounts into job containers.
COPY --from=build /out/static/hodei-agent /usr/local/lib/hodei/hodei-agent
