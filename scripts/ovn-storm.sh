#!/usr/bin/env bash
# Issue 16's boot storm through `metaproxy ovn`, against Neutron's OVN shape
# (one haproxy per ovnmeta- namespace + an agent), in the same run. Root.
#
#   scripts/ovn-storm.sh [--vms 2000] [--networks 10] [--runs 3] [--ramp 5s]
#                        [--profile cloud-init] [--timeout 10s]
#                        [--cargo-profile release] [--bin PATH]
#
# Sets up, under a temp dir, all stopped by PID at the end (also on failure):
# - a real Southbound ovsdb-server (Debian's), written as Neutron and northd
#   would (scripts/ovn-storm.py): M networks, each with its metadata
#   localport and N/M VM ports bound to this chassis; a local Open_vSwitch
#   ovsdb-server with br-int; `metaproxy api` with the same VMs (inventory);
# - `metaproxy ovn`, which provisions the M ovnmeta- namespaces (a private
#   prefix, ovnstorm<pid>-, so nothing else on the host is touched);
# - one VM namespace holding every VM's address, wired to each network's
#   root veth end tap<net[:10]>0 through a Linux bridge (no ovs-vswitchd),
#   with a policy route per network (from 10.(100+n)/16: 169.254.169.254 via
#   that network's metadata port), so ONE `metaproxy storm` drives all N VMs,
#   each from its own source address, at 169.254.169.254:80.
#
# Then, alternating, --runs times each, the same storm against:
#   ours    the one `metaproxy ovn` process serving every namespace (its
#           in-process agent resolves from the Southbound replica);
#   theirs  the same namespaces served as neutron-ovn-metadata-agent does:
#           one Debian haproxy per namespace with Neutron's OVN template
#           (bind 169.254.169.254:80, `http-request add-header
#           X-OVN-Network-ID <net>`, Neutron's timeouts, maxconn 1024,
#           nbthread 2; no log lines, no user/daemon: run in the foreground)
#           relaying to a stand-in agent on a Unix socket. The stand-in is
#           `metaproxy agent` with the inventory backend (same VMs, O(1)
#           lookups, pooled client to the same api), not Neutron's Python
#           agent, which scans every Port_Binding row per request
#           (scripts/ovn-scale.sh): so "theirs" is a lower bound for Neutron,
#           and the comparison is of the haproxy-per-namespace shape, not of
#           the agents.
# `metaproxy ovn` is stopped (SIGTERM: it leaves its namespaces, as
# Neutron's agent does) while the haproxys run and started again (it adopts
# them) for its next run.
#
# Prints, per run and as medians: req/s, request p50/p99, VM p50/p99 (a VM
# from its start to its last answer), CPU seconds per 1 000 requests of the
# metadata tier (ours: the `metaproxy ovn` process; theirs: every haproxy +
# the stand-in agent; utime+stime from /proc/PID/stat over the storm only),
# how much of theirs is the stand-in agent, the api's likewise, errors and
# wrong-VM answers, and the load average.
# Exit status 1 if any storm failed (a VM not served, an error, a wrong VM).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/neutron-haproxy.sh
. scripts/lib/neutron-haproxy.sh

VMS=2000
NETS=10
RUNS=3
RAMP=5s
PROFILE=cloud-init
TIMEOUT=10s
CARGO_PROFILE=release
BIN=
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
  case $1 in
    --vms) VMS=$2; shift 2 ;;
    --networks) NETS=$2; shift 2 ;;
    --runs) RUNS=$2; shift 2 ;;
    --ramp) RAMP=$2; shift 2 ;;
    --profile) PROFILE=$2; shift 2 ;;
    --timeout) TIMEOUT=$2; shift 2 ;;
    --cargo-profile) CARGO_PROFILE=$2; shift 2 ;;
    --bin) BIN=$2; shift 2 ;;
    -h|--help) usage ;;
    *) echo "unknown argument $1" >&2; usage 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "needs root (network namespaces)" >&2; exit 1; }
for t in ovsdb-server ovsdb-tool ovsdb-client haproxy ip python3 curl; do
  command -v "$t" >/dev/null || { echo "needs $t (apt-get install ovn-central ovn-common openvswitch-common haproxy iproute2 python3 curl)" >&2; exit 1; }
done
SB_SCHEMA=/usr/share/ovn/ovn-sb.ovsschema
VS_SCHEMA=/usr/share/openvswitch/vswitch.ovsschema
if [ ! -f $SB_SCHEMA ] || [ ! -f $VS_SCHEMA ]; then echo "needs $SB_SCHEMA and $VS_SCHEMA" >&2; exit 1; fi
if [ "$NETS" -lt 1 ] || [ "$NETS" -gt 150 ]; then echo "--networks must be 1..150" >&2; exit 2; fi
[ $(( (VMS + NETS - 1) / NETS )) -le 60000 ] || { echo "at most 60 000 VMs per network" >&2; exit 2; }

if [ -z "$BIN" ]; then
  cargo build --quiet --profile "$CARGO_PROFILE" --bin metaproxy
  BIN=target/$CARGO_PROFILE/metaproxy
fi
BIN=$(realpath "$BIN")

WORK=$(mktemp -d /tmp/ovn-storm.XXXXXX)
TAG=$$
PREFIX=ovnstorm$TAG-
VMNS=ovnstorm$TAG-vms
CHASSIS=storm-chassis
SECRET=ovn-storm-secret
PIDS=()         # long-lived: ovsdb-servers, api, stand-in agent
OVN_PID=
HAP_PIDS=()
log() { echo "[$(date +%T)] $*" >&2; }

stop_pid() { # PID: SIGTERM, wait up to 10 s, then SIGKILL
  local p=$1 i
  kill "$p" 2>/dev/null || return 0
  for i in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$p" 2>/dev/null || true
  wait "$p" 2>/dev/null || true
}
stop_haproxys() {
  local p
  for p in "${HAP_PIDS[@]}"; do stop_pid "$p"; done
  HAP_PIDS=()
}
cleanup() {
  set +e
  stop_haproxys
  [ -n "$OVN_PID" ] && stop_pid "$OVN_PID"
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do stop_pid "${PIDS[i]}"; done
  for ns in $(ip netns list | awk '{print $1}' | grep "^ovnstorm$TAG-"); do ip netns del "$ns"; done
  for ((n = 0; n < NETS; n++)); do ip link del "osb${n}_$TAG" 2>/dev/null; done
  if [ -n "${KEEP:-}" ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

start_db() { # NAME SCHEMA: ovsdb-server on $WORK/NAME.sock
  ovsdb-tool create "$WORK/$1.db" "$2"
  ovsdb-server --remote="punix:$WORK/$1.sock" --unixctl="$WORK/$1.ctl" -vconsole:off \
    --log-file="$WORK/$1-server.log" "$WORK/$1.db" </dev/null >/dev/null 2>"$WORK/$1.err" &
  PIDS+=("$!")
  local i
  for i in $(seq 200); do
    ovsdb-client --timeout=2 list-tables "unix:$WORK/$1.sock" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  log "$1 ovsdb-server not answering"; exit 1
}
start_db sb $SB_SCHEMA
start_db ovs $VS_SCHEMA
SB=unix:$WORK/sb.sock
OVS=unix:$WORK/ovs.sock
ovsdb-client transact "$OVS" '["Open_vSwitch",
  {"op":"insert","table":"Bridge","uuid-name":"b","row":{"name":"br-int"}},
  {"op":"insert","table":"Open_vSwitch","row":{"external_ids":["map",[["system-id","'$CHASSIS'"]]],
   "bridges":["set",[["named-uuid","b"]]]}}]' >/dev/null
log "populating the Southbound database: $NETS networks, $VMS VMs bound to $CHASSIS"
python3 scripts/ovn-storm.py populate "$SB" "$CHASSIS" "$NETS" "$VMS" "$WORK"
mapfile -t NET_LINES <"$WORK/nets.txt"
INV=$WORK/inventory.toml

cat >"$WORK/api.toml" <<EOF
[api]
listen = "127.0.0.1:0"
metadata_proxy_shared_secret = "$SECRET"
inventory = "$INV"
state_dir = "$WORK/api-state"
EOF
"$BIN" api --config "$WORK/api.toml" 2>"$WORK/api.log" &
API_PID=$!
PIDS+=("$API_PID")
for _ in $(seq 300); do
  API_PORT=$(sed -n 's/.*api listener up: 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$WORK/api.log" | head -1)
  [ -n "$API_PORT" ] && break
  sleep 0.1
done
[ -n "$API_PORT" ] || { log "api not up"; cat "$WORK/api.log" >&2; exit 1; }

cat >"$WORK/ovn.toml" <<EOF
[ovn]
ovn_sb_connection = "$SB"
metadata_proxy_shared_secret = "$SECRET"
[ovn.ovs]
ovsdb_connection = "$OVS"
[ovn.nova]
nova_metadata_host = "127.0.0.1"
nova_metadata_port = $API_PORT

[proxy]
control_socket = "$WORK/ovn.ctl"
[proxy.discover]
ovn_prefixes = ["$PREFIX"]
EOF
AGENT_SOCK=$WORK/agent.sock
cat >"$WORK/agent.toml" <<EOF
[agent]
socket = "$AGENT_SOCK"
inventory = "$INV"
metadata_proxy_shared_secret = "$SECRET"
[agent.nova]
nova_metadata_host = "127.0.0.1"
nova_metadata_port = $API_PORT
EOF

start_ovn() {
  RUNTIME_DIRECTORY=$WORK/run "$BIN" ovn --config "$WORK/ovn.toml" 2>>"$WORK/ovn.log" &
  OVN_PID=$!
}
stop_ovn() { stop_pid "$OVN_PID"; OVN_PID=; }

# The first VM address of network line $1 ("net md-mac prefix").
first_vm() { echo "${1##* }.1.1"; }
# Until every network answers one of its VMs (200 on /openstack).
wait_served() {
  local line i
  for line in "${NET_LINES[@]}"; do
    for i in $(seq 300); do
      [ "$(ip netns exec "$VMNS" curl -s -o /dev/null -w '%{http_code}' --max-time 2 \
            --interface "$(first_vm "$line")" http://169.254.169.254/openstack)" = 200 ] && continue 2
      sleep 0.1
    done
    log "network ${line%% *} not served after 30 s ($1)"; tail -20 "$WORK/ovn.log" >&2; exit 1
  done
}

log "starting metaproxy ovn (provisions $NETS namespaces)"
start_ovn
for line in "${NET_LINES[@]}"; do
  net=${line%% *}
  for i in $(seq 600); do ip link show "tap${net:0:10}0" >/dev/null 2>&1 && continue 2; sleep 0.1; done
  log "tap${net:0:10}0 not provisioned after 60 s"; tail -20 "$WORK/ovn.log" >&2; exit 1
done

# The VM namespace: every VM's address, one interface per network.
ip netns add "$VMNS"
ip -n "$VMNS" link set lo up
ip netns exec "$VMNS" sysctl -qw net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0
: >"$WORK/vm-addrs.batch"
# Also, per network, a permanent neighbour entry for each VM in its ovnmeta-
# namespace: the IPv4 neighbour table is one table for all namespaces, and
# past net.ipv4.neigh.default.gc_thresh3 (1024) dynamic entries fail
# ("neighbour table overflow": the namespace cannot answer a VM's SYN).
# Permanent entries do not count against it, and this changes no host
# setting. Both setups get the same entries.
python3 - "$INV" "$WORK/nets.txt" "$WORK" "$PREFIX" >"$WORK/vm-addrs.batch" <<'PY'
import sys, tomllib
inv = tomllib.load(open(sys.argv[1], "rb"))
nets = [l.split()[0] for l in open(sys.argv[2]) if l.strip()]
neigh = [open(f"{sys.argv[3]}/neigh-{n}.batch", "w") for n in range(len(nets))]
for vm in inv.get("instance", []):
    p = vm["port"][0]
    n = nets.index(p["network"])
    print(f"addr add {p['fixed_ips'][0]}/16 dev e{n}")
    neigh[n].write(f"neigh replace {p['fixed_ips'][0]} lladdr 02:00:00:00:{n:02x}:01 "
                   f"dev tap{nets[n][:10]}1 nud permanent\n")
PY
n=0
for line in "${NET_LINES[@]}"; do
  read -r net _ prefix <<<"$line"
  br=osb${n}_$TAG
  ip link add "$br" type bridge
  ip link add "osv${n}_$TAG" type veth peer name "e$n" netns "$VMNS"
  ip link set "osv${n}_$TAG" master "$br"
  ip link set "tap${net:0:10}0" master "$br"
  ip link set "$br" up
  ip link set "osv${n}_$TAG" up
  ip -n "$VMNS" link set "e$n" address "02:00:00:00:$(printf %02x "$n"):01"
  ip -n "$VMNS" link set "e$n" up
  ip -n "$PREFIX$net" -batch "$WORK/neigh-$n.batch"
  ip -n "$VMNS" rule add from "$prefix.0.0/16" table $((100 + n))
  ip -n "$VMNS" route add 169.254.169.254/32 via "$prefix.0.2" dev "e$n" onlink table $((100 + n))
  n=$((n + 1))
done
ip -n "$VMNS" -batch "$WORK/vm-addrs.batch"
wait_served ours

"$BIN" agent --config "$WORK/agent.toml" 2>"$WORK/agent.log" &
AGENT_PID=$!
PIDS+=("$AGENT_PID")
for _ in $(seq 300); do [ -S "$AGENT_SOCK" ] && break; sleep 0.1; done

# Neutron's OVN haproxy template (neutron/agent/ovn/metadata/driver.py via
# driver_base.py; ../shared/spec/metadata-path.md §1.3), per namespace.
start_haproxys() {
  local n=0 line net
  for line in "${NET_LINES[@]}"; do
    net=${line%% *}
    neutron_ovn_haproxy_cfg "$WORK/haproxy-$n.cfg" 169.254.169.254:80 "$AGENT_SOCK" "$net" "$WORK/haproxy-$n.pid"
    ip netns exec "$PREFIX$net" haproxy -f "$WORK/haproxy-$n.cfg" -db 2>>"$WORK/haproxy.log" &
    HAP_PIDS+=("$!")
    n=$((n + 1))
  done
}

cpu_ticks() { # PID...: utime+stime summed
  local s=0 p t
  for p in "$@"; do
    t=$(awk '{sub(/^.*\) /, ""); print $12 + $13}' "/proc/$p/stat" 2>/dev/null) || continue
    s=$((s + t))
  done
  echo $s
}

# The haproxy processes: `ip netns exec` execs haproxy in place, so the PID
# we started is haproxy's.
storm() { # SETUP RUN AGENT_PID|- TIER_PIDS...: the tier's CPU, and of it the agent's
  local setup=$1 run=$2 agent=$3 c0 c1 a0 a1 g0=0 g1=0 rc=0
  shift 3
  [ "$agent" = - ] || g0=$(cpu_ticks "$agent")
  c0=$(cpu_ticks "$@"); a0=$(cpu_ticks "$API_PID")
  ip netns exec "$VMNS" "$BIN" --log-level warn storm --target 169.254.169.254:80 \
    --inventory "$INV" --vms "$VMS" --ramp "$RAMP" --profile "$PROFILE" --timeout "$TIMEOUT" \
    --json "$WORK/$setup-$run.json" >"$WORK/$setup-$run.out" 2>&1 || rc=$?
  c1=$(cpu_ticks "$@"); a1=$(cpu_ticks "$API_PID")
  [ "$agent" = - ] || g1=$(cpu_ticks "$agent")
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$setup" "$run" $((c1 - c0)) $((a1 - a0)) \
    "$(cut -d' ' -f1-3 /proc/loadavg)" "$rc" $((g1 - g0)) >>"$WORK/rows.tsv"
  log "$setup run $run: rc=$rc $(grep -m1 -i 'req/s\|requests' "$WORK/$setup-$run.out" || true)"
}

: >"$WORK/rows.tsv"
for ((r = 1; r <= RUNS; r++)); do
  [ -n "$OVN_PID" ] || { start_ovn; wait_served ours; }
  storm ours "$r" - "$OVN_PID"
  stop_ovn
  start_haproxys
  wait_served theirs
  storm theirs "$r" "$AGENT_PID" "${HAP_PIDS[@]}" "$AGENT_PID"
  stop_haproxys
done

python3 - "$WORK" "$(getconf CLK_TCK)" "$VMS" "$NETS" "$PROFILE" <<'PY'
import json, statistics, sys
work, hz, vms, nets, profile = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
rows = {"ours": [], "theirs": []}
failed = False
for line in open(f"{work}/rows.tsv"):
    setup, run, cpu, api, load, rc, agent = line.rstrip("\n").split("\t")
    try:
        r = json.load(open(f"{work}/{setup}-{run}.json"))
    except (OSError, ValueError):
        print(f"{setup} run {run}: no report (rc {rc}):\n" + open(f"{work}/{setup}-{run}.out").read())
        failed = True
        continue
    n = max(r["requests"], 1)
    failed |= not r["passed"]
    rows[setup].append(dict(
        run=run, rps=r["requests_per_s"], req=r["requests"],
        p50=r["request_latency_us"]["p50"] / 1000, p99=r["request_latency_us"]["p99"] / 1000,
        vm50=r["vm_complete_us"]["p50"] / 1e6, vm99=r["vm_complete_us"]["p99"] / 1e6,
        cpu=int(cpu) / hz * 1000 / n, api=int(api) / hz * 1000 / n,
        agent=int(agent) / hz * 1000 / n,
        err=r["errors"]["connect"] + r["errors"]["timeout"] + r["errors"]["io"]
            + r["errors"]["status"] + r["errors"]["body"],
        wrong=r["errors"]["wrong_vm"], done=f'{r["vms_completed"]}/{r["vms"]}', load=load,
        passed=r["passed"]))
names = {"ours": "metaproxy ovn (1 process)", "theirs": f"{nets} haproxy + stand-in agent"}
print(f"\n{vms} VMs over {nets} networks, profile {profile}; CPU = utime+stime over the storm, per 1 000 requests")
print("| setup | run | VMs done | requests | req/s | req p50 ms | req p99 ms | VM p50 s | VM p99 s | tier CPU s/1k req | of it the stand-in agent | api CPU s/1k req | errors | wrong VM | load avg |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for s, rs in rows.items():
    for x in rs:
        print(f'| {names[s]} | {x["run"]} | {x["done"]} | {x["req"]} | {x["rps"]:.0f} | {x["p50"]:.1f} | {x["p99"]:.1f} | '
              f'{x["vm50"]:.2f} | {x["vm99"]:.2f} | {x["cpu"]:.3f} | {x["agent"] if s == "theirs" else "-":{".3f" if s == "theirs" else ""}} | {x["api"]:.3f} | {x["err"]} | {x["wrong"]} | {x["load"]} |')
med = lambda rs, k: statistics.median(x[k] for x in rs)
if rows["ours"] and rows["theirs"]:
    print(f"\nmedians of {len(rows['ours'])}/{len(rows['theirs'])} runs")
    print("| | metaproxy ovn | haproxy + stand-in agent | ours / theirs |")
    print("|---|---|---|---|")
    for k, label in [("rps", "req/s"), ("p50", "request p50 ms"), ("p99", "request p99 ms"),
                     ("vm50", "VM complete p50 s"), ("vm99", "VM complete p99 s"),
                     ("cpu", "metadata tier CPU s per 1 000 req"),
                     ("agent", "of it the stand-in agent"), ("api", "api CPU s per 1 000 req")]:
        a, b = med(rows["ours"], k), med(rows["theirs"], k)
        if k == "agent":
            print(f"| {label} | in-process | {b:.3f} | |")
            continue
        ratio = f"{a / b:.2f}" if b else "n/a"
        print(f"| {label} | {a:.3f} | {b:.3f} | {ratio} |")
sys.exit(1 if failed else 0)
PY
