#!/usr/bin/env bash
# Real nova 34.0.0 metadata API (nova.wsgi.metadata, i.e. nova-api-metadata)
# on 127.0.0.1:$NOVA_PORT (default 8775): api/cell0/cell1 DBs synced with
# nova's own migrations, on SQLite files (NOVA_DB=sqlite, the default) or on
# a private MariaDB through PyMySQL (NOVA_DB=mariadb, scripts/peers/
# nova-mariadb.sh; what scripts/test.sh uses), `fake:/` transport,
# service_metadata_proxy=True with shared secret $PEERS_SECRET
# (s3cr3t-shared), no metadata cache, vendor_data from a static JSON file,
# security groups read live from the neutron peer ($NEUTRON_URL,
# auth_type=none).  Instances are created with nova's own Instance.create()
# from the fixture written by populate.py.
#
#   scripts/peers/nova.sh start [FIXTURE]   fresh DBs + instances + start
#                                           (FIXTURE defaults to $PEERS_FIXTURE)
#   scripts/peers/nova.sh stop              kill the recorded gunicorn PID only
#                                           (and the recorded mariadbd, if any)
#   scripts/peers/nova.sh status
# State: $PEERS_DIR/nova/ (configs, *.db, nova-metadata.{pid,log}), and
# db.env there: NOVA_DB, NOVA_CONNECTION, NOVA_API_CONNECTION (oslo.db URLs,
# for `metaproxy api --source nova`); metaproxy-api.toml there is a config of
# `metaproxy api` on the same databases (port 18777), for nova-compare.py.
set -euo pipefail
# shellcheck source=scripts/peers/lib.sh
. "$(dirname "$0")/lib.sh"

RUN=$PEERS_DIR/nova
ETC=$RUN/etc
PIDFILE=$RUN/nova-metadata.pid
LOG=$RUN/nova-metadata.log
CONF=$ETC/nova.conf

render_config() {
  mkdir -p "$ETC" "$RUN/lock"
  cp "$PEERS_HERE/nova/vendor_data.json" "$ETC/vendor_data.json"
  cat >"$CONF" <<CONF
# rendered by scripts/peers/nova.sh
[DEFAULT]
host = metaproxy-peer
# oslo.messaging in-process fake driver: no RabbitMQ, no conductor
transport_url = fake:/
state_path = $RUN
debug = False
use_stderr = True
enabled_apis = metadata
metadata_listen = 127.0.0.1
metadata_listen_port = $NOVA_PORT

[api]
# look the instance up in [database] directly (no cell mapping lookup)
local_metadata_per_cell = True
# 0 = no in-process metadata cache: every request reads the DB
metadata_cache_expiration = 0
vendordata_providers = StaticJSON
vendordata_jsonfile_path = $ETC/vendor_data.json
dhcp_domain = novalocal

[api_database]
connection = $API_URL

[database]
connection = $CELL_URL

[neutron]
service_metadata_proxy = True
metadata_proxy_shared_secret = $PEERS_SECRET
# security groups for the metadata are read from the neutron peer (noauth)
auth_type = none
endpoint_override = $NEUTRON_URL
region_name = RegionOne

[oslo_concurrency]
lock_path = $RUN/lock

[wsgi]
api_paste_config = $NOVA_VENV/etc/nova/api-paste.ini

[placement]
auth_type = none

[cinder]
auth_type = none
CONF
}

start() {
  local fixture=${1:-$PEERS_FIXTURE}
  [ -f "$fixture" ] || peers_die "fixture $fixture not found (run populate.py first)"
  venv_ok "$NOVA_VENV" nova "$NOVA_VERSION" \
    || peers_die "nova $NOVA_VERSION not installed in $NOVA_VENV: run scripts/peers/install.sh"
  [ -f "$PIDFILE" ] && stop
  port_busy "$NOVA_PORT" && peers_die "127.0.0.1:$NOVA_PORT is already in use by another process (not ours)"
  local t0=$SECONDS mlog=$RUN/nova-manage.log CELL0_URL
  rm -f "$RUN/nova_api.db" "$RUN/nova.db" "$RUN/nova_cell0.db" "$RUN/db.env"
  case $NOVA_DB in
    sqlite)
      API_URL=sqlite:///$RUN/nova_api.db CELL_URL=sqlite:///$RUN/nova.db
      CELL0_URL=sqlite:///$RUN/nova_cell0.db ;;
    mariadb)
      "$NOVA_VENV/bin/python" -c 'import pymysql' 2>/dev/null \
        || peers_die "PyMySQL is not installed in $NOVA_VENV: run scripts/peers/install.sh"
      "$PEERS_HERE/nova-mariadb.sh" start
      # shellcheck disable=SC1091
      . "$MARIADB_DIR/env"
      API_URL="$MARIADB_URL/nova_api?charset=utf8" CELL_URL="$MARIADB_URL/nova?charset=utf8"
      CELL0_URL="$MARIADB_URL/nova_cell0?charset=utf8" ;;
    *) peers_die "NOVA_DB must be sqlite or mariadb, not '$NOVA_DB'" ;;
  esac
  render_config
  mkdir -p "$RUN"; : >"$mlog"
  NM() { "$NOVA_VENV/bin/nova-manage" --config-file "$CONF" "$@" >>"$mlog" 2>&1 \
           || { tail -n 30 "$mlog" >&2; peers_die "nova-manage $* failed; log $mlog"; }; }
  NM api_db sync        # nova's alembic migrations (SQLite-safe too)
  NM cell_v2 map_cell0 --database_connection "$CELL0_URL"
  NM cell_v2 create_cell --name cell1 --database_connection "$CELL_URL" --transport-url fake:/
  NM db sync            # [database] (= cell1) and cell0
  peers_log "nova DBs synced on $NOVA_DB in $((SECONDS - t0)) s"
  write_db_env
  "$NOVA_VENV/bin/python" "$PEERS_HERE/nova/populate_nova.py" "$CONF" "$fixture" \
      2>"$RUN/populate.log" | sed 's/^/[peers] /' \
    || { tail -n 30 "$RUN/populate.log" >&2; peers_die "populate_nova.py failed"; }
  OS_NOVA_CONFIG_DIR=/ OS_NOVA_CONFIG_FILES="$NOVA_VENV/etc/nova/api-paste.ini;$CONF" \
    setsid "$NOVA_VENV/bin/gunicorn" --chdir "$PEERS_HERE/nova" \
      -b "127.0.0.1:$NOVA_PORT" -w 1 -k gthread --threads 4 --timeout 120 \
      --no-control-socket \
      nova_metadata_app:application >"$LOG" 2>&1 </dev/null &
  local pid=$!
  echo "$pid" >"$PIDFILE"
  wait_http "$NOVA_URL/" 180 "$pid" nova-metadata "$LOG"
}

# db.env (sourced by up.sh) and a metaproxy config on the same databases.
write_db_env() {
  printf '# written by scripts/peers/nova.sh\nNOVA_DB=%q\nNOVA_CONNECTION=%q\nNOVA_API_CONNECTION=%q\n' \
    "$NOVA_DB" "$CELL_URL" "$API_URL" >"$RUN/db.env"
  cat >"$RUN/metaproxy-api.toml" <<TOML
# written by scripts/peers/nova.sh: metaproxy api on the databases nova-api-metadata serves
[api]
listen = "127.0.0.1:18777"
metadata_proxy_shared_secret = "$PEERS_SECRET"
source = "nova"
vendor_data_json = "$PEERS_HERE/nova/vendor_data.json"
[api.nova]
connection = "$CELL_URL"
api_connection = "$API_URL"
metadata_cache_expiration = 0
[api.neutron]
url = "$NEUTRON_URL"
auth_strategy = "noauth"
TOML
}

stop() {
  stop_pidfile "$PIDFILE" nova-metadata
  rm -f "$RUN/db.env"
  # whatever NOVA_DB says now: a server the last start left must go
  if [ -f "$MARIADB_DIR/mariadbd.pid" ]; then "$PEERS_HERE/nova-mariadb.sh" stop; fi
}

case ${1:-} in
  start) shift; start "$@" ;;
  stop) stop ;;
  status)
    if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null && ! is_zombie "$(cat "$PIDFILE")"; then
      echo "nova-metadata running, pid $(cat "$PIDFILE"), $NOVA_URL"
    else echo "nova-metadata not running"; exit 1; fi ;;
  *) echo "usage: $0 start [FIXTURE]|stop|status" >&2; exit 2 ;;
esac
