#!/usr/bin/env bash
# Instructions per request (callgrind) of each of our daemons in the real
# chain, and of the floor (issue 13): where each daemon's user-space work goes,
# in a number that does not move with the machine's load.
#
#   scripts/instructions-daemons.sh [requests=2000] [roles="proxy agent api floor"]
#   KEEP=DIR scripts/instructions-daemons.sh   also keep the callgrind.out files
#   BIN=PATH scripts/instructions-daemons.sh   run that metaproxy binary, build nothing
#   MIX=cloud-init scripts/instructions-daemons.sh   replay the storm's cloud-init profile
#                                                    instead of meta_data.json only
#
# The chain is proxy -> agent -> api on a synthesized 100-VM inventory, each
# with one loop; the client is one sequential Python process that opens a new
# connection per request (cloud-init's pattern), binds the address of VM
# i % 100 and GETs its `openstack/2018-08-27/meta_data.json`, checking the
# answer is a 200 naming that VM. With MIX=cloud-init each VM instead replays
# what the storm's `cloud-init` profile sends (src/storm/profile.rs): the
# OpenStack datasource (`/openstack` twice, the five 2018-08-27 files), then
# the depth-first crawl of `latest/meta-data/` (listings parsed as they come,
# `N=name` fetched as `N/openssh-key`), every answer a 200; the requests run
# through the VMs in turn, a whole sequence each. Roles:
#
#   proxy   `metaproxy proxy` under callgrind (agent and api native)
#   agent   `metaproxy agent` (cache hits: cache_ttl is an hour here)
#   api     `metaproxy api` behind the agent (signed headers, render)
#   floor   `metaproxy api` alone in direct mode (service_metadata_proxy =
#           false), the client talking to it directly: the one-hop limit
#   up      `metaproxy up` with the same file, the whole path in one process
#           (not in the default roles: compare it with proxy + agent + api)
#
# Each role runs twice, serving 100 and 100 + REQUESTS requests, and exits on
# SIGTERM; the difference of the totals over REQUESTS is the cost per request
# with start-up, inventory load and shutdown cancelled out (the first 100 warm
# every VM's cache entries). The top functions by self cost per request (the
# same difference, per function) are printed per role.
#
# As in scripts/instructions.sh, the daemon under valgrind runs behind a
# seccomp wrapper that fails io_uring_setup (valgrind does not model the
# kernel writing the rings), so compio uses its epoll driver there: the count
# is user space only, and the IO path is epoll's, not io_uring's. Syscall and
# submission counts on io_uring come from `scripts/storm.sh --count`.
set -euo pipefail
cd "$(dirname "$0")/.."
REQS=${1:-2000}
ROLES=${2:-proxy agent api floor}
BASE=100
VMS=100

for t in valgrind callgrind_annotate python3 cc; do
  command -v $t >/dev/null || { echo "need $t (apt-get install valgrind python3 gcc)" >&2; exit 1; }
done
if [ -n "${BIN:-}" ]; then
  BIN=$(realpath "$BIN")
else
  cargo build --release --quiet --bin metaproxy
  BIN=$PWD/target/release/metaproxy
fi
WORK=$(mktemp -d /tmp/mp-instr-d.XXXXXX)
PIDS=()
stop_all() {
  local p
  # TERM, then KILL after 30 s: a daemon under valgrind exits slowly.
  for p in "${PIDS[@]}"; do
    kill -TERM "$p" 2>/dev/null || continue
    for _ in $(seq 1 300); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  PIDS=()
}
cleanup() {
  stop_all
  if [ -n "${KEEP:-}" ]; then mkdir -p "$KEEP"; cp "$WORK"/cg.* "$WORK"/*.log "$KEEP"/ 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
INV=$WORK/inventory.toml
"$BIN" inventory synth --vms "$VMS" --networks 1 --routers 1 --out "$INV"
ROUTER=5707ae75-0000-4000-8002-000000000000
API_PORT=$(free_port)
PORT=$(free_port)
cat >"$WORK/chain.toml" <<TOML
[api]
listen = "127.0.0.1:$API_PORT"
metadata_proxy_shared_secret = "s"
inventory = "$INV"
state_dir = "$WORK/state"
[agent]
socket = "$WORK/agent.sock"
inventory = "$INV"
metadata_proxy_shared_secret = "s"
cache_ttl = "3600s"
[agent.nova]
nova_metadata_port = $API_PORT
[proxy]
workers = 1
agent_socket = "$WORK/agent.sock"
control_socket = "$WORK/proxy.ctl"
[[proxy.namespace]]
router_id = "$ROUTER"
listen = "127.0.0.1:$PORT"
TOML
cat >"$WORK/floor.toml" <<TOML
[api]
listen = "127.0.0.1:$PORT"
service_metadata_proxy = false
inventory = "$INV"
state_dir = "$WORK/state"
TOML

# no-uring CMD...: run CMD with io_uring_setup(2) failing with ENOSYS.
. scripts/lib/no-uring.sh
build_no_uring "$WORK"

# client.py INVENTORY PORT N [MIX]: N sequential GETs, a connection each.
cat >"$WORK/client.py" <<'PY'
import socket, sys, time, tomllib
inv, port, n = tomllib.load(open(sys.argv[1], "rb")), int(sys.argv[2]), int(sys.argv[3])
mix = sys.argv[4] if len(sys.argv) > 4 else ""
vms = [(i["port"][0]["fixed_ips"][0], i["uuid"]) for i in inv["instance"]]
META = "/openstack/2018-08-27/meta_data.json"
def get(ip, path):
    req = ("GET %s HTTP/1.1\r\nHost: 169.254.169.254\r\nUser-Agent: Cloud-Init/22.4.2\r\n"
           "Accept: */*\r\nConnection: close\r\n\r\n" % path).encode()
    s = socket.socket()
    s.settimeout(120)
    s.bind((ip, 0))
    s.connect(("127.0.0.1", port))
    s.sendall(req)
    buf = b""
    while True:
        d = s.recv(65536)
        if not d:
            break
        buf += d
    s.close()
    return buf
def check(ip, path, r, uuid=None):
    if not r.startswith(b"HTTP/1.1 200") or (uuid and uuid.encode() not in r):
        sys.exit("bad answer for %s %s: %r" % (ip, path, r[:120]))
    return r.split(b"\r\n\r\n", 1)[1].decode()
def cloud_init(ip, uuid):
    """The storm's cloud-init profile, one path at a time (src/storm/profile.rs)."""
    for p in ["/openstack", "/openstack"] + ["/openstack/2018-08-27/" + leaf for leaf in
              ("meta_data.json", "user_data", "vendor_data.json", "vendor_data2.json",
               "network_data.json")]:
        body = yield p
    todo = ["/latest/meta-data/"]
    while todo:
        path = todo.pop()
        body = yield path
        if not path.endswith("/"):
            continue
        before = len(todo)
        for line in (l.strip() for l in body.splitlines()):
            if not line or line.rstrip("/") == "security-credentials":
                continue
            todo.append(path + line.split("=", 1)[0] + "/openssh-key" if "=" in line else path + line)
        todo[before:] = reversed(todo[before:])
def stream():
    """(ip, uuid, path) forever; the caller sends back each body."""
    v = 0
    while True:
        ip, uuid = vms[v % len(vms)]
        v += 1
        if mix != "cloud-init":
            yield ip, uuid, META
            continue
        seq = cloud_init(ip, uuid)
        body = None
        try:
            path = next(seq)
            while True:
                body = yield ip, uuid, path
                path = seq.send(body)
        except StopIteration:
            pass
for _ in range(1200):  # until the chain answers (valgrind starts slowly)
    try:
        get(vms[0][0], META)
        break
    except OSError:
        time.sleep(0.1)
else:
    sys.exit("chain not reachable")
st = stream()
ip, uuid, path = next(st)
for i in range(n - 1):
    body = check(ip, path, get(ip, path), uuid if path == META else None)
    if i < n - 2:
        ip, uuid, path = st.send(body)
PY

# wait_up FILE|PORT: a socket file exists or a TCP port accepts.
wait_up() {
  for _ in $(seq 1 600); do
    case $1 in
      /*) [ -S "$1" ] && return 0 ;;
      *) (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0 ;;
    esac
    sleep 0.1
  done
  echo "nothing at $1 after 60 s" >&2; exit 1
}

# run ROLE NAME CONFIG: start daemon NAME (api|agent|proxy), under callgrind
# when it is ROLE's, and remember its PID.
run() {
  local role=$1 name=$2 cfg=$3 n=$4
  local cmd=("$BIN" --log-level info "$name" --config "$cfg")
  if [ "$role" = "$name" ] || { [ "$role" = floor ] && [ "$name" = api ]; }; then
    cmd=("$WORK/no-uring" valgrind --tool=callgrind --callgrind-out-file="$WORK/cg.$role.$n" "${cmd[@]}")
  fi
  "${cmd[@]}" >"$WORK/$role.$name.log" 2>&1 &
  PIDS+=($!)
}

# instr ROLE N: callgrind total (Ir) of ROLE's daemon serving N requests.
instr() {
  local role=$1 n=$2
  rm -f "$WORK/agent.sock"
  if [ "$role" = floor ]; then
    run floor api "$WORK/floor.toml" "$n"
  elif [ "$role" = up ]; then
    run up up "$WORK/chain.toml" "$n"
  else
    run "$role" api "$WORK/chain.toml" "$n"; wait_up "$API_PORT"
    run "$role" agent "$WORK/chain.toml" "$n"; wait_up "$WORK/agent.sock"
    run "$role" proxy "$WORK/chain.toml" "$n"
  fi
  wait_up "$PORT"
  python3 "$WORK/client.py" "$INV" "$PORT" "$n" "${MIX:-}" || { tail -n 20 "$WORK"/"$role".*.log >&2; exit 1; }
  stop_all
  awk '/^(summary|totals):/ {print $2; exit}' "$WORK/cg.$role.$n"
}

printf '%-6s %14s   (%s sequential requests, a connection each, %s)\n' role instr/request "$REQS" "${MIX:-meta_data.json}"
declare -A PER
for role in $ROLES; do
  a=$(instr "$role" "$BASE")
  b=$(instr "$role" $((BASE + REQS)))
  PER[$role]=$(( (b - a) / REQS ))
  printf '%-6s %14s\n' "$role" "${PER[$role]}"
done
# top ROLE: functions by self cost per request (the longer run minus the shorter).
top() {
  python3 - "$WORK/cg.$1.$BASE" "$WORK/cg.$1.$((BASE + REQS))" "$REQS" "${PER[$1]}" <<'PY'
import re, subprocess, sys
def self_cost(f):
    out = subprocess.run(["callgrind_annotate", "--inclusive=no", "--threshold=100", f],
                         capture_output=True, text=True).stdout
    d = {}
    for ln in out.splitlines():
        m = re.match(r"\s*([\d,]+) \([\s\d.]+%\)\s+(.*?)(?: \[[^\]]*\])?$", ln)
        if m and "PROGRAM TOTALS" not in m.group(2):
            fn = m.group(2).split(":", 1)[-1]
            d[fn] = d.get(fn, 0) + int(m.group(1).replace(",", ""))
    return d
a, b, n, per = self_cost(sys.argv[1]), self_cost(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
delta = sorted(((b[k] - a.get(k, 0)) / n, k) for k in b)
for v, k in reversed(delta[-15:]):
    print(f"  {v:9.0f} {100 * v / per:5.1f}%  {k[:130]}")
PY
}
for role in $ROLES; do
  echo
  echo "top functions by self cost per request, $role (instructions, share of ${PER[$role]}):"
  top "$role"
done
echo
grep -ho 'loops use [A-Za-z]*' "$WORK"/*.log | sort | uniq -c | sed 's/^/engine: /'
echo "user-space instructions only (callgrind); the daemon under valgrind runs compio's epoll driver (io_uring_setup blocked)"
