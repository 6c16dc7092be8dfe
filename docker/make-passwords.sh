#!/usr/bin/env bash
# Credentials of one site's field deployment: MQTT users and ACL for Mosquitto, Redis ACL users,
# and one env file per service that docker/compose.yaml reads.
#
#   docker/make-passwords.sh SITE DIR [CAMERAS]      e.g.  docker/make-passwords.sh site0 docker/secrets
#
# Writes into DIR (created with mode 700; refuses a DIR that already holds credentials):
#   mosquitto.passwd   MQTT users, passwords hashed (PBKDF2-SHA512) by `mosquitto_passwd -U`
#   mosquitto.acl      which topics each MQTT user may read / write (docker/mosquitto.acl is site0's)
#   redis-users.acl    Redis ACL users, passwords as SHA-256 hashes (Redis `#<hash>` form)
#   cam0.env .. camN.env, edge.env, cloud.env, monitor.env
#                      ADA_DDNN_MQTT_URL / ADA_DDNN_REDIS_URL with each role's own user and password
#   edge0.env .. edge{EDGES-1}.env
#                      each aggregator's own, unguessable ADA_DDNN_SERVICE_ID (in its MQTT client ids and
#                      persistent session: two aggregators must never share one)
#   mosquitto.env, redis.env   the health checks' credentials (read-only users)
#   redis-admin.env    the Redis `default` (admin) password: kept here for the operator, mounted nowhere
#
# MQTT users: SITE-cam0 .. SITE-cam{CAMERAS-1}, SITE-edge, SITE-cloud, SITE-monitor, SITE-health.
# Redis users: SITE-edge, SITE-cloud, SITE-monitor, SITE-health, and `default` as admin.
# Passwords are 32 characters of URL-safe base64 (192 random bits), so they go into URLs as they are.
# Plain passwords never appear on a command line (mosquitto_passwd -U hashes a file in place).
# Never commit DIR: docker/.gitignore ignores docker/secrets/.
#
# Env: MQTT_HOST (default 127.0.0.1), MQTT_PORT (ADA_DDNN_MQTT_PORT, else 1883), REDIS_HOST
# (127.0.0.1), REDIS_PORT (ADA_DDNN_REDIS_PORT, else 6379): where the services reach the brokers
# (docker/compose.yaml runs every container with host networking, the brokers on 127.0.0.1);
# EDGES (2): aggregators. For TLS, edit the URLs to mqtts://...:8883?ca=... and rediss://...
# (see docs/SECURITY.md).
# Without a local mosquitto_passwd the eclipse-mosquitto:2 image's is used (docker run).
set -euo pipefail

usage() { echo "usage: $0 SITE DIR [CAMERAS]   (SITE: [A-Za-z0-9_-]{1,64}; CAMERAS: 1..256, default 6)" >&2; exit 2; }
[[ $# -ge 2 && $# -le 3 ]] || usage
site=$1 dir=$2 cameras=${3:-6}
[[ $site =~ ^[A-Za-z0-9_-]{1,64}$ ]] || usage
[[ $cameras =~ ^[0-9]+$ ]] && (( cameras >= 1 && cameras <= 256 )) || usage
mqtt_host=${MQTT_HOST:-127.0.0.1} mqtt_port=${MQTT_PORT:-${ADA_DDNN_MQTT_PORT:-1883}}
redis_host=${REDIS_HOST:-127.0.0.1} redis_port=${REDIS_PORT:-${ADA_DDNN_REDIS_PORT:-6379}}
edges=${EDGES:-2}
[[ $edges =~ ^[0-9]+$ ]] && (( edges >= 1 && edges <= 64 )) || { echo "$0: EDGES must be 1..64" >&2; exit 2; }

if [[ -e $dir/mosquitto.passwd || -e $dir/redis-users.acl ]]; then
    echo "$0: $dir already holds credentials; move it away first (old passwords stop working)" >&2
    exit 1
fi
umask 077
mkdir -p "$dir"
chmod 700 "$dir"

password() { head -c 24 /dev/urandom | base64 | tr '+/' '-_'; }
sha256() {
    if command -v sha256sum >/dev/null; then printf '%s' "$1" | sha256sum | cut -d' ' -f1
    else printf '%s' "$1" | shasum -a 256 | cut -d' ' -f1; fi
}

# --- passwords ---------------------------------------------------------------------------------
declare -A pw
users=()
for ((k = 0; k < cameras; k++)); do users+=("cam$k"); done
users+=(edge cloud monitor health)
for role in "${users[@]}"; do pw[$role]=$(password); done
declare -A rpw  # Redis passwords, distinct from the MQTT ones
for role in edge cloud monitor health; do rpw[$role]=$(password); done
admin=$(password)

# --- Mosquitto: password file (plain, then hashed in place) -------------------------------------
passwd=$dir/mosquitto.passwd
: >"$passwd"
for role in "${users[@]}"; do printf '%s-%s:%s\n' "$site" "$role" "${pw[$role]}" >>"$passwd"; done
if command -v mosquitto_passwd >/dev/null; then
    mosquitto_passwd -U "$passwd"
else
    docker run --rm --user "$(id -u):$(id -g)" -v "$(cd "$dir" && pwd)":/work eclipse-mosquitto:2 \
        mosquitto_passwd -U /work/mosquitto.passwd
fi
if grep -q -v ':\$7\$' "$passwd"; then  # every line must hold a PBKDF2-SHA512 hash
    echo "$0: mosquitto_passwd left plain passwords in $passwd" >&2
    rm -f "$passwd"
    exit 1
fi
# The broker runs as its own user inside the container and must read the file: only hashes are
# in it, and DIR itself is closed to other users of this host.
chmod 644 "$passwd"

# --- Mosquitto: ACL (no rule, no right: a user gets exactly the topics listed under it) --------
acl=$dir/mosquitto.acl
{
    echo "# Mosquitto ACL of site $site, made by docker/make-passwords.sh: regenerate it, don't edit it."
    echo "# No rule, no right: each user may use exactly the topics listed under it (write = publish,"
    echo "# read = receive; Mosquitto's ACL file grants every SUBSCRIBE and filters at delivery)."
    echo "# Anonymous clients are refused (allow_anonymous false). Topics: pipeline/wire/names.py."
    echo
    echo "# Camera k publishes its own observations (or, with lazy upload, summaries and, when asked,"
    echo "# its features), shed notices and status (retained, and its last will); it reads and may"
    echo "# announce the site clock, reads the aggregators' flow status and their feature requests."
    for ((k = 0; k < cameras; k++)); do
        echo "user $site-cam$k"
        echo "topic write ada/$site/cam/$k/obs"
        echo "topic write ada/$site/cam/$k/feat"
        echo "topic write ada/$site/cam/$k/shed"
        echo "topic write ada/$site/cam/$k/status"
        echo "topic readwrite ada/$site/clock"
        echo "topic read ada/$site/edge/flow/+"
        echo "topic read ada/$site/edge/request"
        echo
    done
    echo "# Edge aggregators read every camera's observations, feature answers and shed notices (through"
    echo "# their \$share/GROUP/... subscriptions) and publish results, their flow status and feature requests."
    echo "user $site-edge"
    echo "topic read ada/$site/cam/+/obs"
    echo "topic read ada/$site/cam/+/feat"
    echo "topic read ada/$site/cam/+/shed"
    echo "topic write ada/$site/results"
    echo "topic write ada/$site/edge/flow/+"
    echo "topic write ada/$site/edge/request"
    echo
    echo "# Cloud workers publish results; they read escalations from Redis, nothing from MQTT."
    echo "user $site-cloud"
    echo "topic write ada/$site/results"
    echo
    echo "# Monitoring (ada-ddnn camera --check, dashboards, result collectors): read-only."
    echo "user $site-monitor"
    echo "topic read ada/$site/results"
    echo "topic read ada/$site/cam/+/status"
    echo "topic read ada/$site/clock"
    echo "topic read ada/$site/edge/flow/+"
    echo
    echo "# The broker's health check."
    echo "user $site-health"
    echo "topic read \$SYS/broker/uptime"
} >"$acl"
chmod 644 "$acl"

# --- Redis: ACL users (hashed passwords; `default` is the admin, and must be set: left out, it
# would be a passwordless superuser) ----------------------------------------------------------
keys="resetkeys ~ada:{$site}:* resetchannels"  # the site is the keys' hash tag: ada:{site0}:...
{
    echo "user default on #$(sha256 "$admin") ~* &* +@all"
    # edge and cloud share the site's keyspace (the edge's Lua scripts and the cloud's result
    # recording touch the same per-frame markers); neither may run admin commands.
    # ada:sites: the edge announces its site there, a cloud worker with --sites '*' reads it.
    echo "user $site-edge on #$(sha256 "${rpw[edge]}") $keys ~ada:sites +@all -@dangerous"
    echo "user $site-cloud on #$(sha256 "${rpw[cloud]}") $keys %R~ada:sites +@all -@dangerous"
    echo "user $site-monitor on #$(sha256 "${rpw[monitor]}") $keys -@all +@read +@connection -@dangerous"
    echo "user $site-health on #$(sha256 "${rpw[health]}") resetkeys resetchannels -@all +ping +hello"
} >"$dir/redis-users.acl"
chmod 644 "$dir/redis-users.acl"  # hashes only; Redis runs as its own user in the container

# --- env files the compose services read ------------------------------------------------------
mqtt() { printf 'mqtt://%s-%s:%s@%s:%s' "$site" "$1" "${pw[$1]}" "$mqtt_host" "$mqtt_port"; }
redis() { printf 'redis://%s-%s:%s@%s:%s/0' "$site" "$1" "${rpw[$1]}" "$redis_host" "$redis_port"; }
for ((k = 0; k < cameras; k++)); do
    printf 'ADA_DDNN_MQTT_URL=%s\n' "$(mqtt "cam$k")" >"$dir/cam$k.env"
done
for role in edge cloud monitor; do
    printf 'ADA_DDNN_MQTT_URL=%s\nADA_DDNN_REDIS_URL=%s\n' "$(mqtt $role)" "$(redis $role)" >"$dir/$role.env"
done
# The aggregators' shared-subscription group is a secret: Mosquitto's ACL file does not check
# SUBSCRIBE, and a client that joined the group would be handed a share of the observations,
# which the broker then drops at delivery for want of read access.
printf 'ADA_DDNN_SHARE_GROUP=edge-%s\n' "$(password | tr -d '_-' | cut -c1-24)" >>"$dir/edge.env"
# A stable, unguessable id per aggregator: its MQTT session survives its own restart (persistent
# session), and no other client can take that session over by guessing the id.
for ((e = 0; e < edges; e++)); do
    printf 'ADA_DDNN_SERVICE_ID=edge%d-%s\n' "$e" "$(password | tr -d '_-' | cut -c1-16)" >"$dir/edge$e.env"
done
printf 'HEALTH_USER=%s-health\nHEALTH_PASSWORD=%s\n' "$site" "${pw[health]}" >"$dir/mosquitto.env"
printf 'HEALTH_USER=%s-health\nREDISCLI_AUTH=%s\n' "$site" "${rpw[health]}" >"$dir/redis.env"
printf 'REDISCLI_AUTH=%s\n' "$admin" >"$dir/redis-admin.env"
# Compose reads env files as the invoking user, the containers get the values: keep them 600.

echo "wrote credentials of site $site ($cameras cameras) to $dir"
