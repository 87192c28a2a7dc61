#!/usr/bin/env bash
# Side-by-side CPU cost per proxied request: metaproxy's proxy vs Debian's
# haproxy configured as Neutron renders it (metadata-path.md §1.3), both in
# front of the same trivial Unix-socket agent, in the same run.
#
#   scripts/bench-proxy.sh [seconds=10] [connections=50]
#
# Prints req/s and proxy CPU µs per request (utime+stime from /proc) for
# keep-alive clients and connection-per-request clients. The proxy under test
# is pinned to CPU 0, wrk to CPU 1.
#
# A third row is the physical floor (issue 13): examples/uring_responder.rs,
# a minimal HTTP responder on the proxy's own runtime seam (same io_uring
# loop, ring flags, buffer ring) that only accepts, reads, writes the echo
# agent's answer and closes, with no upstream hop. Its CPU per request is
# what the kernel and the runtime cost; metaproxy/floor is what the proxy's
# own work (parse, rewrite, the Unix-socket hop, the relay) adds.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/neutron-haproxy.sh
. scripts/lib/neutron-haproxy.sh
DUR=${1:-10}
CONNS=${2:-50}
WORK=$(mktemp -d /tmp/mp-bench.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

for t in wrk haproxy taskset; do command -v $t >/dev/null || { echo "need $t (apt-get install wrk haproxy util-linux)"; exit 1; }; done
cargo build --release --quiet --bin metaproxy --example echo_agent --example uring_responder
BIN=target/release/metaproxy
ROUTER=5c0ffee0-0000-4000-8000-000000000001

target/release/examples/echo_agent "$WORK/agent.sock" 2>/dev/null & PIDS+=($!)
sleep 0.3

cat >"$WORK/proxy.toml" <<TOML
[proxy]
workers = 1
agent_socket = "$WORK/agent.sock"
[[proxy.namespace]]
router_id = "$ROUTER"
listen = "127.0.0.1:18697"
TOML
neutron_haproxy_cfg "$WORK/haproxy.cfg" 18698 "$WORK/agent.sock" "$ROUTER" "$WORK/haproxy.pid"

taskset -c 0 "$BIN" --log-level warn proxy --config "$WORK/proxy.toml" & PIDS+=($!); OURS=$!
taskset -c 0 haproxy -f "$WORK/haproxy.cfg" -db & PIDS+=($!); HAP=$!
taskset -c 0 target/release/examples/uring_responder 127.0.0.1:18699 1 2>/dev/null & PIDS+=($!); FLOOR=$!
sleep 0.5

cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
HZ=$(getconf CLK_TCK)

run() { # name pid port extra-wrk-args...
  local name=$1 pid=$2 port=$3; shift 3
  local before after out reqs
  before=$(cpu_ticks "$pid")
  out=$(taskset -c 1 wrk -t1 -c"$CONNS" -d"${DUR}s" "$@" "http://127.0.0.1:$port/openstack/2018-08-27/meta_data.json")
  after=$(cpu_ticks "$pid")
  reqs=$(echo "$out" | awk '/requests in/ {print $1}')
  local errs; errs=$(echo "$out" | awk '/Non-2xx/ {print $NF}'); errs=${errs:-0}
  local rps; rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  local us; us=$(awk -v t=$((after-before)) -v hz="$HZ" -v r="$reqs" 'BEGIN{printf "%.1f", t/hz*1e6/r}')
  local rss; rss=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")
  printf '%-10s %-16s %10s req/s %8s µs CPU/req  non-2xx %-6s RSS %6s kB\n' "$name" "$MODE" "$rps" "$us" "$errs" "$rss"
  echo "$name $MODE $us" >>"$WORK/results"
}

for MODE in keep-alive conn-per-request; do
  extra=()
  [ "$MODE" = conn-per-request ] && extra=(-H "Connection: close")
  run metaproxy "$OURS" 18697 "${extra[@]}"
  run haproxy "$HAP" 18698 "${extra[@]}"
  run floor "$FLOOR" 18699 "${extra[@]}"
done
echo
awk '{cost[$1" "$2]=$3} END {
  for (m in modes) {}
  split("keep-alive conn-per-request", ms, " ");
  for (i=1;i<=2;i++) { m=ms[i]; if (cost["haproxy "m]>0) printf "ratio %-16s metaproxy/haproxy CPU per request = %.2fx\n", m, cost["metaproxy "m]/cost["haproxy "m] }
  for (i=1;i<=2;i++) { m=ms[i]; if (cost["floor "m]>0) printf "ratio %-16s metaproxy/floor   CPU per request = %.2fx (floor: uring_responder, no upstream hop)\n", m, cost["metaproxy "m]/cost["floor "m] }
}' "$WORK/results"
