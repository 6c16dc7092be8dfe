#!/usr/bin/env bash
# Make sure Mosquitto (127.0.0.1:1883) and Redis (127.0.0.1:6379) answer; start the local
# packages' servers if not (installing them with apt-get when they are missing and we are root).
#
#   scripts/ensure-services.sh                 install what is missing, start what does not answer
#   scripts/ensure-services.sh --install-only  only the binaries (what `make replay` needs: it embeds
#                                              its own servers); where they cannot be installed, say
#                                              so and go on (a Docker engine can run them instead)
set -euo pipefail
install_only=0
[ "${1:-}" = "--install-only" ] && install_only=1

answers() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
  for _ in $(seq 1 100); do answers "$1" && return 0; sleep 0.1; done
  echo "ensure-services: nothing answers on 127.0.0.1:$1" >&2
  return 1
}

install_pkg() {
  if ! command -v "$1" >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "ensure-services: installing $2"
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
    else
      echo "ensure-services: $1 not found and not root: install $2 (sudo apt-get install $2), or start a Docker" \
           "engine with its image (scripts/docker-engine.sh up), or point ADA_DDNN_MQTT_URL / ADA_DDNN_REDIS_URL" \
           "at running servers" >&2
      [ "$install_only" = 1 ] && return 0
      return 1
    fi
  fi
}

# The fault and security tests start private servers of their own: the binaries must be here
# even when something already answers on the standard ports.
install_pkg mosquitto mosquitto
install_pkg mosquitto_passwd mosquitto
install_pkg redis-server redis-server
[ "$install_only" = 1 ] && exit 0

if answers 1883; then echo "ensure-services: Mosquitto answers on 1883"; else
  echo "ensure-services: starting Mosquitto"
  if [ -f /etc/mosquitto/mosquitto.conf ]; then mosquitto -d -c /etc/mosquitto/mosquitto.conf; else mosquitto -d -p 1883; fi
  wait_port 1883
fi

if answers 6379; then echo "ensure-services: Redis answers on 6379"; else
  echo "ensure-services: starting Redis"
  mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  wait_port 6379
fi
