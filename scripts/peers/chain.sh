#!/usr/bin/env bash
# Optional: the REAL neutron-metadata-agent, on top of the peers of up.sh
# (adapted from ../shared/peers/start_agent_chain.sh), all on loopback:
#
#   Unix socket $PEERS_DIR/chain/metadata_proxy -> neutron-metadata-agent
#     --RPC get_ports over RabbitMQ 127.0.0.1:5672--> neutron-rpc-server
#     (same SQLite DB as the peer neutron API) ;  agent -> nova metadata :8775
#
# tests/peers_chain.rs puts OUR proxy in front of that socket.
#   scripts/peers/chain.sh start    (after scripts/peers/up.sh)
#   scripts/peers/chain.sh stop     kills only the PIDs it recorded; stops
#                                   RabbitMQ only if this script started it
# Writes $PEERS_DIR/chain/env (METAPROXY_PEERS_CHAIN=1, the socket path).
# Needs Debian's rabbitmq-server (scripts/peers/install.sh --chain).
# RABBIT_VHOST (default /): a vhost of its own on a broker that another run
# of the peers shares, so that two rpc-servers do not take each other's
# q-reports-plugin messages (created here if missing).
set -euo pipefail
# shellcheck source=scripts/peers/lib.sh
. "$(dirname "$0")/lib.sh"

RUN=$PEERS_DIR/chain
RABBIT_VHOST=${RABBIT_VHOST:-/}
VHOST_PATH=$( [ "$RABBIT_VHOST" = / ] && echo / || echo "/$RABBIT_VHOST")
TRANSPORT_URL=rabbit://guest:guest@127.0.0.1:5672$VHOST_PATH
SOCK=$RUN/metadata_proxy
NETC=$PEERS_DIR/neutron/etc
export RABBITMQ_NODENAME=rabbit@localhost RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
       RABBITMQ_NODE_PORT=5672 ERL_EPMD_ADDRESS=127.0.0.1 RABBITMQ_DIST_PORT=25672 \
       RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS='-kernel inet_dist_use_interface {127,0,0,1} +sbwt none +sbwtdcpu none +sbwtdio none'

# stop_neutron PIDFILE NAME: kill the recorded PID (and the workers it forked)
# if it is still a neutron process; never anything else.
stop_neutron() {
  local pidfile=$1 name=$2 pid kids
  [ -f "$pidfile" ] || { peers_log "$name: not running (no $pidfile)"; return 0; }
  pid=$(cat "$pidfile")
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && ! is_zombie "$pid" \
     && ps -o args= -p "$pid" 2>/dev/null | grep -q "neutron-"; then
    kids=$(pgrep -P "$pid" || true)
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 40); do
      { kill -0 "$pid" 2>/dev/null && ! is_zombie "$pid"; } || break
      sleep 0.25
    done
    # rpc-server workers can hang in graceful shutdown: end them by PID
    for k in $kids; do kill -KILL "$k" 2>/dev/null || true; done
    kill -KILL "$pid" 2>/dev/null || true
    peers_log "$name: stopped pid $pid"
  else
    peers_log "$name: pid ${pid:-?} gone or not ours: not touching it"
  fi
  rm -f "$pidfile"
}

stop() {
  stop_neutron "$RUN/metadata-agent.pid" neutron-metadata-agent
  stop_neutron "$RUN/rpc-server.pid" neutron-rpc-server
  if [ -f "$RUN/rabbit.ours" ]; then
    rabbitmqctl -n rabbit@localhost stop >/dev/null 2>&1 || true
    epmd -kill >/dev/null 2>&1 || true   # started by our rabbitmq-server
    rm -f "$RUN/rabbit.ours"
    peers_log "rabbitmq: stopped"
  fi
  rm -f "$RUN/env" "$SOCK"
}

start() {
  venv_ok "$NEUTRON_VENV" neutron "$NEUTRON_VERSION" \
    || peers_die "neutron $NEUTRON_VERSION not installed in $NEUTRON_VENV: run scripts/peers/install.sh"
  if [ ! -f "$NETC/neutron.conf" ] || [ ! -f "$PEERS_FIXTURE" ]; then
    peers_die "no peer neutron config/fixture under $PEERS_DIR: run scripts/peers/up.sh first"
  fi
  command -v rabbitmq-server >/dev/null \
    || peers_die "rabbitmq-server not installed: run scripts/peers/install.sh --chain"
  # restart semantics for the agents; a running broker is kept
  stop_neutron "$RUN/metadata-agent.pid" neutron-metadata-agent
  stop_neutron "$RUN/rpc-server.pid" neutron-rpc-server
  mkdir -p "$RUN/lock"
  local t0=$SECONDS

  # 1. RabbitMQ on loopback (AMQP 5672, epmd 4369, dist 25672), unless one runs.
  if ! rabbitmqctl -n rabbit@localhost status >/dev/null 2>&1; then
    port_busy 5672 && peers_die "127.0.0.1:5672 is in use by something that is not rabbit@localhost"
    touch "$RUN/rabbit.ours"
    setsid rabbitmq-server >"$RUN/rabbitmq.log" 2>&1 </dev/null &
    # await_startup fails at once until the node has registered with epmd
    local up=0
    for _ in $(seq 1 90); do
      if rabbitmqctl -n rabbit@localhost await_startup --timeout 30 >/dev/null 2>&1; then
        up=1; break
      fi
      sleep 1
    done
    [ "$up" = 1 ] || { tail -n 30 "$RUN/rabbitmq.log" >&2; stop; peers_die "rabbitmq did not start"; }
    peers_log "rabbitmq ready after $((SECONDS - t0)) s"
  fi

  if [ "$RABBIT_VHOST" != / ]; then
    rabbitmqctl -n rabbit@localhost add_vhost "$RABBIT_VHOST" >/dev/null 2>&1 || true
    rabbitmqctl -n rabbit@localhost set_permissions -p "$RABBIT_VHOST" guest '.*' '.*' '.*' >/dev/null
  fi

  # 2. neutron-rpc-server on rabbit, over the peer API's DB.
  cat >"$RUN/rpc-rabbit.conf" <<CONF
# rendered by scripts/peers/chain.sh, layered over the peer neutron.conf
[DEFAULT]
transport_url = $TRANSPORT_URL
rpc_workers = 1
rpc_state_report_workers = 1
CONF
  setsid "$NEUTRON_VENV/bin/neutron-rpc-server" --config-file "$NETC/neutron.conf" \
    --config-file "$NETC/ml2_conf.ini" --config-file "$RUN/rpc-rabbit.conf" \
    >"$RUN/rpc-server.log" 2>&1 </dev/null &
  echo $! >"$RUN/rpc-server.pid"

  # 3. the real neutron-metadata-agent on a Unix socket.
  cat >"$RUN/metadata_agent.ini" <<CONF
# rendered by scripts/peers/chain.sh
[DEFAULT]
metadata_proxy_socket = $SOCK
nova_metadata_host = 127.0.0.1
nova_metadata_port = $NOVA_PORT
nova_metadata_protocol = http
metadata_proxy_shared_secret = $PEERS_SECRET
metadata_workers = 1
state_path = $RUN
host = metaproxy-chain
debug = True
use_stderr = True
transport_url = $TRANSPORT_URL

[AGENT]
report_interval = 30

[oslo_concurrency]
lock_path = $RUN/lock
CONF
  setsid "$NEUTRON_VENV/bin/neutron-metadata-agent" --config-file "$RUN/metadata_agent.ini" \
    >"$RUN/metadata-agent.log" 2>&1 </dev/null &
  echo $! >"$RUN/metadata-agent.pid"
  for _ in $(seq 1 120); do
    [ -S "$SOCK" ] && break
    kill -0 "$(cat "$RUN/metadata-agent.pid")" 2>/dev/null \
      || { tail -n 30 "$RUN/metadata-agent.log" >&2; stop; peers_die "neutron-metadata-agent exited"; }
    sleep 0.5
  done
  [ -S "$SOCK" ] || { stop; peers_die "no agent socket $SOCK after 60 s"; }
  cat >"$RUN/env" <<ENV
# written by scripts/peers/chain.sh; source it (with ../env) before cargo test
export METAPROXY_PEERS_CHAIN=1
export METAPROXY_PEERS_AGENT_SOCKET=$SOCK
export METAPROXY_PEERS_FIXTURE=$PEERS_FIXTURE
export METAPROXY_PEERS_TRANSPORT_URL=$TRANSPORT_URL
export METAPROXY_PEERS_NEUTRON_URL=$NEUTRON_URL
export METAPROXY_PEERS_RABBIT_OURS=$( [ -f "$RUN/rabbit.ours" ] && echo 1 || echo 0)
export METAPROXY_PEERS_AGENT_DOWN_TIME=$(sed -n "s/^agent_down_time = \([0-9]*\)$/\1/p" "$NETC/neutron.conf" | head -n1)
ENV
  peers_log "chain up in $((SECONDS - t0)) s: $SOCK -> neutron-metadata-agent -> rabbit -> neutron-rpc-server; nova $NOVA_URL"
  peers_log "test: . $RUN/env && cargo test --test peers_chain      stop: $0 stop"
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
