# The outbox-relay daemon. Build: docker build -t outbox-relay .
# Run: docker run --rm -e OUTBOX_RELAY__DATABASE__URL=… -e OUTBOX_RELAY_CONFIG=/etc/outbox-relay/polling-rabbitmq.toml outbox-relay
# The example configs (examples/config/) are in /etc/outbox-relay/; docker-compose.yml uses them.
FROM rust:1.95-bookworm AS build
WORKDIR /src
# cmake: rdkafka builds its bundled librdkafka; libssl/libsasl2/zlib: its TLS, SASL and compression.
RUN apt-get update && apt-get install -y --no-install-recommends cmake libssl-dev libsasl2-dev zlib1g-dev pkg-config && rm -rf /var/lib/apt/lists/*
# .dockerignore keeps target/ and .git out of the context.
COPY . .
RUN cargo build --release --locked -p outbox-relay

FROM debian:bookworm-slim
# curl: the compose healthcheck (GET /healthz on the ops port).
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl libssl3 libsasl2-2 zlib1g && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/outbox-relay /usr/local/bin/outbox-relay
COPY examples/config/ /etc/outbox-relay/
USER nobody
# 9187: /metrics, /healthz, /readyz when ops.listen_addr binds it (e.g. OUTBOX_RELAY__OPS__LISTEN_ADDR=0.0.0.0:9187).
EXPOSE 9187
ENTRYPOINT ["outbox-relay"]
CMD ["run"]
