# The `fbsync` binary in a small runtime image. One image for every role: the command picks it
# (`ingest`, `worker`, `pages list`, `check`, ...). See docker-compose.yml for a whole stack.
#
#   docker build -t fbsync .
#   docker run --rm --env-file .env fbsync check

# --- Build -------------------------------------------------------------------------------------
FROM rust:1-bookworm AS builder
WORKDIR /build

# Dependencies first, against stub crates: this layer is rebuilt only when a manifest or
# Cargo.lock changes, not on every source edit.
COPY Cargo.toml Cargo.lock ./
COPY shared/Cargo.toml shared/Cargo.toml
COPY ingest/Cargo.toml ingest/Cargo.toml
COPY worker/Cargo.toml worker/Cargo.toml
COPY scheduler/Cargo.toml scheduler/Cargo.toml
RUN mkdir -p src shared/src ingest/src worker/src scheduler/src \
    && echo 'fn main() {}' > src/main.rs \
    && for crate in shared ingest worker scheduler; do touch "$crate/src/lib.rs"; done \
    && cargo build --release --locked --bin fbsync \
    && rm -rf src shared/src ingest/src worker/src scheduler/src

# Then the sources. COPY keeps the files' own modification times, which may be older than the
# stubs' build: touch them so cargo rebuilds the workspace crates instead of reusing the stubs.
COPY shared shared
COPY ingest ingest
COPY worker worker
COPY scheduler scheduler
COPY src src
RUN find src shared ingest worker scheduler -type f -exec touch {} + \
    && cargo build --release --locked --bin fbsync \
    && install -m 0755 target/release/fbsync /usr/local/bin/fbsync

# --- Runtime -----------------------------------------------------------------------------------
FROM debian:bookworm-slim AS runtime

# ca-certificates for TLS to the Graph API, Spaces and amqps://; curl for the healthchecks.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*

# An unprivileged user owning DATA_DIR (the local object store and the default SQLite file).
# A named volume mounted there starts with this ownership.
RUN groupadd --system --gid 10001 fbsync \
    && useradd --system --uid 10001 --gid fbsync --home-dir /var/lib/fbsync \
        --shell /usr/sbin/nologin fbsync \
    && mkdir -p /var/lib/fbsync \
    && chown fbsync:fbsync /var/lib/fbsync

COPY --from=builder /usr/local/bin/fbsync /usr/local/bin/fbsync

ENV DATA_DIR=/var/lib/fbsync
WORKDIR /var/lib/fbsync
VOLUME ["/var/lib/fbsync"]

# 5000: INGEST_ADDR (webhooks, /healthz, /readyz); 5001: INGEST_METRICS_ADDR (/metrics). Both
# must listen on 0.0.0.0 inside a container (INGEST_METRICS_ADDR defaults to 127.0.0.1).
EXPOSE 5000 5001

USER 10001:10001
ENTRYPOINT ["/usr/local/bin/fbsync"]
CMD ["--help"]
