#!/usr/bin/env bash
# The physical floor of each pooled hop (issue 13), against our daemons, in
# the same run:
#
#   scripts/bench-hops.sh [rounds=3] [requests=200000] [conns=8] [depth=4]
#   COUNT=1 scripts/bench-hops.sh ...   also count syscalls and io_uring
#                                       submissions per request (perf stat)
#   BIN=PATH scripts/bench-hops.sh ...  run that metaproxy binary (A/B runs)
#
# Three setups, each driven by examples/hop_driver.rs the way the proxy's
# pool drives the agent: `conns` connections opened once, `depth` requests
# in flight on each, a cloud-init meta_data.json GET for one of 1 000 VMs:
#
#   agent   hop_driver -> `metaproxy agent` -> uring_responder
#   relay   hop_driver -> hop_relay         -> uring_responder
#   api     hop_driver -> hop_relay         -> `metaproxy api` (proxy mode)
#
# examples/hop_relay.rs is the least a pooled hop can do on our runtime
# (copy each read's bytes to the other side in one write, no parse) and
# examples/uring_responder.rs the least a keep-alive server can (one fixed
# 200 per request head). So per request: agent vs relay is our agent vs the
# floor of its hop, api vs responder (in the relay setup) our API vs the
# floor of its hop; the neighbour of the process compared is the same floor
# process in both. The requests carry the proxy's headers (X-Forwarded-For,
# X-Neutron-Router-ID) for the agent and the agent's signed headers for the
# API (the relay passes them unchanged; the agent replaces them).
#
# CPU per request is utime and stime from /proc (user and kernel apart).
# Loopback TCP and Unix sends run the receiver's side in the sender's
# context, so a process's kernel time includes part of its peer's receive.
# The driver reports its own CPU per request too: in the relay setup that
# is the client half of a pooled Unix hop (write a batch, read and frame the
# answers), the least the proxy's hop to the agent can cost the proxy.
# Daemons are pinned to CPU 0, the driver to CPU 1; setups are interleaved
# (agent relay api, agent relay api, ...) and the medians printed.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
REQS=${2:-200000}
CONNS=${3:-8}
DEPTH=${4:-4}
VMS=1000
for t in taskset python3; do command -v $t >/dev/null || { echo "need $t" >&2; exit 1; }; done
[ "${COUNT:-0}" = 1 ] && { command -v perf >/dev/null || { echo "need perf (apt-get install linux-perf)" >&2; exit 1; }; }
if [ -n "${BIN:-}" ]; then
  BIN=$(realpath "$BIN")
  cargo build --release --quiet --example hop_driver --example hop_relay --example uring_responder
else
  cargo build --release --quiet --bin metaproxy --example hop_driver --example hop_relay --example uring_responder
  BIN=$PWD/target/release/metaproxy
fi
EX=target/release/examples
WORK=$(mktemp -d /tmp/mp-hops.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_up() {
  for _ in $(seq 1 300); do
    case $1 in
      /*) [ -S "$1" ] && return 0 ;;
      *) (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0 ;;
    esac
    sleep 0.1
  done
  echo "nothing at $1 after 30 s" >&2; exit 1
}

SECRET=hops-secret
INV=$WORK/inventory.toml
"$BIN" inventory synth --vms "$VMS" --networks 1 --routers 1 --out "$INV"
ROUTER=5707ae75-0000-4000-8002-000000000000
RESP_PORT=$(free_port)
API_PORT=$(free_port)
cat >"$WORK/m.toml" <<TOML
[api]
listen = "127.0.0.1:$API_PORT"
metadata_proxy_shared_secret = "$SECRET"
inventory = "$INV"
state_dir = "$WORK/state"
[agent]
socket = "$WORK/agent.sock"
inventory = "$INV"
metadata_proxy_shared_secret = "$SECRET"
cache_ttl = "3600s"
[agent.nova]
nova_metadata_port = $RESP_PORT
TOML
# One request head per VM, with both the proxy's and the agent's headers.
python3 - "$INV" "$ROUTER" "$SECRET" >"$WORK/requests" <<'PY'
import hashlib, hmac, sys, tomllib
inv, router, secret = tomllib.load(open(sys.argv[1], "rb")), sys.argv[2], sys.argv[3].encode()
out = []
for i in inv["instance"]:
    ip, uuid = i["port"][0]["fixed_ips"][0], i["uuid"]
    sig = hmac.new(secret, uuid.encode(), hashlib.sha256).hexdigest()
    out.append("GET /openstack/2018-08-27/meta_data.json HTTP/1.1\r\nHost: 169.254.169.254\r\n"
               "User-Agent: Cloud-Init/22.4.2\r\nAccept: */*\r\n"
               f"X-Forwarded-For: {ip}\r\nX-Neutron-Router-ID: {router}\r\n"
               f"X-Instance-ID: {uuid}\r\nX-Tenant-ID: {i['project']}\r\n"
               f"X-Instance-ID-Signature: {sig}\r\n\r\n")
sys.stdout.write("".join(out))
PY

taskset -c 0 "$BIN" --log-level warn api --config "$WORK/m.toml" 2>"$WORK/api.log" & PIDS+=($!); P_api=$!
wait_up "$API_PORT"
taskset -c 0 "$EX/hop_relay" "$WORK/relay-api.sock" "127.0.0.1:$API_PORT" 1 2>"$WORK/relay-api.log" & PIDS+=($!); P_relayapi=$!
wait_up "$WORK/relay-api.sock"
# The responder's body is as long as the API's meta_data.json for VM 0, so
# the agent relays answers of the API's size.
BODY_BYTES=$(python3 - "$WORK/relay-api.sock" "$WORK/requests" <<'PY'
import re, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
s.sendall(open(sys.argv[2], "rb").read().split(b"\r\n\r\n")[0] + b"\r\n\r\n")
buf = b""
while b"\r\n\r\n" not in buf:
    buf += s.recv(65536)
m = re.search(rb"(?i)content-length: *(\d+)", buf)
if not buf.startswith(b"HTTP/1.1 200") or not m:
    sys.exit("api answered %r" % buf[:200])
print(m.group(1).decode())
PY
)
taskset -c 0 "$EX/uring_responder" "127.0.0.1:$RESP_PORT" 1 "$BODY_BYTES" 2>"$WORK/resp.log" & PIDS+=($!); P_resp=$!
wait_up "$RESP_PORT"
taskset -c 0 "$BIN" --log-level warn agent --config "$WORK/m.toml" 2>"$WORK/agent.log" & PIDS+=($!); P_agent=$!
taskset -c 0 "$EX/hop_relay" "$WORK/relay.sock" "127.0.0.1:$RESP_PORT" 1 2>"$WORK/relay.log" & PIDS+=($!); P_relay=$!
wait_up "$WORK/agent.sock"; wait_up "$WORK/relay.sock"
echo "answers: $BODY_BYTES-byte body (the API's meta_data.json; the responder pads to it)"

# ticks PID: "utime stime" in clock ticks.
ticks() { awk '{sub(/^.*\) /, ""); print $12, $13}' "/proc/$1/stat"; }
HZ=$(getconf CLK_TCK)

# setup NAME: the socket the driver talks to, and "role=PID" of the processes measured.
sock_of() { case $1 in agent) echo "$WORK/agent.sock" ;; relay) echo "$WORK/relay.sock" ;; api) echo "$WORK/relay-api.sock" ;; esac; }
roles_of() {
  case $1 in
    agent) echo "agent=$P_agent responder=$P_resp" ;;
    relay) echo "relay=$P_relay responder=$P_resp" ;;
    api) echo "relay=$P_relayapi api=$P_api" ;;
  esac
}

# Warm every cache (agent lookups, API renders) once per setup.
for s in agent relay api; do
  taskset -c 1 "$EX/hop_driver" "unix:$(sock_of $s)" "$WORK/requests" "$CONNS" "$DEPTH" $((VMS * 2)) >/dev/null
done

: >"$WORK/results"
for round in $(seq 1 "$ROUNDS"); do
  for s in agent relay api; do
    declare -A B=()
    for rp in $(roles_of $s); do B[${rp%%=*}]=$(ticks "${rp#*=}"); done
    perfs=()
    if [ "${COUNT:-0}" = 1 ]; then
      for rp in $(roles_of $s); do
        perf stat -x, -e raw_syscalls:sys_enter -e io_uring:io_uring_submit_req -e syscalls:sys_enter_io_uring_enter \
          -p "${rp#*=}" -o "$WORK/perf.$s.${rp%%=*}.$round" & perfs+=($!)
      done
      sleep 0.5
    fi
    load=$(cut -d' ' -f1 /proc/loadavg)
    out=$(taskset -c 1 "$EX/hop_driver" "unix:$(sock_of $s)" "$WORK/requests" "$CONNS" "$DEPTH" "$REQS") \
      || { echo "$s: driver failed: $out" >&2; tail -n 5 "$WORK"/*.log >&2; exit 1; }
    for p in "${perfs[@]}"; do kill -INT "$p"; wait "$p" 2>/dev/null || true; done
    rps=$(echo "$out" | awk '{print $6}')
    du=$(echo "$out" | awk '{print $10}'); ds=$(echo "$out" | awk '{print $12}')
    line="round $round $s load $load req/s $rps | driver user $du sys $ds"
    echo "$s driver $du $ds $(awk -v a="$du" -v b="$ds" 'BEGIN{print a+b}')" >>"$WORK/results"
    for rp in $(roles_of $s); do
      role=${rp%%=*}
      read -r u0 s0 <<<"${B[$role]}"; read -r u1 s1 <<<"$(ticks "${rp#*=}")"
      us=$(awk -v a=$((u1-u0)) -v b=$((s1-s0)) -v hz="$HZ" -v r="$REQS" 'BEGIN{printf "%.2f %.2f %.2f", a/hz*1e6/r, b/hz*1e6/r, (a+b)/hz*1e6/r}')
      read -r uu su tu <<<"$us"
      line="$line | $role user $uu sys $su total $tu"
      echo "$s $role $uu $su $tu" >>"$WORK/results"
      if [ "${COUNT:-0}" = 1 ]; then
        awk -F, -v r="$REQS" -v s="$s" -v role="$role" '$1 ~ /^[0-9]+$/ {printf "%s %s %s %.2f\n", s, role, $3, $1/r}' \
          "$WORK/perf.$s.$role.$round" >>"$WORK/counts"
      fi
    done
    echo "$line"
  done
done
echo
echo "medians over $ROUNDS rounds, CPU us per request ($REQS requests, $CONNS connections, depth $DEPTH):"
python3 - "$WORK/results" <<'PY'
import statistics, sys
d = {}
for l in open(sys.argv[1]):
    s, role, u, k, t = l.split()
    d.setdefault((s, role), []).append((float(u), float(k), float(t)))
med = {key: tuple(statistics.median(x[i] for x in v) for i in range(3)) for key, v in d.items()}
print(f"{'setup':7} {'process':10} {'user':>7} {'sys':>7} {'total':>7}")
for (s, role), (u, k, t) in med.items():
    print(f"{s:7} {role:10} {u:7.2f} {k:7.2f} {t:7.2f}")
g = lambda s, r: med.get((s, r), (0, 0, 0))[2]
if g("relay", "relay") and g("relay", "responder"):
    print(f"\nagent / relay floor      = {g('agent','agent'):.2f} / {g('relay','relay'):.2f} = {g('agent','agent')/g('relay','relay'):.2f}x")
    print(f"api   / responder floor  = {g('api','api'):.2f} / {g('relay','responder'):.2f} = {g('api','api')/g('relay','responder'):.2f}x")
    print(f"client half of a pooled Unix hop (driver in the relay setup) = {g('relay','driver'):.2f}")
PY
if [ "${COUNT:-0}" = 1 ]; then
  echo; echo "per request, medians (perf stat; counting costs CPU, read counts not times from a COUNT run):"
  python3 - "$WORK/counts" <<'PY'
import statistics, sys
d = {}
for l in open(sys.argv[1]):
    s, role, ev, v = l.split()
    d.setdefault((s, role, ev), []).append(float(v))
for (s, role, ev), v in sorted(d.items()):
    print(f"{s:7} {role:10} {ev:36} {statistics.median(v):6.2f}")
PY
fi
