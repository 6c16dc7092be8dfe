# Mosquitto built here from Debian's package (no registry needed), with the file layout of the
# official eclipse-mosquitto:2 image: config in /mosquitto/config, data in /mosquitto/data.
#   docker build -f docker/images/mosquitto.Dockerfile -t ada-ddnn/mosquitto:local docker/images
ARG BASE=ada-ddnn/base:bookworm
FROM ${BASE}
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mosquitto mosquitto-clients \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /mosquitto/config /mosquitto/data /mosquitto/log \
 && printf 'listener 1883 127.0.0.1\nallow_anonymous true\nlog_dest stdout\n' > /mosquitto/config/mosquitto.conf \
 && chown -R mosquitto:mosquitto /mosquitto
# Debian's mosquitto buffers its log when stdout is not a terminal: stdbuf makes it line-buffered,
# so `docker logs` (and anything waiting on a log line) sees each line as it is written.
CMD ["stdbuf", "-oL", "mosquitto", "-c", "/mosquitto/config/mosquitto.conf"]
