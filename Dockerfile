# ngx-consul: nginx + ngx_stream_consul_upstream_module on Debian bookworm.
#
#   docker build -t ngx-consul .
#   docker run --rm --network host ngx-consul        # Consul agent DNS on 127.0.0.1:8600
#   docker run --rm -p 6379:6379 -v "$PWD/my.conf:/etc/nginx/nginx.conf:ro" ngx-consul
#
# A dynamic module must be built against the exact `configure` flags of the nginx
# binary that loads it, so this image builds nginx itself and then the module for
# that binary with scripts/build-module.sh (the script users run for their own
# nginx), and ships both (no distribution nginx).
#
# The nginx source: nginx-$NGINX_VERSION.tar.gz in the build context (next to this
# file) when it is there, for builds without internet access; downloaded from
# nginx.org otherwise. CI builds this file with buildah (scripts/ci/check-docker.sh).

ARG NGINX_VERSION=1.28.3

# ---------------------------------------------------------------- build
FROM rust:1-bookworm AS build
ARG NGINX_VERSION
# Optional: the tarball's sha256 (`sha256sum nginx-$NGINX_VERSION.tar.gz`) to pin its content.
ARG NGINX_SHA256=

RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential curl ca-certificates \
        libclang-dev libpcre2-dev libssl-dev zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*

# Dockerfile always matches; the tarball only when it is in the context.
COPY Dockerfile nginx-*.tar.gz /src/context/
WORKDIR /src
RUN tarball="/src/context/nginx-${NGINX_VERSION}.tar.gz" \
 && if [ ! -f "$tarball" ]; then \
        curl -fsSL -o "$tarball" "https://nginx.org/download/nginx-${NGINX_VERSION}.tar.gz"; \
    fi \
 && echo "nginx-${NGINX_VERSION}.tar.gz sha256: $(sha256sum "$tarball" | cut -d' ' -f1)" \
 && if [ -n "$NGINX_SHA256" ]; then echo "$NGINX_SHA256  $tarball" | sha256sum -c -; fi \
 && mkdir nginx && tar xzf "$tarball" -C nginx --strip-components=1 && rm -rf /src/context

# --with-compat, --with-stream (static: the module needs ngx_stream_module in the
# binary) and --with-threads are required; the rest is an ordinary layout.
# (A release tarball has ./configure, a git tree auto/configure.)
WORKDIR /src/nginx
RUN configure=./configure; [ -x "$configure" ] || configure=auto/configure; \
    "$configure" \
        --prefix=/etc/nginx \
        --sbin-path=/usr/sbin/nginx \
        --modules-path=/usr/lib/nginx/modules \
        --conf-path=/etc/nginx/nginx.conf \
        --error-log-path=/var/log/nginx/error.log \
        --http-log-path=/var/log/nginx/access.log \
        --pid-path=/run/nginx.pid \
        --lock-path=/run/nginx.lock \
        --http-client-body-temp-path=/var/cache/nginx/client_temp \
        --http-proxy-temp-path=/var/cache/nginx/proxy_temp \
        --http-fastcgi-temp-path=/var/cache/nginx/fastcgi_temp \
        --http-uwsgi-temp-path=/var/cache/nginx/uwsgi_temp \
        --http-scgi-temp-path=/var/cache/nginx/scgi_temp \
        --user=www-data --group=www-data \
        --with-compat \
        --with-threads \
        --with-stream \
        --with-stream_ssl_module \
        --with-stream_ssl_preread_module \
        --with-stream_realip_module \
        --with-http_ssl_module \
        --with-http_v2_module \
        --with-http_realip_module \
        --with-http_stub_status_module \
 && make -j"$(nproc)" \
 && make install DESTDIR=/out \
 && rm -rf /out/etc/nginx/html /out/etc/nginx/*.default

# The module, for the nginx just built: scripts/build-module.sh reads its nginx -V,
# builds against the configured tree above and checks the result with nginx -t.
WORKDIR /src/ngx-consul
COPY Cargo.toml Cargo.lock build.rs ./
COPY core core
COPY src src
COPY scripts scripts
RUN scripts/build-module.sh --nginx /out/usr/sbin/nginx --source /src/nginx \
        --out /out/usr/lib/nginx/modules

# ---------------------------------------------------------------- runtime
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends libcrypt1 libpcre2-8-0 libssl3 zlib1g ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/ /
COPY nginx-conf/consul-agent.conf /etc/nginx/nginx.conf
COPY nginx-conf/ /usr/share/doc/ngx-consul/examples/
# Logs go to `docker logs`; /var/lib/nginx/consul is writable by the workers (for
# state=), as the .deb makes it.
RUN mkdir -p /var/log/nginx /var/cache/nginx /var/lib/nginx/consul \
 && chown www-data:www-data /var/lib/nginx /var/lib/nginx/consul \
 && ln -sf /dev/stderr /var/log/nginx/error.log \
 && ln -sf /dev/stdout /var/log/nginx/access.log \
 && nginx -V \
 && nginx -t

EXPOSE 6379
STOPSIGNAL SIGQUIT
CMD ["nginx", "-g", "daemon off;"]
