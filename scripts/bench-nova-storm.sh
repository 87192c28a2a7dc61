#!/usr/bin/env bash
# The storm on real data (issue 14): our chain with our API on Nova's own
# databases, against the same chain with the real nova-api-metadata in place
# of our API, in one run.
#
#   scripts/peers/up.sh   (NOVA_DB=mariadb as production; sqlite works too)
#   scripts/bench-nova-storm.sh [--instances 2000] [--vms 400] [--ramp 20s]
#       [--profile openstack] [--timeout 120s] [--bin PATH] [--only ours|nova]
#
# 1. `metaproxy inventory synth` makes --instances VMs (one router, 8
#    networks, 127.16/12 addresses) and scripts/peers/nova/populate_bulk.py
#    creates them in Nova's cell database with Nova's own objects (skipping
#    those already there: a second run creates nothing). They stay in the
#    peers' database until the next scripts/peers/up.sh, and make
#    peers_nova_source's `--check` count test fail until then: run this
#    after the tests.
# 2. For each API tier, a fresh chain on loopback: `metaproxy proxy`
#    (127.0.0.1, stamped with the synth router id) -> `metaproxy agent` with
#    the inventory backend (the same instances, so the storm measures the
#    API tier, not Neutron) -> the API tier:
#      ours  `metaproxy api`, source = "nova", local_metadata_per_cell, the
#            default metadata_cache_expiration (15 s), default workers;
#      nova  nova-api-metadata 34 (gunicorn gthread, 4 threads, as many
#            workers as cores, Nova's default cache; scripts/peers/nova-extra.sh).
#    Both are cold when their storm starts.
# 3. `metaproxy storm` sends --vms of those instances (each VM from its own
#    source address, every answer checked against the VM that asked),
#    --profile openstack by default (cloud-init's OpenStack datasource: 7
#    requests per VM, no EC2 crawl: Nova's EC2 ids are its own sequence,
#    which the synth inventory does not know).
# Prints, per tier: VMs completed, requests, req/s, request p99, VM p99, and
# CPU seconds of the API tier's processes (ours: the api; Nova: gunicorn
# master + workers; utime+stime from /proc over the storm only) per 1 000
# requests, with the load average at the start. KEEP=1 keeps the work
# directory (logs of every process, the storm's JSON reports).
set -euo pipefail
cd "$(dirname "$0")/.."
INSTANCES=2000 VMS=400 RAMP=20s PROFILE=openstack TIMEOUT=120s BIN='' ONLY=''
while [ $# -gt 0 ]; do
  case $1 in
    --instances) INSTANCES=$2; shift 2 ;;
    --vms) VMS=$2; shift 2 ;;
    --ramp) RAMP=$2; shift 2 ;;
    --profile) PROFILE=$2; shift 2 ;;
    --timeout) TIMEOUT=$2; shift 2 ;;
    --bin) BIN=$(realpath "$2"); shift 2 ;;
    --only) ONLY=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench-nova-storm.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ "$VMS" -le "$INSTANCES" ] || { echo "--vms must be <= --instances" >&2; exit 2; }
# shellcheck source=scripts/peers/lib.sh
. scripts/peers/lib.sh
[ -f "$PEERS_DIR/env" ] || { echo "no $PEERS_DIR/env: run scripts/peers/up.sh first" >&2; exit 1; }
# shellcheck disable=SC1091
. "$PEERS_DIR/env"
if [ -z "$BIN" ]; then cargo build --release --quiet --bin metaproxy; BIN=$PWD/target/release/metaproxy; fi

WORK=$(mktemp -d /tmp/mp-nova-storm.XXXXXX)
# shellcheck source=scripts/lib/pids.sh
. scripts/lib/pids.sh
cleanup() {
  local rc=$?
  stop_pids
  scripts/peers/nova-extra.sh stop storm >/dev/null 2>&1 || true
  if [ "${KEEP:-0}" = 1 ]; then log "kept $WORK (logs, storm reports)"; else rm -rf "$WORK"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
log() { echo "[bench-nova-storm $(date -u +%H:%M:%S)] $*" >&2; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_tcp() {
  for _ in $(seq 1 600); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  log "nothing on :$1 after 60 s"; exit 1
}
# cpu_ticks PID...: utime+stime of these processes (and their threads).
cpu_ticks() {
  local t=0 p
  for p in "$@"; do
    [ -r "/proc/$p/stat" ] || continue
    t=$((t + $(sed 's/.*) //' "/proc/$p/stat" | awk '{print $12 + $13}')))
  done
  echo "$t"
}

INV=$PEERS_DIR/storm-inventory-$INSTANCES.toml
ROUTER=5707ae75-0000-4000-8002-000000000000   # inventory synth's router 0
[ -f "$INV" ] || "$BIN" inventory synth --vms "$INSTANCES" --networks 8 --routers 1 --out "$INV"
log "creating $INSTANCES instances in Nova's database ($METAPROXY_PEERS_NOVA_DB) through Nova's objects"
"$METAPROXY_PEERS_NOVA_PYTHON" scripts/peers/nova/populate_bulk.py "$PEERS_DIR/nova/etc/nova.conf" "$INV" 2>"$WORK/populate.log" \
  || { tail -n 20 "$WORK/populate.log" >&2; exit 1; }

: >"$WORK/results.tsv"
for tier in ours nova; do
  [ -n "$ONLY" ] && [ "$ONLY" != "$tier" ] && continue
  API_PORT=$(free_port) PROXY_PORT=$(free_port)
  cat >"$WORK/chain.toml" <<TOML
[api]
listen = "127.0.0.1:$API_PORT"
metadata_proxy_shared_secret = "$METAPROXY_PEERS_SECRET"
source = "nova"
vendor_data_json = "$PWD/scripts/peers/nova/vendor_data.json"
[api.nova]
connection = "$METAPROXY_PEERS_NOVA_CONNECTION"
api_connection = "$METAPROXY_PEERS_NOVA_API_CONNECTION"
local_metadata_per_cell = true
[api.neutron]
url = "$METAPROXY_PEERS_NEUTRON_URL"
auth_strategy = "noauth"

[agent]
socket = "$WORK/agent.sock"
inventory = "$INV"
metadata_proxy_shared_secret = "$METAPROXY_PEERS_SECRET"
[agent.nova]
nova_metadata_port = $API_PORT
timeout = "120s"

[proxy]
agent_socket = "$WORK/agent.sock"
control_socket = "$WORK/proxy.ctl"
[[proxy.namespace]]
router_id = "$ROUTER"
listen = "127.0.0.1:$PROXY_PORT"
TOML
  if [ "$tier" = ours ]; then
    "$BIN" --log-level warn api --config "$WORK/chain.toml" >"$WORK/api.log" 2>&1 &
    PIDS+=($!); TIER_PIDS=$!
  else
    master=$(scripts/peers/nova-extra.sh start storm "$API_PORT" "$(nproc)" default)
    TIER_PIDS="$master $(pgrep -P "$master" | tr '\n' ' ')"
  fi
  wait_tcp "$API_PORT"
  rm -f "$WORK/agent.sock"
  "$BIN" --log-level warn agent --config "$WORK/chain.toml" >"$WORK/agent.log" 2>&1 & PIDS+=($!)
  for _ in $(seq 1 300); do [ -S "$WORK/agent.sock" ] && break; sleep 0.1; done
  [ -S "$WORK/agent.sock" ] || { log "the agent did not listen"; exit 1; }
  "$BIN" --log-level warn proxy --config "$WORK/chain.toml" >"$WORK/proxy.log" 2>&1 & PIDS+=($!)
  wait_tcp "$PROXY_PORT"
  load=$(cut -d' ' -f1-3 /proc/loadavg)
  # shellcheck disable=SC2086 # a list of PIDs
  c0=$(cpu_ticks $TIER_PIDS)
  log "$tier: storm of $VMS of the $INSTANCES VMs ($PROFILE, ramp $RAMP), load average $load"
  rc=0
  "$BIN" --log-level warn storm --target "127.0.0.1:$PROXY_PORT" --inventory "$INV" --vms "$VMS" \
    --ramp "$RAMP" --profile "$PROFILE" --timeout "$TIMEOUT" --json "$WORK/$tier.json" </dev/null || rc=$?
  # shellcheck disable=SC2086
  c1=$(cpu_ticks $TIER_PIDS)
  printf '%s\t%s\t%s\t%s\n' "$tier" $((c1 - c0)) "$load" "$rc" >>"$WORK/results.tsv"
  stop_pids
  [ "$tier" = nova ] && scripts/peers/nova-extra.sh stop storm
done

python3 - "$WORK" "$(getconf CLK_TCK)" "$INSTANCES" "$PROFILE" "$RAMP" "$(nproc)" <<'PY'
import json, sys
work, hz, instances, profile, ramp, cores = sys.argv[1], int(sys.argv[2]), *sys.argv[3:]
name = {"ours": "metaproxy api, source = nova",
        "nova": f"nova-api-metadata 34 (gunicorn, {cores} workers x 4 threads)"}
print(f"\n{instances} instances in Nova's database; profile {profile}, ramp {ramp}\n")
print("| API tier | VMs completed | requests | req/s | request p99 ms | VM p99 s | errors | API-tier CPU s | CPU ms / request | load avg at start |")
print("|---|---|---|---|---|---|---|---|---|---|")
for line in open(f"{work}/results.tsv"):
    tier, ticks, load, rc = line.rstrip("\n").split("\t")
    r = json.load(open(f"{work}/{tier}.json"))
    n = max(r["requests"], 1)
    cpu = int(ticks) / hz
    print(f'| {name[tier]} | {r["vms_completed"]}/{r["vms"]} | {r["requests"]} | {r["requests_per_s"]:.0f} | '
          f'{r["request_latency_us"]["p99"] / 1000:.1f} | {r["vm_complete_us"]["p99"] / 1e6:.2f} | '
          f'{sum(r["errors"].values())} | {cpu:.2f} | {cpu * 1000 / n:.3f} | {load} |')
PY
