# syntax=docker/dockerfile:1
# The stockflow image: `stockflow consume` for the consumer group on ECS Fargate, and the one-shot
# ops and scheduled tasks (setup --validate, dumps, the dashboard). Non-root, CA certificates,
# no shell tools needed (the health check is `stockflow probe`).
#
# Both architectures (the task definition runs arm64):
#   docker buildx build --platform linux/arm64,linux/amd64 \
#     --build-arg SOURCE_DATE_EPOCH=$(git log -1 --format=%ct) -t stockflow:$(git rev-parse --short HEAD) .
# The Kafka / MSK backend: add --build-arg FEATURES=kafka (builds librdkafka with cmake; the runtime
# image then also carries libssl3 and zlib).
# Reproducible: the toolchain and base images are pinned by version (pin them by digest too for
# bit-for-bit rebuilds, docs/deploy.md), dependencies by Cargo.lock (--locked), timestamps by
# SOURCE_DATE_EPOCH. tests/deploy.rs checks that every path copied here exists and that the
# entrypoint is a binary of the crate.

ARG RUST_VERSION=1.95.0
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS build
ARG SOURCE_DATE_EPOCH=0
ARG FEATURES=
RUN if [ -n "$FEATURES" ]; then apt-get update && apt-get install -y --no-install-recommends \
      cmake g++ make pkg-config libssl-dev zlib1g-dev && rm -rf /var/lib/apt/lists/*; fi
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY state state
COPY pipeline pipeline
COPY connectors connectors
COPY tests/model tests/model
COPY benches benches
COPY src src
# Release profile without debug info, stripped: a smaller image, the same code.
ENV CARGO_PROFILE_RELEASE_DEBUG=false CARGO_PROFILE_RELEASE_STRIP=symbols CARGO_INCREMENTAL=0
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin stockflow ${FEATURES:+--features "$FEATURES"} \
    && install -m 0755 target/release/stockflow /stockflow

FROM debian:${DEBIAN_RELEASE}-slim
ARG FEATURES=
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
       $(if [ -n "$FEATURES" ]; then echo libssl3 zlib1g; fi) \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin stockflow
COPY --from=build /stockflow /usr/local/bin/stockflow
USER 10001:10001
# The consumer's /metrics, /healthz and /readyz (consume --metrics-listen).
EXPOSE 9100
ENTRYPOINT ["/usr/local/bin/stockflow"]
CMD ["consume", "--metrics-listen", "0.0.0.0:9100"]
