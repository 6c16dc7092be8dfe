#!/usr/bin/env bash
# A Docker engine and the project's images, on a machine with no container registry.
#
#   scripts/docker-engine.sh up       engine up (installed and started if need be), images built
#   scripts/docker-engine.sh images   build the images only (engine must answer)
#   scripts/docker-engine.sh down     stop the engine, if this script started it
#   scripts/docker-engine.sh status   what answers, which images exist
#
# Engine: an engine that already answers (`docker info`) is used as it is. Otherwise, as root,
# Debian's docker.io is installed when dockerd is missing and started with no bridge, no iptables
# and no IP forwarding: every container of this project runs with host networking on 127.0.0.1,
# so the engine leaves the machine's network settings alone. The compose v2 CLI plugin comes
# from Debian 13's docker-compose package (Debian 12 only has compose v1), checked by SHA-256.
#
# Images (nothing is pulled; every image is built here, tagged with a hash of what went into it,
# so an unchanged image is reused; `:local` / `:latest` point at the newest):
#   ada-ddnn/base:bookworm   Debian 12 minbase made by debootstrap from this machine's apt mirror
#   ada-ddnn/mosquitto:local Debian's mosquitto + clients, the eclipse-mosquitto:2 file layout
#   ada-ddnn/redis:local     Debian's redis-server + redis-cli
#   ada-ddnn:latest          docker/Dockerfile on that base: Python, a CPU build of torch, the package
# Env: ADA_DDNN_DOCKER_STATE (default /var/lib/ada-ddnn-docker): pid file, log, debootstrap cache.
set -euo pipefail
cd "$(dirname "$0")/.."

STATE=${ADA_DDNN_DOCKER_STATE:-/var/lib/ada-ddnn-docker}
PIDFILE=$STATE/dockerd.pid
LOG=$STATE/dockerd.log
COMPOSE_DEB=pool/main/d/docker-compose/docker-compose_2.26.1-4_amd64.deb
COMPOSE_SHA256=47681197cb2b1ab88206b42a1a92fc75f50d9530a6322d03494a473eed0408ea
PLUGINS=/usr/local/lib/docker/cli-plugins

say() { echo "docker-engine: $*"; }
die() { echo "docker-engine: $*" >&2; exit 1; }
engine_answers() { docker info >/dev/null 2>&1; }
is_root() { [ "$(id -u)" = 0 ]; }

mirror() {  # the Debian mirror apt already uses (deb822 or one-line sources)
    local m
    m=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v security | head -1)
    [ -n "$m" ] || m=$(grep -hs '^deb ' /etc/apt/sources.list | awk '{print $2}' | grep -v security | head -1)
    echo "${m:-http://deb.debian.org/debian}"
}

apt_install() {
    is_root || die "$1 is missing and only root can install it (apt-get install $*)"
    command -v apt-get >/dev/null || die "$1 is missing and there is no apt-get to install it"
    say "installing $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null ||
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null; }
}

compose_plugin() {
    docker compose version >/dev/null 2>&1 && return 0
    is_root || die "docker compose (v2) is missing; install the compose plugin"
    [ "$(dpkg --print-architecture 2>/dev/null)" = amd64 ] || die "no compose v2 plugin: install docker-compose-plugin"
    local tmp
    tmp=$(mktemp -d)
    say "installing the compose v2 plugin from Debian 13's docker-compose package"
    curl -fsS --retry 3 -m 300 -o "$tmp/compose.deb" "$(mirror)/$COMPOSE_DEB" || die "cannot download $(mirror)/$COMPOSE_DEB"
    echo "$COMPOSE_SHA256  $tmp/compose.deb" | sha256sum -c --quiet - || die "docker-compose .deb: SHA-256 mismatch"
    dpkg-deb -x "$tmp/compose.deb" "$tmp/x"
    mkdir -p "$PLUGINS"
    install -m 755 "$tmp/x/usr/libexec/docker/cli-plugins/docker-compose" "$PLUGINS/docker-compose"
    rm -rf "$tmp"
    docker compose version >/dev/null || die "the compose plugin does not run"
}

engine_up() {
    if engine_answers; then
        say "using the engine that answers ($(docker version --format '{{.Server.Version}}'))"
        compose_plugin
        return 0
    fi
    is_root || die "no Docker engine answers, and starting one needs root"
    command -v dockerd >/dev/null || apt_install docker.io
    command -v docker >/dev/null || die "docker.io installed no docker client"
    mkdir -p "$STATE"
    say "starting dockerd (host networking only: no bridge, no iptables); log in $LOG"
    # setsid: the engine outlives this script and is not killed with the caller's process group.
    setsid dockerd --bridge=none --iptables=false --ip6tables=false --ip-forward=false --ip-masq=false \
        --pidfile "$PIDFILE" >"$LOG" 2>&1 < /dev/null &
    for _ in $(seq 1 300); do
        engine_answers && break
        sleep 0.1
    done
    engine_answers || { tail -20 "$LOG" >&2; die "dockerd did not answer within 30 s"; }
    touch "$STATE/started-here"
    say "engine up ($(docker version --format '{{.Server.Version}}'))"
    compose_plugin
}

engine_down() {
    if [ ! -f "$STATE/started-here" ] || [ ! -f "$PIDFILE" ]; then
        say "not stopping the engine: this script did not start it"
        return 0
    fi
    local pid
    pid=$(cat "$PIDFILE")
    say "stopping dockerd (pid $pid)"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && { say "dockerd still running after 20 s: killing it"; kill -9 "$pid"; }
    rm -f "$STATE/started-here"
}

have_image() { docker image inspect "$1" >/dev/null 2>&1; }

hash_of() {  # a short hash of files and strings: the tag of the image built from them
    { for f in "$@"; do if [ -f "$f" ]; then sha256sum "$f"; else echo "$f"; fi; done; } | sha256sum | cut -c1-16
}

base_image() {
    local tag=ada-ddnn/base:bookworm
    have_image "$tag" && return 0
    command -v debootstrap >/dev/null || apt_install debootstrap
    local root=$STATE/rootfs-bookworm
    rm -rf "$root"
    mkdir -p "$STATE"
    say "making $tag with debootstrap from $(mirror) (about a minute)"
    debootstrap --variant=minbase bookworm "$root" "$(mirror)" >"$STATE/debootstrap.log" 2>&1 ||
        { tail -20 "$STATE/debootstrap.log" >&2; die "debootstrap failed"; }
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar -C "$root" -c . | docker import -c 'ENV LANG=C.UTF-8' - "$tag" >/dev/null
    rm -rf "$root"
}

build() {  # build TAG-NAME DOCKERFILE CONTEXT HASH [build args...]
    local name=$1 file=$2 context=$3 hash=$4 alias=$5
    shift 5
    if have_image "$name:$hash"; then
        say "$name:$hash is up to date"
    else
        say "building $name:$hash"
        local t0=$SECONDS
        docker build --network host -q -f "$file" -t "$name:$hash" "$@" "$context" >/dev/null
        say "built $name:$hash in $((SECONDS - t0)) s"
    fi
    docker tag "$name:$hash" "$name:$alias"
}

images() {
    engine_answers || die "no Docker engine answers (scripts/docker-engine.sh up)"
    base_image
    build ada-ddnn/mosquitto docker/images/mosquitto.Dockerfile docker/images \
        "$(hash_of docker/images/mosquitto.Dockerfile)" local
    build ada-ddnn/redis docker/images/redis.Dockerfile docker/images \
        "$(hash_of docker/images/redis.Dockerfile)" local
    # torch: the CPU wheel this machine keeps on disk when there is one (no CUDA build in the image).
    # pip in the build trusts the CA bundle pip here trusts (a TLS-intercepting proxy's, say).
    local extra=build/docker-extra spec="" ca=${PIP_CERT:-${SSL_CERT_FILE:-}}
    rm -rf "$extra" && mkdir -p "$extra/wheels"
    for w in /opt/wheels/torch-*+cpu-cp311-*.whl; do
        [ -f "$w" ] || continue
        ln "$w" "$extra/wheels/" 2>/dev/null || cp "$w" "$extra/wheels/"
        spec="torch==$(basename "$w" | cut -d- -f2)"
    done
    [ -n "$ca" ] && [ -f "$ca" ] && cp "$ca" "$extra/ca.pem"
    local src
    src=$(git ls-files -co --exclude-standard pyproject.toml README.md pipeline devices edge cloud models docker/Dockerfile |
          grep -v -e '\.pyc$' | sort)
    # shellcheck disable=SC2086
    build ada-ddnn docker/Dockerfile . "$(hash_of $src "$spec" "$(ls "$extra/wheels")")" latest \
        --build-arg BASE=ada-ddnn/base:bookworm --build-arg "TORCH_SPEC=${spec:-torch}" \
        --build-arg TORCH_INDEX="$( [ -n "$spec" ] && echo none || echo https://download.pytorch.org/whl/cpu)"
}

status() {
    if engine_answers; then
        say "engine $(docker version --format '{{.Server.Version}}') answers; compose: $(docker compose version --short 2>/dev/null || echo missing)"
        docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E '^ada-ddnn' || true
    else
        say "no engine answers"
        return 1
    fi
}

case "${1:-}" in
    up) engine_up; images ;;
    images) images ;;
    down) engine_down ;;
    status) status ;;
    *) echo "usage: $0 up|images|down|status" >&2; exit 2 ;;
esac
