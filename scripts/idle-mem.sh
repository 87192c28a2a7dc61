#!/usr/bin/env bash
# RSS of the namespace proxy holding N idle keep-alive connections (issue 7:
# 50 000 idle connections within a documented bound; table in BENCHMARKS.md).
#
#   scripts/idle-mem.sh [connections=50000] [workers=1]
#
# Release build, one loop by default (as the ADR's 10k measurement), in front
# of examples/echo_agent. The proxy runs under `prlimit --nofile` sized for N;
# scripts/idle-conns.py opens the N connections from distinct 127.x sources
# (raising its own limit), sends one request on each, reads the 200, and
# reports RSS before and after. Both processes need N fds: if the hard
# RLIMIT_NOFILE (raisable only with CAP_SYS_RESOURCE) is lower, N is scaled
# down with a warning.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-50000}
WORKERS=${2:-1}
HARD=$(ulimit -Hn)
# The proxy's guests may fill only ~82 % of RLIMIT_NOFILE (the fd budget keeps
# 1/8 in reserve and 1/16 of the rest for the internal hops, serve/admit.rs):
# with N + 1000 fds accept would pause below N. So N * 5/4 + 1000.
if [ "$HARD" != unlimited ] && [ $((N * 5 / 4 + 1100)) -gt "$HARD" ]; then
  M=$(( (HARD - 1100) * 4 / 5 ))
  echo "WARNING: hard RLIMIT_NOFILE is $HARD (no CAP_SYS_RESOURCE to raise it): measuring $M connections, not $N" >&2
  N=$M
fi
FDS=$((N * 5 / 4 + 1000))
WORK=$(mktemp -d /tmp/mp-idle.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

cargo build --release --quiet --bin metaproxy --example echo_agent
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
target/release/examples/echo_agent "$WORK/agent.sock" 2>/dev/null & PIDS+=($!)
sleep 0.3
cat >"$WORK/proxy.toml" <<TOML
[proxy]
workers = $WORKERS
agent_socket = "$WORK/agent.sock"
control_socket = "$WORK/ctl.sock"
max_connections = $((N + 1000))
[proxy.timeouts]
http_request = "600s"
keep_alive = "600s"
[[proxy.namespace]]
router_id = "5c0ffee0-0000-4000-8000-000000000001"
listen = "127.0.0.1:$PORT"
TOML
prlimit --nofile=$FDS:$FDS target/release/metaproxy --log-level warn \
  proxy --config "$WORK/proxy.toml" & PIDS+=($!); PROXY=$!
sleep 0.5
# Warm up (pool connections, free list) so "before" is a serving proxy.
for _ in $(seq 20); do curl -s -o /dev/null "http://127.0.0.1:$PORT/warm"; done
echo "load: $(cut -d' ' -f1-3 /proc/loadavg); proxy workers $WORKERS; kernel $(uname -r)"
python3 scripts/idle-conns.py "127.0.0.1:$PORT" "$PROXY" "$N"
echo "proxy VmHWM: $(awk '/VmHWM/ {print $2, $3}' /proc/$PROXY/status)"
