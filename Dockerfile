# engage in a container: `docker compose up` builds this (see docker-compose.yml).
# Build stage: the release binary (librdkafka is compiled from source, hence
# cmake-free build tools, OpenSSL headers and pkg-config).
FROM rust:1.94-bookworm AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential pkg-config libssl-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY job ./job
COPY sql ./sql
COPY udfs ./udfs
RUN cargo build --release -p engage && cp target/release/engage /usr/local/bin/engage
# The UDF crates the job SQL calls, built here (the run stage has no Rust):
# each library and its manifest land in udfs/<crate>/target/engage/.
RUN engage udf build

# Run stage: the binary, the job SQL, and a non-root user owning the state.
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libssl3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --create-home --home-dir /var/lib/engage engage
COPY --from=build /usr/local/bin/engage /usr/local/bin/engage
COPY sql /opt/engage/sql
COPY --from=build /src/udfs /opt/engage/udfs
USER engage
WORKDIR /var/lib/engage
# The dashboard, JSON API and Prometheus metrics (`--http`).
EXPOSE 9464
ENTRYPOINT ["engage"]
CMD ["run", "/opt/engage/sql/engagement.sql", "--checkpoint-dir", "/var/lib/engage/checkpoints", "--udfs-dir", "/opt/engage/udfs"]
