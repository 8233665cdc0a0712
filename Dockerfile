# syntax=docker/dockerfile:1

# ---- builder -----------------------------------------------------------------
FROM rust:1-bookworm AS builder

# rdkafka builds its bundled librdkafka with configure + make + gcc and links zlib and
# the system OpenSSL (its `ssl` feature: Kafka over TLS, SASL SCRAM). HTTP, SMTP and
# PostgreSQL TLS are rustls.
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential pkg-config zlib1g-dev libssl-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /build

# Compile the dependency graph (librdkafka above all) against stub sources, so that a
# change to Herald's own code does not rebuild it.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked --bin herald \
    && rm -rf src

# The stub's artifacts are newer than the real sources (COPY keeps their mtimes), so
# cargo would call them fresh: remove them so the real crate is always compiled.
RUN rm -rf target/release/.fingerprint/herald-* \
        target/release/deps/herald-* \
        target/release/deps/libherald-* \
        target/release/herald target/release/herald.d \
        target/release/libherald.*

# The whole context (filtered by .dockerignore) brings src/, migrations/ (embedded by
# sqlx::migrate!) and .sqlx/ when it exists; query! macros read .sqlx/ offline.
ENV SQLX_OFFLINE=true
COPY . .
RUN cargo build --release --locked --bin herald

# ---- runtime -----------------------------------------------------------------
FROM debian:bookworm-slim AS runtime

# curl serves the compose healthcheck; zlib1g is already in slim and libssl3 comes with
# ca-certificates, both listed for clarity (librdkafka links them).
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl zlib1g libssl3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system herald \
    && useradd --system --gid herald --home-dir /app --shell /usr/sbin/nologin herald

WORKDIR /app

COPY --from=builder /build/target/release/herald /usr/local/bin/herald
COPY config/ /app/config/
COPY templates/ /app/templates/
COPY schemas/ /app/schemas/
COPY kafka/ /app/kafka/

ENV HERALD_HTTP_ADDR=0.0.0.0:8080 \
    HERALD_LOG_FORMAT=json

USER herald
EXPOSE 8080

ENTRYPOINT ["herald"]
CMD ["serve"]
