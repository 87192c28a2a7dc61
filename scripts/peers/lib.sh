# shellcheck shell=bash disable=SC2034
# Common settings for the OpenStack peer scripts (sourced, not executed).
# Everything lives OUTSIDE the repo under $PEERS_DIR and binds 127.0.0.1 only.
PEERS_HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PEERS_DIR=${PEERS_DIR:-/tmp/metaproxy-peers}
PEERS_PYTHON=${PEERS_PYTHON:-python3}          # needs >= 3.10
NEUTRON_VENV=${NEUTRON_VENV:-$PEERS_DIR/neutron-venv}
NOVA_VENV=${NOVA_VENV:-$PEERS_DIR/nova-venv}
NEUTRON_VERSION=29.0.0
NOVA_VERSION=34.0.0
PYMYSQL_VERSION=1.2.4
NEUTRON_PORT=${NEUTRON_PORT:-9696}
NOVA_PORT=${NOVA_PORT:-8775}
NEUTRON_URL=http://127.0.0.1:$NEUTRON_PORT
NOVA_URL=http://127.0.0.1:$NOVA_PORT
PEERS_SECRET=${PEERS_SECRET:-s3cr3t-shared}
PEERS_FIXTURE=${PEERS_FIXTURE:-$PEERS_DIR/fixture.json}
# Nova's databases: "mariadb" (as production runs them; what scripts/test.sh
# uses) or "sqlite" (no server, the fast path for local runs).
NOVA_DB=${NOVA_DB:-sqlite}
MARIADB_PORT=${MARIADB_PORT:-13306}
MARIADB_DIR=$PEERS_DIR/mariadb

peers_log() { echo "[peers $(date -u +%H:%M:%S)] $*"; }
peers_die() { echo "[peers] ERROR: $*" >&2; exit 1; }

# venv_ok VENV DIST VERSION: true if DIST==VERSION and gunicorn are importable
venv_ok() {
  [ -x "$1/bin/python" ] && [ -x "$1/bin/gunicorn" ] && "$1/bin/python" - "$2" "$3" <<'PY' 2>/dev/null
import importlib, importlib.metadata as md, sys
dist, ver = sys.argv[1], sys.argv[2]
assert md.version(dist) == ver, md.version(dist)
importlib.import_module(dist)
import gunicorn  # noqa: F401
PY
}

# port_busy PORT: true if something listens on 127.0.0.1:PORT
port_busy() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# stop_pidfile PIDFILE NAME: kill exactly the recorded PID (gunicorn master,
# which takes its workers down), wait for it, remove the file.
stop_pidfile() {
  local pidfile=$1 name=$2 pid
  [ -f "$pidfile" ] || { peers_log "$name: not running (no $pidfile)"; return 0; }
  pid=$(cat "$pidfile")
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && ! is_zombie "$pid"; then
    # a stale PID file (e.g. after a reboot) may name someone else's process
    if ! ps -o args= -p "$pid" 2>/dev/null | grep -q gunicorn; then
      peers_log "$name: pid $pid is not a gunicorn process any more: not touching it"
      rm -f "$pidfile"; return 0
    fi
    local kids; kids=$(pgrep -P "$pid" || true)
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 40); do
      { kill -0 "$pid" 2>/dev/null && ! is_zombie "$pid"; } || break
      sleep 0.25
    done
    if kill -0 "$pid" 2>/dev/null && ! is_zombie "$pid"; then
      peers_log "$name: pid $pid ignored SIGTERM for 10 s, sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      for k in $kids; do kill -KILL "$k" 2>/dev/null || true; done
    fi
    peers_log "$name: stopped pid $pid"
  else
    peers_log "$name: pid $pid already gone"
  fi
  rm -f "$pidfile"
}

# A process whose parent does not reap it stays <defunct>: treat as gone.
is_zombie() {
  [ "$(ps -o stat= -p "$1" 2>/dev/null | cut -c1)" = Z ]
}

# wait_http URL SECONDS PID NAME LOG: poll until URL answers 2xx
wait_http() {
  local url=$1 secs=$2 pid=$3 name=$4 log=$5 t0=$SECONDS
  while [ $((SECONDS - t0)) -lt "$secs" ]; do
    if curl -sf -o /dev/null --max-time 5 "$url"; then
      peers_log "$name ready at $url after $((SECONDS - t0)) s (pid $pid)"
      return 0
    fi
    if ! kill -0 "$pid" 2>/dev/null || is_zombie "$pid"; then
      tail -n 30 "$log" >&2
      peers_die "$name (pid $pid) exited during startup; log: $log"
    fi
    sleep 0.5
  done
  tail -n 30 "$log" >&2
  kill -TERM "$pid" 2>/dev/null || true
  peers_die "$name not ready after $secs s (pid $pid terminated); log: $log"
}
