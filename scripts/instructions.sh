#!/usr/bin/env bash
# Instructions per proxied request (callgrind), metaproxy's proxy vs Debian's
# haproxy configured as Neutron renders it (metadata-path.md §1.3), both in
# front of the same agent stand-in (examples/echo_agent.rs). Instruction
# counts do not move with the machine's load, so this is the number to track.
#
#   scripts/instructions.sh [requests=2000]
#   KEEP=DIR scripts/instructions.sh   also keep the callgrind.out files
#                                      (callgrind_annotate DIR/cg.metaproxy.close.2100)
#
# For each proxy and each client mode (keep-alive: one connection; close: a
# new connection per request, like cloud-init), the proxy runs twice under
# `valgrind --tool=callgrind`, once serving 100 requests and once 100 +
# REQUESTS, and exits on SIGTERM; the difference of the two totals divided by
# REQUESTS is the cost per request, with start-up and shutdown cancelled out.
# The client is one sequential Python connection (no concurrency, so no
# batching helps either side).
#
# io_uring under valgrind: valgrind 3.19 lets io_uring_setup succeed, but the
# proxy then never answers (valgrind does not model the kernel writing the
# shared rings). So metaproxy runs under a small seccomp wrapper (compiled
# here with cc) that fails io_uring_setup with ENOSYS, and compio falls back to
# its epoll driver; the script checks the engine metaproxy's log names and
# prints it. Caveats printed with the result: callgrind counts user-space
# instructions only (syscalls are not in the number), and production runs on
# io_uring, not epoll.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/neutron-haproxy.sh
. scripts/lib/neutron-haproxy.sh
REQS=${1:-2000}
BASE=100

for t in valgrind haproxy python3 cc; do
  command -v $t >/dev/null || { echo "need $t (apt-get install valgrind haproxy python3 gcc)" >&2; exit 1; }
done
cargo build --release --quiet --bin metaproxy --example echo_agent
BIN=$PWD/target/release/metaproxy
ROUTER=5c0ffee0-0000-4000-8000-000000000001
WORK=$(mktemp -d /tmp/mp-instr.XXXXXX)
PIDS=()
cleanup() {
  local p
  # TERM, then KILL after 5 s: a proxy stuck under valgrind may not act on TERM.
  for p in "${PIDS[@]}"; do
    kill -TERM "$p" 2>/dev/null || continue
    for _ in $(seq 1 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  if [ -n "${KEEP:-}" ]; then mkdir -p "$KEEP"; cp "$WORK"/cg.* "$WORK"/*.log "$KEEP"/ 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

target/release/examples/echo_agent "$WORK/agent.sock" 2>/dev/null &
PIDS+=($!)
for _ in $(seq 1 50); do [ -S "$WORK/agent.sock" ] && break; sleep 0.1; done

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat >"$WORK/proxy.toml" <<TOML
[proxy]
workers = 1
agent_socket = "$WORK/agent.sock"
control_socket = "$WORK/proxy.ctl"
[[proxy.namespace]]
router_id = "$ROUTER"
listen = "127.0.0.1:$PORT"
TOML
neutron_haproxy_cfg "$WORK/haproxy.cfg" "$PORT" "$WORK/agent.sock" "$ROUTER" "$WORK/haproxy.pid"

# no-uring CMD...: run CMD with io_uring_setup(2) failing with ENOSYS.
. scripts/lib/no-uring.sh
build_no_uring "$WORK"

# client.py PORT N MODE: N sequential GETs; every answer must be a 200.
cat >"$WORK/client.py" <<'PY'
import socket, sys, time
port, n, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
req = (b"GET /openstack/2018-08-27/meta_data.json HTTP/1.1\r\nHost: 169.254.169.254\r\n"
       b"User-Agent: Cloud-Init/22.4.2\r\nAccept: */*\r\n"
       + (b"Connection: close\r\n" if mode == "close" else b"") + b"\r\n")
def connect():
    for _ in range(600):
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=60)
        except OSError:
            time.sleep(0.1)
    sys.exit("proxy not reachable")
def response(s, buf):
    while b"\r\n\r\n" not in buf:
        d = s.recv(65536)
        if not d:
            sys.exit("connection closed before a response")
        buf += d
    head, _, rest = buf.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        sys.exit("not a 200: %r" % head[:80])
    length = next(int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:"))
    while len(rest) < length:
        d = s.recv(65536)
        if not d:
            sys.exit("short body")
        rest += d
    return rest[length:]
s = None
for i in range(n):
    if s is None:
        s, buf = connect(), b""
    s.sendall(req)
    buf = response(s, buf)
    if mode == "close":
        s.close(); s = None
PY

# instr NAME MODE N: callgrind total (Ir) of one proxy run serving N requests.
instr() {
  local name=$1 mode=$2 n=$3 out=$WORK/cg.$1.$2.$3 pid
  if [ "$name" = metaproxy ]; then
    "$WORK/no-uring" valgrind --tool=callgrind --callgrind-out-file="$out" \
      "$BIN" --log-level info proxy --config "$WORK/proxy.toml" >"$WORK/$name.log" 2>&1 &
  else
    valgrind --tool=callgrind --callgrind-out-file="$out" \
      haproxy -f "$WORK/haproxy.cfg" -db >"$WORK/$name.log" 2>&1 &
  fi
  pid=$!
  PIDS+=("$pid")
  python3 "$WORK/client.py" "$PORT" "$n" "$mode" \
    || { tail -n 20 "$WORK/$name.log" >&2; exit 1; }
  kill -TERM "$pid"
  for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$pid" 2>/dev/null && { kill -KILL "$pid"; echo "$name did not exit on SIGTERM within 30 s" >&2; exit 1; }
  wait "$pid" || true
  awk '/^(summary|totals):/ {print $2; exit}' "$out"
}

printf '%-10s %-11s %16s\n' proxy client "instr/request"
declare -A PER
for mode in keep-alive close; do
  for name in metaproxy haproxy; do
    a=$(instr "$name" "$mode" "$BASE")
    b=$(instr "$name" "$mode" $((BASE + REQS)))
    PER[$name.$mode]=$(( (b - a) / REQS ))
    printf '%-10s %-11s %16s\n' "$name" "$mode" "${PER[$name.$mode]}"
  done
done
echo
for mode in keep-alive close; do
  awk -v m="$mode" -v a="${PER[metaproxy.$mode]}" -v b="${PER[haproxy.$mode]}" \
    'BEGIN {printf "ratio %-11s metaproxy/haproxy instructions per request = %.2fx\n", m, a / b}'
done
# The last metaproxy run's log (each run overwrites it).
ENGINE=$(sed -n 's/.*proxy loops use \([A-Za-z]*\).*/\1/p' "$WORK/metaproxy.log" | head -n 1)
case $ENGINE in
  IoUring) note="io_uring under valgrind: the count leaves out the kernel-side work io_uring does" ;;
  Poll) note="io_uring_setup blocked by the seccomp wrapper: compio's epoll fallback, not the production engine" ;;
  *) note="the log did not say which engine metaproxy used" ;;
esac
echo "engine: metaproxy loops used ${ENGINE:-unknown} ($note)"
echo "user-space instructions only (callgrind); $REQS sequential requests per mode; haproxy $(haproxy -v | awk 'NR == 1 {print $3}'), nbthread 2; metaproxy workers = 1"
