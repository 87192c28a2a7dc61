#!/usr/bin/env bash
# Boot storm through the whole metadata path, on loopback, with a side-by-side
# haproxy comparison (issue 6).
#
#   scripts/storm.sh [--vms N] [--ramp 5s] [--profile P] [--networks M]
#                    [--proxy metaproxy|haproxy] [--compare] [--up]
#                    [--chain metaproxy|openstack] [--workers N] [--timeout 10s]
#                    [--results DIR] [--cargo-profile release|profiling]
#                    [--perf ROLE:FILE] [--backend inventory|neutron]
#                    [--max-connections N] [--access-log] [--floor] [--count]
#                    [--bin PATH] [--runs N] [--chain-first]
#
# Builds release, synthesizes an inventory (one router, M networks, N VMs on
# 127.16.0.0/12), starts the chain, runs `metaproxy storm` against it, stops
# everything by PID (also on failure), and prints the storm table. Chains:
#
#   metaproxy  api + agent + `metaproxy proxy`, three processes (default)
#   haproxy    api + agent + Debian's haproxy configured exactly as Neutron
#              renders it (metadata-path.md §1.3) in place of our proxy
#   up         `metaproxy up`: the three in one process (--up)
#
# --compare runs ours and haproxy back to back under the same load (with --up
# also `up` first), each on a freshly started chain, and prints a ratio table:
# req/s, CPU seconds per 1 000 requests of the proxy process (utime+stime from
# /proc/PID/stat, over the storm only), p99, and peak RSS (VmHWM).
#
# --chain openstack puts the REAL neutron-metadata-agent (+ neutron-rpc-server,
# RabbitMQ, Nova) of scripts/peers behind the proxy instead of our agent + API.
# The storm can only check VMs the peers know, reachable from loopback: the
# fixture's vm4 (127.10.0.11 on router1's loopnet). So that storm is ONE VM
# replaying the profile (--vms is ignored): a whole-path latency/CPU check, not
# a storm. Needs scripts/peers/up.sh, scripts/peers/install.sh --chain and
# scripts/peers/chain.sh start first (the script says so otherwise).
#
# The agent's Prometheus endpoint is scraped after every storm: the summary
# shows its backend calls (inventory lookups, or Neutron calls by kind).
# --backend neutron points our agent at the real Neutron of scripts/peers
# (noauth) instead of the inventory: the script first creates the synthesized
# networks, subnets, router (+ interfaces) and ports there (bulk REST calls;
# ports carry the inventory's instance uuid as device_id and its project), so
# the agent resolves every VM through Neutron. Needs scripts/peers/up.sh (its
# PEERS_DIR / NEUTRON_PORT settings are honoured).
#
# --max-connections sets our proxy's per-namespace cap (default: the shipped
# 65536). At the cap ours stops accepting until a connection closes and the
# excess waits in the kernel backlog, as with haproxy's maxconn (1024 in
# Neutron's config).
#
# --floor (issue 13) first runs the same storm against the physical limit:
# `metaproxy api` alone in direct mode (service_metadata_proxy = false: it
# identifies each VM by its TCP peer address, as Nova does without Neutron's
# proxy), listening where the proxy would, same inventory, one loop per core.
# Then it runs the chain asked for (the three daemons; --up: `up`; --proxy
# haproxy: haproxy -> agent -> api) and prints both rows and the ratios
# chain/floor of req/s, CPU per request (per process and summed) and VM
# p50/p99. Every process's CPU is utime+stime from /proc/PID/stat over the
# storm only; the table also gives each process's user-space share (utime)
# and its context switches per request (voluntary + involuntary, summed over
# its threads from /proc/PID/task/*/status).
#
# --runs N (with --floor) runs the whole floor-then-chain comparison N times,
# each on freshly started processes, prints each run's tables as it goes, and
# then one table of every run's ratios (req/s, summed CPU per request, user
# space above the floor) with their medians: the issue's figures are medians
# of ratios taken within one run. The runs alternate the order: odd runs
# measure the floor first, even runs the chain first (--chain-first), so that
# what one storm leaves behind for the next (TIME_WAIT sockets up to
# net.ipv4.tcp_max_tw_buckets, a warmer page cache, a hotter CPU) does not
# always fall on the same side of the ratio.
#
# --chain-first (with --floor) runs the chain before the floor.
#
# --count records, per process, every syscall (raw_syscalls:sys_enter) and
# every io_uring submission (io_uring:io_uring_submit_req, with its opcode) and
# poll arm (io_uring:io_uring_poll_arm: an op that found its socket not ready)
# with `perf record` for the length of the storm, and prints them per request
# with the top syscalls and opcodes. These counts do not move with the
# machine's load the way CPU time does (batching still does a little). The
# tracing costs CPU, so CPU and latency of a --count run are not comparable
# with a plain run.
#
# --cargo-profile builds and runs that cargo profile (default release).
# --bin PATH runs that metaproxy binary and builds nothing (before/after
# comparisons: keep a copy of the old build).
# --perf ROLE:FILE samples one process of the first setup that has it (ROLE:
# up, proxy, agent, api or haproxy) with `perf record -e cpu-clock -g` for the
# length of the storm; scripts/flamegraph.sh uses it.
#
# Exit status: 0 when every storm passed (every VM served, no error, no
# wrong-VM answer), 1 otherwise; the tables are printed either way.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/neutron-haproxy.sh
. scripts/lib/neutron-haproxy.sh

VMS=1000
RAMP=5s
PROFILE=cloud-init
NETWORKS=4
PROXY=metaproxy
COMPARE=0
UP=0
CHAIN=metaproxy
WORKERS=
TIMEOUT=10s
RESULTS=
CARGO_PROFILE=release
PERF=
BACKEND=inventory
MAX_CONNS=
FLOOR=0
COUNT=0
BIN=
RUNS=1
CHAIN_FIRST=0
ACCESS_LOG= # --access-log: access_log = true in [api], [agent] and [proxy] (lines go to $WORK/*.log)

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit "${1:-0}"; }
# The arguments of one run (--runs re-runs this script with them).
ONE_RUN=()
ARGV=("$@")
i=0
while [ "$i" -lt ${#ARGV[@]} ]; do
  case ${ARGV[$i]} in
    --runs|--results) i=$((i + 2)) ;;
    --chain-first) i=$((i + 1)) ;;
    *) ONE_RUN+=("${ARGV[$i]}"); i=$((i + 1)) ;;
  esac
done
while [ $# -gt 0 ]; do
  case $1 in
    --vms) VMS=$2; shift 2 ;;
    --ramp) RAMP=$2; shift 2 ;;
    --profile) PROFILE=$2; shift 2 ;;
    --networks) NETWORKS=$2; shift 2 ;;
    --proxy) PROXY=$2; shift 2 ;;
    --compare) COMPARE=1; shift ;;
    --up) UP=1; shift ;;
    --chain) CHAIN=$2; shift 2 ;;
    --workers) WORKERS=$2; shift 2 ;;
    --timeout) TIMEOUT=$2; shift 2 ;;
    --cargo-profile) CARGO_PROFILE=$2; shift 2 ;;
    --perf) PERF=$2; shift 2 ;;
    --backend) BACKEND=$2; shift 2 ;;
    --max-connections) MAX_CONNS=$2; shift 2 ;;
    --access-log) ACCESS_LOG=1; shift ;;
    --floor) FLOOR=1; shift ;;
    --count) COUNT=1; shift ;;
    --bin) BIN=$(realpath "$2"); shift 2 ;;
    --runs) RUNS=$2; shift 2 ;;
    --chain-first) CHAIN_FIRST=1; shift ;;
    --results) RESULTS=$2; shift 2 ;;
    -h|--help) usage 0 ;;
    *) echo "storm.sh: unknown argument $1" >&2; usage 2 ;;
  esac
done
case $PROXY in metaproxy|haproxy) ;; *) echo "--proxy must be metaproxy or haproxy" >&2; exit 2 ;; esac
case $CHAIN in metaproxy|openstack) ;; *) echo "--chain must be metaproxy or openstack" >&2; exit 2 ;; esac
case $BACKEND in inventory|neutron) ;; *) echo "--backend must be inventory or neutron" >&2; exit 2 ;; esac
if [ "$CHAIN" = openstack ] && [ "$BACKEND" = neutron ]; then
  echo "--backend configures our agent; --chain openstack has none" >&2; exit 2
fi
if [ "$FLOOR" = 1 ] && { [ "$COMPARE" = 1 ] || [ "$CHAIN" = openstack ]; }; then
  echo "--floor runs the floor and one chain; it excludes --compare and --chain openstack" >&2; exit 2
fi
if [ "$CHAIN_FIRST" = 1 ] && [ "$FLOOR" != 1 ]; then
  echo "--chain-first orders the --floor comparison: give --floor" >&2; exit 2
fi
if [ "$CHAIN" = openstack ] && [ "$UP" = 1 ]; then
  echo "--up and --chain openstack exclude each other (up contains our own agent)" >&2; exit 2
fi

# --runs N: this script N times (each run on fresh processes), then the
# medians of the per-run ratios.
if [ "$RUNS" != 1 ]; then
  case $RUNS in '' | *[!0-9]* | 0) echo "--runs takes a positive number" >&2; exit 2 ;; esac
  [ "$FLOOR" = 1 ] || { echo "--runs repeats the --floor comparison: give --floor" >&2; exit 2; }
  RUNS_DIR=$(mktemp -d /tmp/mp-storm-runs.XXXXXX)
  status=0
  for r in $(seq 1 "$RUNS"); do
    order=()
    if [ $((r % 2)) = 0 ]; then order=(--chain-first); fi
    echo "storm.sh: run $r of $RUNS ($([ ${#order[@]} = 0 ] && echo "floor first" || echo "chain first"))"
    bash scripts/storm.sh "${ONE_RUN[@]}" "${order[@]}" --results "$RUNS_DIR/$r" || status=1
  done
  python3 - "$RUNS_DIR" "$RUNS" <<'PY' || status=1
import json, statistics, sys
d, n = sys.argv[1], int(sys.argv[2])
runs = []
for r in range(1, n + 1):
    try:
        runs.append(json.load(open(f"{d}/{r}/floor-ratios.json")))
    except OSError:
        print(f"run {r}: no floor-ratios.json (it failed before its summary)")
if not runs:
    sys.exit(1)
label = runs[0]["label"]
print(f"\nstorm.sh --runs {n}: floor vs {label}, ratios within each run, then their medians"
      " (goal: req/s >= 0.80x, summed CPU per request <= 1.30x)")
print("| run | first | load avg | req/s ratio | CPU ratio | floor CPU us (user) | chain CPU us (user) | user above the floor | kernel above the floor | result |")
print("|---|---|---|---|---|---|---|---|---|---|")
for i, x in enumerate(runs, 1):
    du, dk = x["chain_user"] - x["floor_user"], (x["chain_us"] - x["chain_user"]) - (x["floor_us"] - x["floor_user"])
    x["du"], x["dk"] = du, dk
    print(f'| {i} | {x.get("first", "floor")} | {x["load"]} | {x["rps_ratio"]:.2f}x | {x["cpu_ratio"]:.2f}x | {x["floor_us"]:.1f} ({x["floor_user"]:.1f}) | '
          f'{x["chain_us"]:.1f} ({x["chain_user"]:.1f}) | {du:.1f} | {dk:.1f} | {"PASS" if x["passed"] else "FAIL"} |')
med = lambda k: statistics.median(x[k] for x in runs)
print(f'| **median of {len(runs)}** | | | **{med("rps_ratio"):.2f}x** | **{med("cpu_ratio"):.2f}x** | {med("floor_us"):.1f} ({med("floor_user"):.1f}) | '
      f'{med("chain_us"):.1f} ({med("chain_user"):.1f}) | {med("du"):.1f} | {med("dk"):.1f} | |')
PY
  if [ -n "$RESULTS" ]; then mkdir -p "$RESULTS" && cp -r "$RUNS_DIR"/. "$RESULTS"/; fi
  rm -rf "$RUNS_DIR"
  exit "$status"
fi

# The setups to run, in order.
SETUPS=()
if [ "$FLOOR" = 1 ]; then
  SETUPS=(floor)
  if [ "$UP" = 1 ]; then SETUPS+=(up); else SETUPS+=("$PROXY"); fi
  if [ "$CHAIN_FIRST" = 1 ]; then SETUPS=("${SETUPS[1]}" floor); fi
elif [ "$COMPARE" = 1 ]; then
  [ "$UP" = 1 ] && SETUPS+=(up)
  SETUPS+=(metaproxy haproxy)
elif [ "$UP" = 1 ]; then
  SETUPS=(up)
else
  SETUPS=("$PROXY")
fi
TOOLS=(python3 curl)
[ "$COUNT" = 1 ] && TOOLS+=(perf)
for t in "${TOOLS[@]}"; do command -v "$t" >/dev/null || { echo "storm.sh: need $t" >&2; exit 1; }; done
if [[ " ${SETUPS[*]} " == *" haproxy "* ]] && ! command -v haproxy >/dev/null; then
  echo "storm.sh: need haproxy (apt-get install haproxy)" >&2; exit 1
fi

WORK=$(mktemp -d /tmp/mp-storm.XXXXXX)
# shellcheck source=scripts/lib/pids.sh
. scripts/lib/pids.sh
cleanup() {
  local rc=$?
  stop_pids
  if [ -n "$RESULTS" ]; then mkdir -p "$RESULTS" && cp -r "$WORK"/. "$RESULTS"/; fi
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { echo "[storm.sh $(date -u +%H:%M:%S)] $*" >&2; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# wait_tcp PORT PID NAME: until something accepts on 127.0.0.1:PORT.
wait_tcp() {
  for _ in $(seq 1 300); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    kill -0 "$2" 2>/dev/null || { tail -n 20 "$WORK/$3.log" >&2; log "$3 exited during startup"; exit 1; }
    sleep 0.1
  done
  log "$3 not listening on :$1 after 30 s"; exit 1
}
wait_sock() {
  for _ in $(seq 1 300); do
    [ -S "$1" ] && return 0
    kill -0 "$2" 2>/dev/null || { tail -n 20 "$WORK/$3.log" >&2; log "$3 exited during startup"; exit 1; }
    sleep 0.1
  done
  log "$3: no socket $1 after 30 s"; exit 1
}

if [ -z "$BIN" ]; then
  log "building $CARGO_PROFILE"
  cargo build --profile "$CARGO_PROFILE" --quiet --bin metaproxy
  BIN=$PWD/target/$CARGO_PROFILE/metaproxy
fi
INV=$WORK/inventory.toml
SECRET=storm-secret
# `inventory synth`'s router 0, which gets every network with --routers 1.
ROUTER=5707ae75-0000-4000-8002-000000000000
AGENT_SOCK=$WORK/agent.sock

if [ "$CHAIN" = openstack ]; then
  # shellcheck source=scripts/peers/lib.sh disable=SC1091
  . scripts/peers/lib.sh
  AGENT_SOCK=$PEERS_DIR/chain/metadata_proxy
  if [ ! -S "$AGENT_SOCK" ] || [ ! -f "$PEERS_FIXTURE" ]; then
    log "no real agent at $AGENT_SOCK: run scripts/peers/up.sh && scripts/peers/install.sh --chain && scripts/peers/chain.sh start"
    exit 1
  fi
  # The fixture's VMs on loopback (vm4), as an inventory the storm checks
  # answers against: reservation id as scripts/peers/nova/populate_nova.py
  # writes it, EC2 id = nova's row id (instances are created vm1..vm4).
  python3 - "$PEERS_FIXTURE" "$INV" <<'PY'
import json, sys
fx = json.load(open(sys.argv[1]))
out = ['dhcp_domain = "novalocal"\n']
nets = {}
for name, vm in sorted(fx["instances"].items()):
    if not vm["ip_address"].startswith("127."):
        continue
    nets[vm["network"]] = vm
    nv = vm["nova"]
    n = int(vm["uuid"][:8])
    out.append(f'''[[instance]]
uuid = "{vm['uuid']}"
hostname = "{nv['hostname']}"
project = "{vm['project_id']}"
availability_zone = "{nv['availability_zone']}"
reservation_id = "r-{n:08d}"
ec2_id = {n}
root_device_name = "/dev/vda"
''' + (f"user_data = {json.dumps(nv['user_data'])}\n" if nv.get("user_data") else "")
      + (f'[[instance.key]]\nname = "{nv["key_name"]}"\ndata = {json.dumps(nv["public_key"])}\n'
         if nv.get("key_name") else "")
      + f'''[[instance.port]]
id = "{vm['port_id']}"
network = "{vm['network_id']}"
mac = "{vm['mac_address']}"
fixed_ips = ["{vm['ip_address']}"]
''')
for name, vm in nets.items():
    out.insert(1, f'''[[network]]
id = "{vm['network_id']}"
name = "{name}"
project = "{vm['project_id']}"
[[network.subnet]]
id = "{vm['subnet_id']}"
cidr = "{vm['cidr']}"
gateway = "{vm['gateway_ip']}"
dhcp = false
''')
open(sys.argv[2], "w").write("\n".join(out))
PY
  ROUTER=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["routers"]["router1"]["id"])' "$PEERS_FIXTURE")
  VMS=$(grep -c '^\[\[instance\]\]' "$INV")
  log "chain openstack: real neutron-metadata-agent at $AGENT_SOCK, router1 $ROUTER, $VMS fixture VM(s)"
else
  "$BIN" inventory synth --vms "$VMS" --networks "$NETWORKS" --routers 1 --out "$INV"
fi
NEUTRON_TOML=
if [ "$BACKEND" = neutron ]; then
  # shellcheck source=scripts/peers/lib.sh disable=SC1091
  . scripts/peers/lib.sh
  curl -sf -o /dev/null --max-time 10 "$NEUTRON_URL/v2.0/networks" \
    || { log "no Neutron at $NEUTRON_URL: run scripts/peers/up.sh first"; exit 1; }
  log "creating the inventory's $NETWORKS networks and $VMS ports in Neutron ($NEUTRON_URL)"
  t0=$SECONDS
  # Prints the Neutron router id (Neutron picks the ids; the ports keep the
  # inventory's device_id = instance uuid, project and fixed IP).
  ROUTER=$(python3 - "$INV" "$NEUTRON_URL" <<'PY'
import json, sys, tomllib, urllib.request
inv = tomllib.load(open(sys.argv[1], "rb"))
url = sys.argv[2]
def call(method, path, body):
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.load(r)
net_ids = {}
router = call("POST", "/v2.0/routers", {"router": {"name": "storm-router",
              "project_id": inv["network"][0]["project"]}})["router"]["id"]
for n in inv["network"]:
    nid = call("POST", "/v2.0/networks", {"network": {"name": n["name"], "project_id": n["project"]}})["network"]["id"]
    net_ids[n["id"]] = nid
    sub = n["subnet"][0]
    sid = call("POST", "/v2.0/subnets", {"subnet": {"network_id": nid, "project_id": n["project"],
               "ip_version": 4, "cidr": sub["cidr"], "gateway_ip": sub["gateway"],
               "enable_dhcp": False}})["subnet"]["id"]
    call("PUT", f"/v2.0/routers/{router}/add_router_interface", {"subnet_id": sid})
ports = [{"network_id": net_ids[p["network"]], "project_id": i["project"], "device_id": i["uuid"],
          "device_owner": "compute:nova", "mac_address": p["mac"],
          "fixed_ips": [{"ip_address": p["fixed_ips"][0]}]}
         for i in inv["instance"] for p in i["port"]]
for k in range(0, len(ports), 500):
    call("POST", "/v2.0/ports", {"ports": ports[k:k + 500]})
print(router)
PY
)
  log "Neutron populated in $((SECONDS - t0)) s: router $ROUTER"
  NEUTRON_TOML="backend = \"neutron\"
[agent.neutron]
url = \"$NEUTRON_URL\"
auth_strategy = \"noauth\""
fi

# write_config: one file for api, agent and proxy (and up).
write_config() {
  API_PORT=$(free_port)
  PROXY_PORT=$(free_port)
  METRICS_PORT=$(free_port)
  cat >"$WORK/metaproxy.toml" <<TOML
# rendered by scripts/storm.sh
[api]
listen = "127.0.0.1:$API_PORT"
metadata_proxy_shared_secret = "$SECRET"
inventory = "$INV"
state_dir = "$WORK/state"
${ACCESS_LOG:+access_log = true}

[agent]
socket = "$AGENT_SOCK"
${ACCESS_LOG:+access_log = true}
inventory = "$INV"
metadata_proxy_shared_secret = "$SECRET"
metrics_listen = "127.0.0.1:$METRICS_PORT"
$NEUTRON_TOML
[agent.nova]
nova_metadata_port = $API_PORT

[proxy]
agent_socket = "$AGENT_SOCK"
${MAX_CONNS:+max_connections = $MAX_CONNS}
${ACCESS_LOG:+access_log = true}
control_socket = "$WORK/proxy.ctl"
[[proxy.namespace]]
router_id = "$ROUTER"
listen = "127.0.0.1:$PROXY_PORT"
TOML
  neutron_haproxy_cfg "$WORK/haproxy.cfg" "$PROXY_PORT" "$AGENT_SOCK" "$ROUTER" "$WORK/haproxy.pid"
  # The floor: the API alone where the proxy would listen, identifying each
  # VM by its peer address, one loop per core (its default is one loop,
  # because behind the agent's pool one is plenty).
  cat >"$WORK/floor.toml" <<TOML
# rendered by scripts/storm.sh --floor
[api]
listen = "127.0.0.1:$PROXY_PORT"
service_metadata_proxy = false
workers = $(nproc)
inventory = "$INV"
state_dir = "$WORK/state"
${MAX_CONNS:+max_connections = $MAX_CONNS}
${ACCESS_LOG:+access_log = true}
TOML
}

# spawn NAME CMD...: start a process, log to $WORK/NAME.log, remember its PID.
spawn() {
  local name=$1; shift
  "$@" >"$WORK/$name.log" 2>&1 &
  PIDS+=($!)
  eval "PID_${name}=$!"
}

# start_setup SETUP: sets MEASURED (the proxy's PID, or the floor's api),
# CHAIN_PIDS and ROLE_PIDS (role=PID for each of our processes).
start_setup() {
  local setup=$1
  write_config
  rm -f "$WORK/agent.sock"
  PID_api='' PID_agent='' PID_proxy='' PID_haproxy='' PID_up=''
  if [ "$setup" = floor ]; then
    spawn api "$BIN" --log-level warn api --config "$WORK/floor.toml"
    wait_tcp "$PROXY_PORT" "$PID_api" api
    MEASURED=$PID_api CHAIN_PIDS="$PID_api" ROLE_PIDS="api=$PID_api"
  elif [ "$setup" = up ]; then
    spawn up "$BIN" --log-level warn up --config "$WORK/metaproxy.toml"
    wait_tcp "$PROXY_PORT" "$PID_up" up
    MEASURED=$PID_up CHAIN_PIDS="$PID_up" ROLE_PIDS="up=$PID_up"
  else
    if [ "$CHAIN" = metaproxy ]; then
      spawn api "$BIN" --log-level warn api --config "$WORK/metaproxy.toml"
      wait_tcp "$API_PORT" "$PID_api" api
      spawn agent "$BIN" --log-level warn agent --config "$WORK/metaproxy.toml"
      wait_sock "$AGENT_SOCK" "$PID_agent" agent
    fi
    if [ "$setup" = haproxy ]; then
      spawn haproxy haproxy -f "$WORK/haproxy.cfg" -db
      MEASURED=$PID_haproxy
    else
      spawn proxy "$BIN" --log-level warn proxy --config "$WORK/metaproxy.toml"
      MEASURED=$PID_proxy
    fi
    wait_tcp "$PROXY_PORT" "$MEASURED" "$setup"
    CHAIN_PIDS="$MEASURED $PID_agent $PID_api"
    ROLE_PIDS="$setup=$MEASURED${PID_agent:+ agent=$PID_agent}${PID_api:+ api=$PID_api}"
    [ "$setup" = metaproxy ] && ROLE_PIDS="proxy=${ROLE_PIDS#metaproxy=}"
    if [ "$CHAIN" = openstack ]; then
      # The real chain: metadata agent, rpc server, nova (gunicorn master + workers).
      local f p
      for f in "$PEERS_DIR/chain/metadata-agent.pid" "$PEERS_DIR/chain/rpc-server.pid" "$PEERS_DIR/nova/nova-metadata.pid"; do
        [ -f "$f" ] || continue
        p=$(cat "$f")
        CHAIN_PIDS="$CHAIN_PIDS $p $(pgrep -P "$p" | tr '\n' ' ' || true)"
      done
    fi
  fi
  # The chain answers (404 for an address that is no VM's is fine).
  local code
  code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 10 "http://127.0.0.1:$PROXY_PORT/openstack" || true)
  case $code in 2??|404) ;; *) log "$setup: probe got HTTP $code"; exit 1 ;; esac
}

# cpu_ticks PID...: utime+stime summed (comm may hold spaces: cut after ") ").
cpu_ticks() {
  local s=0 p t
  for p in "$@"; do
    t=$(awk '{sub(/^.*\) /, ""); print $12 + $13}' "/proc/$p/stat" 2>/dev/null) || continue
    s=$((s + t))
  done
  echo "$s"
}

# ctx_switches PID: voluntary+involuntary context switches of all its threads.
ctx_switches() {
  cat /proc/"$1"/task/*/status 2>/dev/null |
    awk '/^(non)?voluntary_ctxt_switches/ {s += $2} END {print s + 0}'
}

# role_switches: role=context switches for each of ROLE_PIDS.
role_switches() {
  local rp out=()
  for rp in $ROLE_PIDS; do out+=("${rp%%=*}=$(ctx_switches "${rp#*=}")"); done
  echo "${out[*]}"
}

# role_ticks: role=ticks for each of ROLE_PIDS.
role_ticks() {
  local rp out=()
  for rp in $ROLE_PIDS; do out+=("${rp%%=*}=$(cpu_ticks "${rp#*=}")"); done
  echo "${out[*]}"
}

# role_uticks: role=utime ticks (user space only) for each of ROLE_PIDS.
role_uticks() {
  local rp out=() t
  for rp in $ROLE_PIDS; do
    t=$(awk '{sub(/^.*\) /, ""); print $12}' "/proc/${rp#*=}/stat" 2>/dev/null) || t=0
    out+=("${rp%%=*}=$t")
  done
  echo "${out[*]}"
}

# Per-process event counts (--count): what perf records for each of ROLE_PIDS.
COUNT_EVENTS=(-e raw_syscalls:sys_enter -e io_uring:io_uring_submit_req -e io_uring:io_uring_poll_arm)

FAILED=0
: >"$WORK/results.tsv"
for setup in "${SETUPS[@]}"; do
  start_setup "$setup"
  count_pids=()
  if [ "$COUNT" = 1 ]; then
    for rp in $ROLE_PIDS; do
      perf record "${COUNT_EVENTS[@]}" -m 2048 -p "${rp#*=}" -o "$WORK/$setup.${rp%%=*}.perf" \
        >"$WORK/$setup.${rp%%=*}.perf.log" 2>&1 &
      count_pids+=($!)
    done
    sleep 1  # perf attached to every thread
  fi
  r0=$(role_ticks)
  s0=$(role_switches)
  u0=$(role_uticks)
  # shellcheck disable=SC2086 # CHAIN_PIDS is a list of PIDs
  read -r c0 a0 <<<"$(cpu_ticks "$MEASURED") $(cpu_ticks $CHAIN_PIDS)"
  load=$(cut -d' ' -f1-3 /proc/loadavg)
  log "$setup: storm of $VMS VMs ($PROFILE, ramp $RAMP) -> 127.0.0.1:$PROXY_PORT, load average $load"
  args=(--log-level warn storm --target "127.0.0.1:$PROXY_PORT" --inventory "$INV" --vms "$VMS"
        --ramp "$RAMP" --profile "$PROFILE" --timeout "$TIMEOUT" --json "$WORK/$setup.json")
  [ -n "$WORKERS" ] && args+=(--workers "$WORKERS")
  perf_pid=
  if [ -n "$PERF" ]; then
    role=${PERF%%:*}
    target_pid=$(eval "echo \${PID_${role}:-}")
    if [ -n "$target_pid" ]; then
      log "$setup: perf record -e cpu-clock -g -p $target_pid ($role) -> ${PERF#*:}"
      perf record -e cpu-clock -F 999 -g -p "$target_pid" -o "${PERF#*:}" >"$WORK/perf.log" 2>&1 &
      perf_pid=$!
      PERF=  # only the first setup that has this role
      sleep 0.5
    fi
  fi
  rc=0
  "$BIN" "${args[@]}" </dev/null || rc=$?
  if [ -n "$perf_pid" ]; then
    kill -INT "$perf_pid" 2>/dev/null || true
    wait "$perf_pid" || true
    cat "$WORK/perf.log" >&2
  fi
  # shellcheck disable=SC2086
  read -r c1 a1 <<<"$(cpu_ticks "$MEASURED") $(cpu_ticks $CHAIN_PIDS)"
  r1=$(role_ticks)
  s1=$(role_switches)
  u1=$(role_uticks)
  for p in "${count_pids[@]}"; do kill -INT "$p" 2>/dev/null || true; wait "$p" || true; done
  hwm=$(awk '/VmHWM/ {print $2}' "/proc/$MEASURED/status")
  curl -s --max-time 5 "http://127.0.0.1:$METRICS_PORT/metrics" >"$WORK/$setup.metrics" || true
  [ "$rc" = 0 ] || { FAILED=1; log "$setup: storm FAILED (exit $rc)"; }
  [ -f "$WORK/$setup.json" ] || { log "$setup: no report"; exit 1; }
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$setup" $((c1 - c0)) $((a1 - a0)) "$hwm" "$load" "$rc" \
    "$r0" "$r1" "$s0" "$s1" "$u0" "$u1" >>"$WORK/results.tsv"
  stop_pids
done

python3 - "$WORK" "$(getconf CLK_TCK)" "$CHAIN" "$BACKEND" "$NETWORKS" "$COUNT" <<'PY'
import json, os, re, subprocess, sys
from collections import Counter
work, hz, chain, backend, networks = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
count = sys.argv[6] == "1"
def backend_calls(setup):
    """Backend calls from the agent's /metrics: neutron kinds, else inventory lookups."""
    try:
        text = open(f"{work}/{setup}.metrics").read()
    except OSError:
        return "n/a"
    kinds = dict(re.findall(r'metaproxy_agent_backend_calls_total\{kind="(\w+)"\} (\d+)', text))
    if backend == "neutron":
        total = sum(int(v) for v in kinds.values())
        detail = " ".join(f"{k} {v}" for k, v in kinds.items() if v != "0")
        return f"{total} ({detail}; {total / networks:.2f}/network)"
    m = re.search(r"metaproxy_agent_inventory_lookups_total (\d+)", text)
    return f"{m.group(1)} inventory lookups" if m else "n/a"
rows = {}
for line in open(f"{work}/results.tsv"):
    setup, cpu, chain_cpu, hwm, load, rc, r0, r1, s0, s1, u0, u1 = line.rstrip("\n").split("\t")
    t0 = dict(x.split("=") for x in r0.split())
    per = {k: (int(v) - int(t0[k])) for k, v in (x.split("=") for x in r1.split())}
    w0 = dict(x.split("=") for x in s0.split())
    switches = {k: (int(v) - int(w0[k])) for k, v in (x.split("=") for x in s1.split())}
    v0 = dict(x.split("=") for x in u0.split())
    user = {k: (int(v) - int(v0[k])) for k, v in (x.split("=") for x in u1.split())}
    r = json.load(open(f"{work}/{setup}.json"))
    n = max(r["requests"], 1)
    rows[setup] = dict(
        rps=r["requests_per_s"], req=r["requests"],
        cpu=int(cpu) / hz * 1000 / n, chain=int(chain_cpu) / hz * 1000 / n,
        p99=r["request_latency_us"]["p99"] / 1000, vm99=r["vm_complete_us"]["p99"] / 1000,
        vm50=r["vm_complete_us"]["p50"] / 1000,
        rss=int(hwm) / 1024, err=sum(r["errors"].values()), wrong=r["errors"]["wrong_vm"],
        done=f'{r["vms_completed"]}/{r["vms"]}', ok="PASS" if r["passed"] else "FAIL", load=load,
        calls=backend_calls(setup),
        # CPU microseconds per request, per process (role -> us).
        us={k: v / hz * 1e6 / n for k, v in per.items()},
        # User-space CPU microseconds per request, per process.
        uus={k: v / hz * 1e6 / n for k, v in user.items()},
        # Context switches per request, per process (role -> count).
        cs={k: v / n for k, v in switches.items()})
measured = {"up": "up (all three)", "metaproxy": "metaproxy proxy", "haproxy": "haproxy",
            "floor": "floor: api direct"}
behind = ("real neutron-metadata-agent + nova" if chain == "openstack"
          else f"metaproxy agent ({backend} backend) + api")
print(f"\nstorm.sh summary (behind the proxy: {behind}; CPU = utime+stime over the storm)")
hdr = ("setup", "VMs done", "req/s", "proxy CPU s/1k req", "chain CPU s/1k req",
       "req p99 ms", "VM p50 s", "VM p99 s", "proxy peak RSS MB", "errors", "wrong VM", "result", "agent backend calls", "load avg")
print("| " + " | ".join(hdr) + " |")
print("|" + "---|" * len(hdr))
for s, x in rows.items():
    print(f'| {measured[s]} | {x["done"]} | {x["rps"]:.0f} | {x["cpu"]:.3f} | {x["chain"]:.3f} | '
          f'{x["p99"]:.1f} | {x["vm50"] / 1000:.3f} | {x["vm99"] / 1000:.3f} | {x["rss"]:.1f} | '
          f'{x["err"]} | {x["wrong"]} | {x["ok"]} | {x["calls"]} | {x["load"]} |')
def ratio(a, b):
    if not b:
        return "n/a"
    return f"{a / b:.2f}x" if a / b >= 0.1 else f"{a / b:.3f}x"
if "floor" in rows and len(rows) > 1:
    f = rows["floor"]
    cs = [s for s in rows if s != "floor"][0]
    c = rows[cs]
    label = {"up": "up", "metaproxy": "proxy -> agent -> api", "haproxy": "haproxy -> agent -> api"}[cs]
    print(f"\nfloor (api alone, direct mode, {os.cpu_count()} loops) vs {label}, same run, same storm"
          " (issue 13 goal: req/s >= 0.80x, summed CPU per request <= 1.30x):")
    print(f"| metric | floor | {label} | ratio |")
    print("|---|---|---|---|")
    print(f'| req/s | {f["rps"]:.0f} | {c["rps"]:.0f} | {ratio(c["rps"], f["rps"])} |')
    fs, csum = sum(f["us"].values()), sum(c["us"].values())
    print(f'| CPU us per request, summed | {fs:.1f} | {csum:.1f} | {ratio(csum, fs)} |')
    def per_role(key, what, digits, of_floor):
        """One row per process of the chain: the floor's value (its api's), the chain's."""
        for role, v in c[key].items():
            fr = f'{f[key][role]:.{digits}f}' if role in f[key] else "-"
            share = f"{ratio(v, fs)} of floor" if of_floor else ""
            print(f'| {what}: {role} | {fr} | {v:.{digits}f} | {share} |')
    per_role("us", "CPU us per request", 1, True)
    per_role("uus", "of which user space", 1, False)
    fcs, ccs = sum(f["cs"].values()), sum(c["cs"].values())
    print(f'| context switches per request, summed | {fcs:.2f} | {ccs:.2f} | {ratio(ccs, fcs)} |')
    per_role("cs", "context switches per request", 2, False)
    print(f'| VM complete p50 s | {f["vm50"] / 1000:.3f} | {c["vm50"] / 1000:.3f} | {ratio(c["vm50"], f["vm50"])} |')
    print(f'| VM complete p99 s | {f["vm99"] / 1000:.3f} | {c["vm99"] / 1000:.3f} | {ratio(c["vm99"], f["vm99"])} |')
    print(f'| requests | {f["req"]} | {c["req"]} | |')
    print(f'| errors / wrong VM | {f["err"]} / {f["wrong"]} | {c["err"]} / {c["wrong"]} | |')
    # For --runs: this run's ratios, read back by the run that called it.
    json.dump({"label": label, "load": c["load"], "rps_ratio": c["rps"] / max(f["rps"], 1e-9),
               "cpu_ratio": csum / max(fs, 1e-9), "floor_us": fs, "chain_us": csum,
               "floor_user": sum(f["uus"].values()), "chain_user": sum(c["uus"].values()),
               "passed": f["ok"] == "PASS" and c["ok"] == "PASS",
               "first": "floor" if next(iter(rows)) == "floor" else "chain"},
              open(f"{work}/floor-ratios.json", "w"))
if count:
    names = {}
    for line in open("/usr/include/x86_64-linux-gnu/asm/unistd_64.h"):
        m = re.match(r"#define __NR_(\w+) (\d+)", line)
        if m:
            names[int(m.group(2))] = m.group(1)
    print("\nper request, per process (--count: perf record over the storm; tracing costs CPU, so"
          " read counts, not times, from this run)")
    print("| setup | process | syscalls | io_uring_enter | SQEs submitted | poll arms | top syscalls | top SQE opcodes | lost |")
    print("|---|---|---|---|---|---|---|---|---|")
    for s, x in rows.items():
        n = max(x["req"], 1)
        for role in x["us"]:
            data = f"{work}/{s}.{role}.perf"
            if not os.path.exists(data):
                continue
            out = subprocess.run(["perf", "script", "-i", data, "-F", "event,trace"],
                                 capture_output=True, text=True).stdout
            sc, op, arms = Counter(), Counter(), 0
            for ln in out.splitlines():
                ev, _, rest = ln.strip().partition(": ")
                if ev == "raw_syscalls:sys_enter":
                    m = re.match(r"NR (\d+) \(([^)]*)\)", rest)
                    if not m:
                        continue
                    nr = int(m.group(1))
                    name = names.get(nr, str(nr))
                    if name == "recvfrom" and int(m.group(2).split(",")[3], 16) & 2:
                        name = "recvfrom(MSG_PEEK)"
                    sc[name] += 1
                elif ev == "io_uring:io_uring_submit_req":
                    m = re.search(r"opcode (\w+)", rest)
                    op[m.group(1) if m else "?"] += 1
                elif ev == "io_uring:io_uring_poll_arm":
                    arms += 1
            log = open(f"{data}.log").read()
            lost = "; ".join(re.findall(r"lost \d+ chunks", log)) or "0"
            top = lambda c: " ".join(f"{k} {v / n:.2f}" for k, v in c.most_common(6))
            print(f'| {measured[s]} | {role} | {sum(sc.values()) / n:.2f} | {sc["io_uring_enter"] / n:.2f} | '
                  f'{sum(op.values()) / n:.2f} | {arms / n:.2f} | {top(sc)} | {top(op)} | {lost} |')
if "metaproxy" in rows and "haproxy" in rows:
    m, h = rows["metaproxy"], rows["haproxy"]
    print("\nmetaproxy proxy / haproxy, same run, same load:")
    print("| metric | metaproxy | haproxy | ratio |")
    print("|---|---|---|---|")
    print(f'| req/s | {m["rps"]:.0f} | {h["rps"]:.0f} | {ratio(m["rps"], h["rps"])} |')
    print(f'| proxy CPU s per 1 000 req | {m["cpu"]:.3f} | {h["cpu"]:.3f} | {ratio(m["cpu"], h["cpu"])} |')
    print(f'| request p99 ms | {m["p99"]:.1f} | {h["p99"]:.1f} | {ratio(m["p99"], h["p99"])} |')
    print(f'| VM complete p99 s | {m["vm99"] / 1000:.3f} | {h["vm99"] / 1000:.3f} | {ratio(m["vm99"], h["vm99"])} |')
    print(f'| proxy peak RSS MB | {m["rss"]:.1f} | {h["rss"]:.1f} | {ratio(m["rss"], h["rss"])} |')
PY
[ -z "$PERF" ] || { log "--perf $PERF: no setup ran a process with that role"; exit 1; }
[ "$FAILED" = 0 ] || { log "at least one storm failed"; exit 1; }
