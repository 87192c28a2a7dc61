#!/usr/bin/env bash
# Real nova 34.0.0 metadata API (nova.wsgi.metadata, i.e. nova-api-metadata)
# on 127.0.0.1:$NOVA_PORT (default 8775): SQLite api/cell0/cell1 DBs synced
# with nova's own migrations, `fake:/` transport, service_metadata_proxy=True
# with shared secret $PEERS_SECRET (s3cr3t-shared), no metadata cache,
# vendor_data from a static JSON file, security groups read live from the
# neutron peer ($NEUTRON_URL, auth_type=none).  Instances are created with
# nova's own Instance.create() from the fixture written by populate.py.
#
#   scripts/peers/nova.sh start [FIXTURE]   fresh DBs + instances + start
#                                           (FIXTURE defaults to $PEERS_FIXTURE)
#   scripts/peers/nova.sh stop              kill the recorded gunicorn PID only
#   scripts/peers/nova.sh status
# State: $PEERS_DIR/nova/ (configs, *.db, nova-metadata.{pid,log}).
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
connection = sqlite:///$RUN/nova_api.db

[database]
connection = sqlite:///$RUN/nova.db

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
  [ -f "$PIDFILE" ] && stop_pidfile "$PIDFILE" nova-metadata
  port_busy "$NOVA_PORT" && peers_die "127.0.0.1:$NOVA_PORT is already in use by another process (not ours)"
  render_config
  local t0=$SECONDS mlog=$RUN/nova-manage.log
  rm -f "$RUN/nova_api.db" "$RUN/nova.db" "$RUN/nova_cell0.db"
  : >"$mlog"
  NM() { "$NOVA_VENV/bin/nova-manage" --config-file "$CONF" "$@" >>"$mlog" 2>&1 \
           || { tail -n 30 "$mlog" >&2; peers_die "nova-manage $* failed; log $mlog"; }; }
  NM api_db sync        # nova's alembic migrations are SQLite-safe
  NM cell_v2 map_cell0 --database_connection "sqlite:///$RUN/nova_cell0.db"
  NM cell_v2 create_cell --name cell1 --database_connection "sqlite:///$RUN/nova.db" --transport-url fake:/
  NM db sync            # [database] (= cell1) and cell0
  peers_log "nova DBs synced in $((SECONDS - t0)) s"
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

case ${1:-} in
  start) shift; start "$@" ;;
  stop) stop_pidfile "$PIDFILE" nova-metadata ;;
  status)
    if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null && ! is_zombie "$(cat "$PIDFILE")"; then
      echo "nova-metadata running, pid $(cat "$PIDFILE"), $NOVA_URL"
    else echo "nova-metadata not running"; exit 1; fi ;;
  *) echo "usage: $0 start [FIXTURE]|stop|status" >&2; exit 2 ;;
esac
