# The Weir host as a container image (used by docker-compose.yml):
#   docker build -t weir:local .
# Stage 1 builds the `weir` binary; stage 2 is a slim runtime that runs it as a non-root user.

FROM rust:1.95-bookworm AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends cmake libssl-dev libsasl2-dev zlib1g-dev pkg-config \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p weir \
    && install -m 0755 target/release/weir /usr/local/bin/weir

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl libssl3 libsasl2-2 zlib1g \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/weir --create-home weir \
    && mkdir -p /var/cache/weir && chown weir /var/cache/weir
COPY --from=build /usr/local/bin/weir /usr/local/bin/weir
USER 10001
WORKDIR /var/lib/weir
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/weir"]
CMD ["serve"]
