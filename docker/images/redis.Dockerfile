# Redis built here from Debian's package (no registry needed); redis-cli included.
#   docker build -f docker/images/redis.Dockerfile -t ada-ddnn/redis:local docker/images
ARG BASE=ada-ddnn/base:bookworm
FROM ${BASE}
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /data && chown redis:redis /data
WORKDIR /data
USER redis
CMD ["redis-server", "--bind", "127.0.0.1", "--port", "6379", "--protected-mode", "no"]
