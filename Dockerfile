# ngx-consul: nginx + ngx_stream_consul_upstream_module on Debian bookworm.
#
#   docker build -t ngx-consul .
#   docker run --rm --network host ngx-consul        # Consul agent DNS on 127.0.0.1:8600
#   docker run --rm -p 6379:6379 -v "$PWD/my.conf:/etc/nginx/nginx.conf:ro" ngx-consul
#
# A dynamic module must be built against the exact `configure` flags of the nginx
# binary that loads it, so this image builds nginx itself from the same configured
# tree as the module and ships both (no distribution nginx).

ARG NGINX_VERSION=1.28.3

# ---------------------------------------------------------------- build
FROM rust:1-bookworm AS build
ARG NGINX_VERSION
# Optional: the tarball's sha256 (`sha256sum nginx-$NGINX_VERSION.tar.gz`) to pin its content.
ARG NGINX_SHA256=

RUN apt-get update \
 && apt-get install -y --no-install-recommends libclang-dev libpcre2-dev libssl-dev zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
RUN curl -fsSL -o nginx.tar.gz "https://nginx.org/download/nginx-${NGINX_VERSION}.tar.gz" \
 && echo "nginx-${NGINX_VERSION}.tar.gz sha256: $(sha256sum nginx.tar.gz | cut -d' ' -f1)" \
 && if [ -n "$NGINX_SHA256" ]; then echo "$NGINX_SHA256  nginx.tar.gz" | sha256sum -c -; fi \
 && tar xzf nginx.tar.gz && rm nginx.tar.gz

# --with-compat, --with-stream (static: the module needs ngx_stream_module in the
# binary) and --with-threads are required; the rest is an ordinary layout.
WORKDIR /src/nginx-${NGINX_VERSION}
RUN ./configure \
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

# The module, against the configured tree above (not the crate's vendored nginx).
WORKDIR /src/ngx-consul
COPY Cargo.toml Cargo.lock build.rs ./
COPY core core
COPY src src
RUN NGINX_BUILD_DIR=/src/nginx-${NGINX_VERSION}/objs \
        cargo build --release --locked --no-default-features --features export-modules \
 && install -D -m 0644 target/release/libngx_stream_consul_upstream_module.so \
        /out/usr/lib/nginx/modules/ngx_stream_consul_upstream_module.so

# ---------------------------------------------------------------- runtime
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends libcrypt1 libpcre2-8-0 libssl3 zlib1g ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/ /
COPY nginx-conf/consul-agent.conf /etc/nginx/nginx.conf
COPY nginx-conf/ /usr/share/doc/ngx-consul/examples/
# Logs go to `docker logs`; /var/lib/nginx is writable by the workers (for state=).
RUN mkdir -p /var/log/nginx /var/cache/nginx /var/lib/nginx \
 && chown www-data:www-data /var/lib/nginx \
 && ln -sf /dev/stderr /var/log/nginx/error.log \
 && ln -sf /dev/stdout /var/log/nginx/access.log \
 && nginx -V \
 && nginx -t

EXPOSE 6379
STOPSIGNAL SIGQUIT
CMD ["nginx", "-g", "daemon off;"]
