#!/usr/bin/env bash
# Nova 34's databases on MariaDB, as production runs them, for `metaproxy api`
# with source = "nova" (docs/nova-source.md). Not wired into scripts/test.sh
# yet: run by hand after scripts/peers/up.sh (it reuses the nova venv, the
# peers' nova.conf and fixture).
#
#   scripts/peers/nova-mariadb.sh start   mariadbd on 127.0.0.1:$MARIADB_PORT
#                                          (default 13306) and a socket under
#                                          $PEERS_DIR/mariadb, fresh nova,
#                                          nova_api, nova_cell0 (nova-manage
#                                          with PyMySQL), the fixture's
#                                          instances via populate_nova.py;
#                                          writes $PEERS_DIR/mariadb/api.toml
#   scripts/peers/nova-mariadb.sh stop    kill the recorded mariadbd PID only
#
# Then: metaproxy api --config $PEERS_DIR/mariadb/api.toml (port 18777) and
#   python3 scripts/peers/nova-compare.py 8775 18777
# compares it with the peers' nova-api-metadata (on SQLite, same fixture).
#
# Needs Debian's mariadb-server installed without starting its service, e.g.
#   printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
#   apt-get install -y --no-install-recommends mariadb-server; rm /usr/sbin/policy-rc.d
set -euo pipefail
# shellcheck source=scripts/peers/lib.sh
. "$(dirname "$0")/lib.sh"

RUN=$PEERS_DIR/mariadb
PORT=${MARIADB_PORT:-13306}
PIDFILE=$RUN/mariadbd.pid
# A password with URL-reserved characters: nova.conf carries it percent-encoded.
URL="mysql+pymysql://nova:p%40ss%3Aw0rd@127.0.0.1:$PORT"

start() {
  command -v mariadbd >/dev/null || peers_die "mariadbd not installed (see the header of $0)"
  [ -f "$PEERS_DIR/nova/etc/nova.conf" ] || peers_die "run scripts/peers/up.sh first"
  [ -f "$PIDFILE" ] && stop
  port_busy "$PORT" && peers_die "127.0.0.1:$PORT is already in use by another process"
  rm -rf "$RUN"; mkdir -p "$RUN"; chown mysql:mysql "$RUN"
  mariadb-install-db --user=mysql --datadir="$RUN/data" --auth-root-authentication-method=socket \
    >"$RUN/install.log" 2>&1 || peers_die "mariadb-install-db failed; log $RUN/install.log"
  setsid mariadbd --user=mysql --datadir="$RUN/data" --socket="$RUN/sock" --port="$PORT" \
    --bind-address=127.0.0.1 --pid-file="$RUN/server.pid" --log-error="$RUN/err.log" \
    --skip-log-bin </dev/null >/dev/null 2>&1 &
  echo $! >"$PIDFILE"
  for _ in $(seq 1 60); do [ -S "$RUN/sock" ] && break; sleep 0.5; done
  [ -S "$RUN/sock" ] || peers_die "mariadbd did not start; log $RUN/err.log"
  mariadb --socket="$RUN/sock" -uroot -e "
    CREATE DATABASE nova; CREATE DATABASE nova_api; CREATE DATABASE nova_cell0;
    CREATE USER 'nova'@'127.0.0.1' IDENTIFIED BY 'p@ss:w0rd';
    GRANT ALL ON nova.* TO 'nova'@'127.0.0.1'; GRANT ALL ON nova_api.* TO 'nova'@'127.0.0.1';
    GRANT ALL ON nova_cell0.* TO 'nova'@'127.0.0.1';"
  "$NOVA_VENV/bin/python" -c 'import pymysql' 2>/dev/null \
    || "$NOVA_VENV/bin/pip" install -q PyMySQL >"$RUN/pip.log" 2>&1 \
    || peers_die "pip install PyMySQL failed; log $RUN/pip.log"
  local conf=$RUN/nova.conf
  sed -e "s|^connection = sqlite:///.*nova_api.db|connection = $URL/nova_api?charset=utf8|" \
      -e "s|^connection = sqlite:///.*nova.db|connection = $URL/nova?charset=utf8|" \
      -e "s|^state_path = .*|state_path = $RUN|" -e "s|^lock_path = .*|lock_path = $RUN|" \
      "$PEERS_DIR/nova/etc/nova.conf" >"$conf"
  local NM="$NOVA_VENV/bin/nova-manage --config-file $conf" t0=$SECONDS
  { $NM api_db sync &&
    $NM cell_v2 map_cell0 --database_connection "$URL/nova_cell0?charset=utf8" &&
    $NM cell_v2 create_cell --name cell1 --database_connection "$URL/nova?charset=utf8" --transport-url fake:/ &&
    $NM db sync; } >"$RUN/manage.log" 2>&1 || peers_die "nova-manage failed; log $RUN/manage.log"
  peers_log "MariaDB nova DBs synced in $((SECONDS - t0)) s"
  "$NOVA_VENV/bin/python" "$PEERS_HERE/nova/populate_nova.py" "$conf" "$PEERS_FIXTURE" \
    2>"$RUN/populate.log" | sed 's/^/[peers] /' || peers_die "populate_nova.py failed"
  cat >"$RUN/api.toml" <<TOML
[api]
listen = "127.0.0.1:18777"
metadata_proxy_shared_secret = "$PEERS_SECRET"
source = "nova"
vendor_data_json = "$PEERS_HERE/nova/vendor_data.json"
[api.nova]
connection = "$URL/nova?charset=utf8"
api_connection = "$URL/nova_api?charset=utf8"
[api.neutron]
url = "$NEUTRON_URL"
auth_strategy = "noauth"
TOML
  peers_log "mariadbd pid $(cat "$PIDFILE") on 127.0.0.1:$PORT; metaproxy config $RUN/api.toml"
}

# Kill exactly the recorded PID, if it still is a mariadbd, and wait for it.
stop() {
  [ -f "$PIDFILE" ] || { peers_log "mariadbd: not running (no $PIDFILE)"; return 0; }
  local pid; pid=$(cat "$PIDFILE")
  if kill -0 "$pid" 2>/dev/null && ps -o args= -p "$pid" | grep -q mariadbd; then
    kill -TERM "$pid"
    for _ in $(seq 1 80); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -0 "$pid" 2>/dev/null && { peers_log "mariadbd: pid $pid ignored SIGTERM, SIGKILL"; kill -KILL "$pid"; }
    peers_log "mariadbd: stopped pid $pid"
  else
    peers_log "mariadbd: pid $pid is not a running mariadbd: not touching it"
  fi
  rm -f "$PIDFILE"
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
