# ci-server and ci-agent images.
#
# Ordinary use (standard images from a registry):
#   docker build --target server -t ci/server .
#   docker build --target agent  -t ci/agent  .
#
# The base images are build arguments. scripts/build-images builds on a
# machine with no registry: it makes both bases from local material and sets
# PREBUILT=1, so the binaries built on the host are copied instead of
# compiled (the builder image then needs no Rust toolchain).
ARG RUST_IMAGE=rust:1-bookworm
ARG BASE_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS build
ARG PREBUILT=0
WORKDIR /src
COPY . .
RUN if [ "$PREBUILT" = 1 ]; then \
        test -x target/release/ci-server && test -x target/release/ci-agent; \
    else \
        cargo build --release --locked -p ci-server -p ci-agent; \
    fi \
 && mkdir -p /out && cp target/release/ci-server target/release/ci-agent /out/

FROM ${BASE_IMAGE} AS server
# The server resolves branches to full SHAs in a copy of the repository.
RUN if ! command -v git >/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends git ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi
COPY --from=build /out/ci-server /usr/local/bin/ci-server
ENV HOST=0.0.0.0 PORT=3000 DB_PATH=/data/ci.sqlite
VOLUME /data
EXPOSE 3000
ENTRYPOINT ["/usr/local/bin/ci-server"]

FROM ${BASE_IMAGE} AS agent
# The agent checks out commits itself: it needs git (and tar for Docker).
RUN if ! command -v git >/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends git ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi
COPY --from=build /out/ci-agent /usr/local/bin/ci-agent
ENV AGENT_BIND=0.0.0.0 AGENT_PORT=3001 WORK_DIR=/work RUNNER=docker
# Agents connect to the server (AGENT_MODE=connect, the default) and listen
# on no port; with AGENT_MODE=push they listen on AGENT_PORT.
ENTRYPOINT ["/usr/local/bin/ci-agent"]
