#!/usr/bin/env bash
# Idempotent install of the pinned OpenStack peers, OUTSIDE the repo:
#   $PEERS_DIR/neutron-venv   neutron==29.0.0 + gunicorn
#   $PEERS_DIR/nova-venv      nova==34.0.0 + gunicorn + PyMySQL (Nova's
#                             MySQL driver, for NOVA_DB=mariadb)
# (PEERS_DIR defaults to /tmp/metaproxy-peers.)  A venv whose pinned
# version already imports is skipped.  Prints timings.
#
#   scripts/peers/install.sh            the two venvs
#   scripts/peers/install.sh --chain    also Debian rabbitmq-server + haproxy
#                                       (optional reference-agent chain)
set -euo pipefail
# shellcheck source=scripts/peers/lib.sh
. "$(dirname "$0")/lib.sh"

CHAIN=0
for a in "$@"; do
  case $a in
    --chain) CHAIN=1 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) peers_die "unknown argument: $a" ;;
  esac
done

mkdir -p "$PEERS_DIR/logs"

install_venv() {   # VENV DIST VERSION [EXTRA-REQUIREMENT...]
  local venv=$1 dist=$2 ver=$3 t0 log=$PEERS_DIR/logs/pip-$2.log
  shift 3
  if venv_ok "$venv" "$dist" "$ver"; then
    peers_log "$dist $ver already importable in $venv: skip"
    return 0
  fi
  t0=$SECONDS
  peers_log "installing $dist==$ver + gunicorn into $venv (log $log) ..."
  rm -rf "$venv"
  "$PEERS_PYTHON" -m venv "$venv"
  {
    "$venv/bin/pip" install -U pip
    # neutron's closure has one sdist (`ovs`, a small C extension): builds in seconds
    "$venv/bin/pip" install "$dist==$ver" gunicorn "$@"
  } >"$log" 2>&1 || { tail -n 40 "$log" >&2; peers_die "pip install $dist failed; log: $log"; }
  venv_ok "$venv" "$dist" "$ver" || peers_die "$dist $ver not importable after install"
  peers_log "installed $dist $ver in $((SECONDS - t0)) s; venv $(du -sh "$venv" | cut -f1)"
}

T0=$SECONDS
"$PEERS_PYTHON" -c 'import sys; assert sys.version_info >= (3, 10), sys.version' \
  || peers_die "$PEERS_PYTHON is older than 3.10 (set PEERS_PYTHON)"
install_venv "$NEUTRON_VENV" neutron "$NEUTRON_VERSION"
install_venv "$NOVA_VENV" nova "$NOVA_VERSION" "PyMySQL==$PYMYSQL_VERSION"
# PyMySQL, the driver of nova.conf's mysql+pymysql:// URLs; also into a
# venv installed before it was part of the set.
if "$NOVA_VENV/bin/python" -c 'import pymysql' 2>/dev/null; then
  peers_log "PyMySQL already importable in $NOVA_VENV: skip"
else
  t0=$SECONDS
  "$NOVA_VENV/bin/pip" install "PyMySQL==$PYMYSQL_VERSION" >"$PEERS_DIR/logs/pip-pymysql.log" 2>&1 \
    || { tail -n 20 "$PEERS_DIR/logs/pip-pymysql.log" >&2; peers_die "pip install PyMySQL failed"; }
  peers_log "installed PyMySQL $PYMYSQL_VERSION into $NOVA_VENV in $((SECONDS - t0)) s"
fi

if [ "$CHAIN" = 1 ]; then
  if command -v haproxy >/dev/null && command -v rabbitmq-server >/dev/null; then
    peers_log "haproxy and rabbitmq-server already installed: skip"
  else
    t0=$SECONDS
    log=$PEERS_DIR/logs/apt-chain.log
    # policy-rc.d guard: keep the packages' init scripts from starting a
    # broker / haproxy on 0.0.0.0.  Never clobber an existing guard.
    guard=/usr/sbin/policy-rc.d
    own_guard=0
    if [ ! -e "$guard" ]; then
      printf '#!/bin/sh\n# metaproxy peers install.sh: no service starts\nexit 101\n' >"$guard"
      chmod +x "$guard"
      own_guard=1
      trap '[ "$own_guard" = 1 ] && rm -f "$guard"' EXIT
    fi
    peers_log "apt-get install rabbitmq-server haproxy (log $log) ..."
    {
      apt-get update -q
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q rabbitmq-server haproxy
    } >"$log" 2>&1 || { tail -n 30 "$log" >&2; peers_die "apt-get failed; log: $log"; }
    if [ "$own_guard" = 1 ]; then rm -f "$guard"; own_guard=0; fi
    peers_log "apt-installed rabbitmq-server + haproxy in $((SECONDS - t0)) s (no service started)"
  fi
fi
peers_log "install done in $((SECONDS - T0)) s"
