#!/usr/bin/env bash
# Real neutron 29.0.0 API on 127.0.0.1:$NEUTRON_PORT (default 9696):
# ML2 (local/flat/vlan, no mechanism driver) + router plugin, noauth (every
# request is admin), SQLite, oslo.messaging `fake:/` (no RabbitMQ), gunicorn
# gthread with --limit-request-line 0 (batched fixed_ips queries).
#
#   scripts/peers/neutron.sh start    fresh DB + start, wait until ready
#   scripts/peers/neutron.sh stop     kill the recorded gunicorn PID only
#   scripts/peers/neutron.sh status
# State: $PEERS_DIR/neutron/ (configs, neutron.db, neutron-api.{pid,log}).
set -euo pipefail
# shellcheck source=scripts/peers/lib.sh
. "$(dirname "$0")/lib.sh"

RUN=$PEERS_DIR/neutron
ETC=$RUN/etc
PIDFILE=$RUN/neutron-api.pid
LOG=$RUN/neutron-api.log
DB=$RUN/neutron.db

render_config() {
  mkdir -p "$ETC" "$RUN/lock"
  cat >"$ETC/neutron.conf" <<CONF
# rendered by scripts/peers/neutron.sh
[DEFAULT]
core_plugin = ml2
service_plugins = router
auth_strategy = noauth
# oslo.messaging in-process fake driver: no RabbitMQ needed for the API
transport_url = fake:/
bind_host = 127.0.0.1
bind_port = $NEUTRON_PORT
host = metaproxy-peer
state_path = $RUN
api_paste_config = $NEUTRON_VENV/etc/neutron/api-paste.ini
debug = False
use_stderr = True
notify_nova_on_port_status_changes = False
notify_nova_on_port_data_changes = False
dhcp_agent_notification = False
allow_overlapping_ips = True
rpc_workers = 0
rpc_state_report_workers = 0
# how long after its last report_state an agent shows dead (Neutron's 75 s;
# tests/peers_report.rs sets NEUTRON_AGENT_DOWN_TIME short to see it die)
agent_down_time = ${NEUTRON_AGENT_DOWN_TIME:-75}

[database]
connection = sqlite:///$DB

[oslo_concurrency]
lock_path = $RUN/lock

[agent]
root_helper = sudo
CONF
  cat >"$ETC/ml2_conf.ini" <<'CONF'
# rendered by scripts/peers/neutron.sh
[ml2]
type_drivers = local,flat,vlan
tenant_network_types = local
mechanism_drivers =
extension_drivers = port_security

[ml2_type_flat]
flat_networks = *

[ml2_type_vlan]
network_vlan_ranges = physnet1:100:199
CONF
}

start() {
  venv_ok "$NEUTRON_VENV" neutron "$NEUTRON_VERSION" \
    || peers_die "neutron $NEUTRON_VERSION not installed in $NEUTRON_VENV: run scripts/peers/install.sh"
  # restart semantics: a previous instance of ours goes first
  [ -f "$PIDFILE" ] && stop_pidfile "$PIDFILE" neutron-api
  port_busy "$NEUTRON_PORT" && peers_die "127.0.0.1:$NEUTRON_PORT is already in use by another process (not ours)"
  render_config
  local t0=$SECONDS
  rm -f "$DB"
  "$NEUTRON_VENV/bin/python" "$PEERS_HERE/neutron/create_schema.py" "sqlite:///$DB" >"$RUN/db.log" 2>&1 \
    || { tail -n 30 "$RUN/db.log" >&2; peers_die "schema creation failed"; }
  "$NEUTRON_VENV/bin/neutron-db-manage" --config-file "$ETC/neutron.conf" \
    --config-file "$ETC/ml2_conf.ini" stamp heads >>"$RUN/db.log" 2>&1 \
    || { tail -n 30 "$RUN/db.log" >&2; peers_die "neutron-db-manage stamp heads failed"; }
  peers_log "neutron schema created + stamped in $((SECONDS - t0)) s ($DB)"
  # --limit-request-line 0: the default 4094 bytes caps a batched
  # fixed_ips=ip_address%3D... query at ~110 IPv4 addresses.
  OS_NEUTRON_CONFIG_DIR=$ETC OS_NEUTRON_CONFIG_FILES='neutron.conf;ml2_conf.ini' \
    setsid "$NEUTRON_VENV/bin/gunicorn" --chdir "$PEERS_HERE/neutron" \
      -b "127.0.0.1:$NEUTRON_PORT" -w 1 -k gthread --threads 4 --timeout 120 \
      --limit-request-line 0 --no-control-socket \
      neutron_api_app:application >"$LOG" 2>&1 </dev/null &
  local pid=$!
  echo "$pid" >"$PIDFILE"
  wait_http "$NEUTRON_URL/v2.0/networks" 180 "$pid" neutron-api "$LOG"
}

case ${1:-} in
  start) start ;;
  stop) stop_pidfile "$PIDFILE" neutron-api ;;
  status)
    if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null && ! is_zombie "$(cat "$PIDFILE")"; then
      echo "neutron-api running, pid $(cat "$PIDFILE"), $NEUTRON_URL"
    else echo "neutron-api not running"; exit 1; fi ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
