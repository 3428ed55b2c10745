# The outbox-relay daemon. Build: docker build -t outbox-relay .
FROM rust:1.95-bookworm AS build
WORKDIR /src
RUN apt-get update && apt-get install -y --no-install-recommends cmake libssl-dev libsasl2-dev zlib1g-dev pkg-config && rm -rf /var/lib/apt/lists/*
COPY . .
RUN cargo build --release --locked -p outbox-relay

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libssl3 libsasl2-2 zlib1g && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/outbox-relay /usr/local/bin/outbox-relay
USER nobody
ENTRYPOINT ["outbox-relay"]
CMD ["run"]
