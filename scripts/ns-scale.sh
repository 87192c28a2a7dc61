#!/usr/bin/env bash
# Memory per served namespace: one metaproxy proxy with discovery on, N router
# namespaces created with `ip netns add`, RSS and private memory before and
# after; next to one Neutron-configured haproxy's private memory measured the
# same way (smaps_rollup). Needs root.
#   scripts/ns-scale.sh [N=1000]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-1000}
[ "$(id -u)" = 0 ] || { echo "needs root (ip netns)"; exit 1; }
WORK=$(mktemp -d /tmp/mp-nsscale.XXXXXX)
TAG="s$$"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for n in $(ip netns list | awk '{print $1}' | grep "^${TAG}r-" || true); do ip netns del "$n"; done
  wait 2>/dev/null || true; rm -rf "$WORK"
}
trap cleanup EXIT
cargo build --release --quiet --bin metaproxy --example echo_agent
target/release/examples/echo_agent "$WORK/agent.sock" 2>/dev/null & PIDS+=($!)
cat >"$WORK/p.toml" <<TOML
[proxy]
agent_socket = "$WORK/agent.sock"
control_socket = "$WORK/ctl.sock"
[proxy.discover]
enabled = true
router_prefix = "${TAG}r-"
network_prefixes = ["${TAG}d-"]
ovn_prefixes = []
TOML
target/release/metaproxy --log-level warn proxy --config "$WORK/p.toml" & PIDS+=($!); P=$!
sleep 0.5
mem() { awk '/^Rss:/ {r=$2} /^Private_Clean:/ {pc=$2} /^Private_Dirty:/ {pd=$2} END {print r, pc+pd}' "/proc/$1/smaps_rollup"; }
read -r rss0 priv0 < <(mem $P)
t0=$(date +%s.%N)
for i in $(seq 1 "$N"); do ip netns add "${TAG}r-$(printf '%08x-0000-4000-8000-%012x' $$ "$i")"; done
t1=$(date +%s.%N)
while [ "$(target/release/metaproxy ctl --socket "$WORK/ctl.sock" status | grep -c "^${TAG}r-")" -lt "$N" ]; do sleep 0.2; done
t2=$(date +%s.%N)
sleep 1
read -r rss1 priv1 < <(mem $P)
printf 'metaproxy: %d namespaces served; ip netns add x%d took %.1f s, all served %.1f s after the last add\n' "$N" "$N" "$(echo "$t1-$t0" | bc)" "$(echo "$t2-$t1" | bc)"
printf 'metaproxy RSS %d kB -> %d kB, private %d kB -> %d kB: %.1f KiB RSS and %.1f KiB private per namespace\n' \
  "$rss0" "$rss1" "$priv0" "$priv1" "$(echo "($rss1-$rss0)/$N" | bc -l)" "$(echo "($priv1-$priv0)/$N" | bc -l)"
# One haproxy as Neutron configures it, for comparison.
cat >"$WORK/h.cfg" <<CFG
global
    maxconn     1024
    nbthread    2
defaults
    mode http
    option http-server-close
    option forwardfor
    timeout http-request    30s
    timeout connect         30s
    timeout client          32s
    timeout server          32s
    timeout http-keep-alive 30s
listen listener
    bind 127.0.0.1:18799
    server metadata $WORK/agent.sock
    http-request del-header X-Neutron-Network-ID
    http-request set-header X-Neutron-Router-ID 5c0ffee0-0000-4000-8000-000000000001
CFG
haproxy -f "$WORK/h.cfg" -db & PIDS+=($!); H=$!
sleep 1
read -r hrss hpriv < <(mem $H)
printf 'haproxy (one per namespace in Neutron): RSS %d kB, private %d kB per process\n' "$hrss" "$hpriv"
