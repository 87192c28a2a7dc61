#!/usr/bin/env bash
# Bring up the real OpenStack peers for metaproxy's tests, all on 127.0.0.1:
#   install (if needed) -> neutron API :9696 (fresh DB) -> populate.py
#   -> nova metadata API :8775 (fresh DBs, instances from the fixture; on
#      SQLite, or with NOVA_DB=mariadb on a private MariaDB, nova-mariadb.sh)
# Leaves $PEERS_DIR/fixture.json (default /tmp/metaproxy-peers/fixture.json)
# and $PEERS_DIR/env (export METAPROXY_PEERS=1 METAPROXY_PEERS_FIXTURE=...).
# Safe to run twice: running peers of ours are restarted with fresh DBs.
# On failure everything this script started is stopped again.
set -euo pipefail
# shellcheck source=scripts/peers/lib.sh
. "$(dirname "$0")/lib.sh"

T0=$SECONDS
ok=0
trap '[ "$ok" = 1 ] || { echo "[peers] up.sh failed: stopping what was started" >&2; "$PEERS_HERE/down.sh" >&2 || true; }' EXIT

t=$SECONDS; "$PEERS_HERE/install.sh";                 T_INSTALL=$((SECONDS - t))
t=$SECONDS; "$PEERS_HERE/neutron.sh" start;           T_NEUTRON=$((SECONDS - t))
rm -f "$PEERS_FIXTURE" "$PEERS_DIR/env"
t=$SECONDS
NOVA_URL=$NOVA_URL PEERS_SECRET=$PEERS_SECRET \
  "$PEERS_PYTHON" "$PEERS_HERE/populate.py" "$NEUTRON_URL" "$PEERS_FIXTURE"
T_POP=$((SECONDS - t))
t=$SECONDS; "$PEERS_HERE/nova.sh" start "$PEERS_FIXTURE"; T_NOVA=$((SECONDS - t))
# shellcheck disable=SC1091
. "$PEERS_DIR/nova/db.env"

cat >"$PEERS_DIR/env" <<ENV
# written by scripts/peers/up.sh; source it before cargo test
export METAPROXY_PEERS=1
export METAPROXY_PEERS_FIXTURE=$PEERS_FIXTURE
export METAPROXY_PEERS_NEUTRON_URL=$NEUTRON_URL
export METAPROXY_PEERS_NOVA_URL=$NOVA_URL
export METAPROXY_PEERS_SECRET=$PEERS_SECRET
export METAPROXY_PEERS_NOVA_DIR=$PEERS_DIR/nova
# Nova's databases (oslo.db URLs, as in nova.conf): $NOVA_DB
export METAPROXY_PEERS_NOVA_DB=$NOVA_DB
export METAPROXY_PEERS_NOVA_CONNECTION='$NOVA_CONNECTION'
export METAPROXY_PEERS_NOVA_API_CONNECTION='$NOVA_API_CONNECTION'
export METAPROXY_PEERS_NOVA_PYTHON=$NOVA_VENV/bin/python
ENV
ok=1
peers_log "peers up in $((SECONDS - T0)) s (install ${T_INSTALL}s, neutron ${T_NEUTRON}s, populate ${T_POP}s, nova on $NOVA_DB ${T_NOVA}s)"
peers_log "neutron $NEUTRON_URL, nova metadata $NOVA_URL, fixture $PEERS_FIXTURE"
peers_log "tests: . $PEERS_DIR/env && cargo test      stop: scripts/peers/down.sh"
