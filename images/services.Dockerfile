# Every Hodei binary, as scripts/images.sh builds them on this machine (target/debug), on
# the Debian base it made; docker-compose.yml picks the command per service.
ARG BASE=hodei/debian:bookworm
FROM ${BASE}
# The unprivileged user the process provider runs jobs as.
RUN useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin hodei-job
COPY hodei hodei-agent hodei-audit hodei-dispatcher hodei-provider-manager hodei-registry hodei-relay hodei-scheduler hodei-trace-sink /usr/local/bin/
