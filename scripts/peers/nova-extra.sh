#!/usr/bin/env bash
# Another real nova-api-metadata (nova 34, gunicorn) on the databases of the
# running peers (scripts/peers/up.sh): the peers' own nova.conf with its own
# port, worker count and metadata cache. For tests that restart Nova
# (tests/peers_nova_source.rs), the password race measurement
# (scripts/peers/nova-password-race.py) and the storm comparison
# (scripts/bench-nova-storm.sh). The peers' own Nova on :8775 is untouched.
#
#   scripts/peers/nova-extra.sh start NAME PORT [WORKERS=1] [CACHE=0]
#       CACHE: [api] metadata_cache_expiration in seconds, or "default"
#       (the option unset: Nova's default, 15 s). Waits until it answers;
#       prints its PID.
#   scripts/peers/nova-extra.sh stop NAME
#       SIGTERM to the recorded gunicorn master PID only, which stops its
#       workers (--graceful-timeout 1: a stop does not wait for idle
#       keep-alive connections); SIGKILL after 10 s.
# State: $PEERS_DIR/nova-extra/NAME/ (nova.conf, gunicorn.pid, gunicorn.log).
set -euo pipefail
# shellcheck source=scripts/peers/lib.sh
. "$(dirname "$0")/lib.sh"

CONF0=$PEERS_DIR/nova/etc/nova.conf

start() {
  local name=$1 port=$2 workers=${3:-1} cache=${4:-0} run
  [ -f "$CONF0" ] || peers_die "no $CONF0: run scripts/peers/up.sh first"
  run=$PEERS_DIR/nova-extra/$name
  [ -f "$run/gunicorn.pid" ] && stop "$name"
  port_busy "$port" && peers_die "127.0.0.1:$port is already in use"
  mkdir -p "$run"
  # The peers' nova.conf with this port and cache (no other line changes).
  awk -v port="$port" -v cache="$cache" '
    /^metadata_listen_port *=/ { print "metadata_listen_port = " port; next }
    /^metadata_cache_expiration *=/ {
      if (cache != "default") print "metadata_cache_expiration = " cache
      else print "# metadata_cache_expiration: Nova'\''s default (15 s)"
      next }
    { print }' "$CONF0" >"$run/nova.conf"
  OS_NOVA_CONFIG_DIR=/ OS_NOVA_CONFIG_FILES="$NOVA_VENV/etc/nova/api-paste.ini;$run/nova.conf" \
    setsid "$NOVA_VENV/bin/gunicorn" --chdir "$PEERS_HERE/nova" \
      -b "127.0.0.1:$port" -w "$workers" -k gthread --threads 4 --timeout 120 --graceful-timeout 1 \
      --no-control-socket \
      nova_metadata_app:application >"$run/gunicorn.log" 2>&1 </dev/null &
  local pid=$!
  echo "$pid" >"$run/gunicorn.pid"
  wait_http "http://127.0.0.1:$port/" 180 "$pid" "nova-extra $name" "$run/gunicorn.log" >&2
  echo "$pid"
}

stop() {
  stop_pidfile "$PEERS_DIR/nova-extra/$1/gunicorn.pid" "nova-extra $1" >&2
}

case ${1:-} in
  start) [ $# -ge 3 ] || { echo "usage: $0 start NAME PORT [WORKERS] [CACHE]" >&2; exit 2; }; shift; start "$@" ;;
  stop) [ $# -eq 2 ] || { echo "usage: $0 stop NAME" >&2; exit 2; }; stop "$2" ;;
  *) echo "usage: $0 start NAME PORT [WORKERS] [CACHE] | stop NAME" >&2; exit 2 ;;
esac
