# upstreamd and the Kotaemon stand-in (`kotaemon-standin`), for docker-compose.yml.
#
# The runtime stage is the official nginx image, not a bare Debian: upstreamd runs
# `nginx -t` before it signals nginx, and here that is the very nginx binary (same version,
# same modules, same compiled-in paths) that serves in the nginx container. Debian's own
# nginx package would be 1.22 beside the served 1.27: a directive only the newer one knows
# would fail every test and block every change. Keep NGINX_IMAGE on the compose file's
# nginx tag.
ARG NGINX_IMAGE=nginx:1.27

FROM rust:1-bookworm AS build
WORKDIR /src
# The build list install-deps.sh reads too (scripts/deps/build.txt), so the two cannot drift.
COPY scripts/install-deps.sh scripts/
COPY scripts/deps/build.txt scripts/deps/
RUN bash scripts/install-deps.sh build && rm -rf /var/lib/apt/lists/*
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY templates templates
RUN cargo build --release --locked --bins --features standins

# Debian bookworm, like the builder, so the binaries find the glibc they were linked with.
FROM ${NGINX_IMAGE}
COPY --from=build /src/target/release/upstreamd /src/target/release/kotaemon-standin /usr/local/bin/
# Root, deliberately: nginx's master runs as root, and signalling it takes the same uid (or
# CAP_KILL); `nginx -t` also opens nginx's root-owned pid file and binds its ports.
# The nginx image stops with SIGQUIT (nginx's graceful stop); upstreamd stops on SIGTERM.
STOPSIGNAL SIGTERM
ENTRYPOINT ["upstreamd"]
CMD ["run", "--config", "/etc/upstreamd/upstreamd.toml"]
