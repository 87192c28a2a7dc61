#!/usr/bin/env bash
# Side by side, same run: GET /openstack/latest/meta_data.json for the same
# instance (the peers fixture's vm4) from
#   1. `metaproxy up` (proxy -> agent -> api, identified by source address),
#   2. `metaproxy api` alone, with Neutron's signed headers,
#   3. the real Nova 34 metadata API from scripts/peers/, same signed headers.
#
#   scripts/peers/up.sh && scripts/bench-nova-vs-up.sh [seconds=10] [connections=20]
#
# wrk -t1 -c<connections> --latency; prints req/s and p99 for each. The
# instance's meta_data.json is checked to be byte-identical (random_seed
# masked) across the three before measuring. In `up` the instance sits on
# 127.0.0.0/8 as 127.0.0.1 (wrk cannot pick a source address); meta_data.json
# has no addresses in it, so the document is the same.
set -euo pipefail
cd "$(dirname "$0")/.."
DUR=${1:-10}
CONNS=${2:-20}
FIXTURE=${METAPROXY_PEERS_FIXTURE:-/tmp/metaproxy-peers/fixture.json}
VM=${BENCH_VM:-vm4}
PY=${PEERS_PYTHON:-python3}
WORK=$(mktemp -d /tmp/mp-bench-nova.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

command -v wrk >/dev/null || { echo "need wrk (apt-get install wrk)"; exit 1; }
[ -f "$FIXTURE" ] || { echo "no fixture $FIXTURE: run scripts/peers/up.sh"; exit 1; }
cargo build --release --quiet --bin metaproxy
BIN=target/release/metaproxy
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
API_PORT=$(free_port)
UP_API_PORT=$(free_port)
UP_PORT=$(free_port)

# uuid project nova_url secret, then the inventory.
read -r UUID PROJECT NOVA SECRET < <("$PY" - "$FIXTURE" "$VM" "$WORK/inventory.toml" <<'PY'
import json, sys
fx = json.load(open(sys.argv[1])); vm = fx["instances"][sys.argv[2]]; nv = vm["nova"]
q = json.dumps
meta = ", ".join("%s = %s" % (q(k), q(v)) for k, v in nv["metadata"].items())
inv = f"""dhcp_domain = "novalocal"
[[network]]
id = "b0000000-0000-4000-8000-00000000a001"
project = {q(vm["project_id"])}
mtu = 1500
[[network.subnet]]
id = "b0000000-0000-4000-8000-00000000b001"
cidr = "127.0.0.0/8"
dhcp = false
[[router]]
id = "b0000000-0000-4000-8000-00000000c001"
networks = ["b0000000-0000-4000-8000-00000000a001"]
[[instance]]
uuid = {q(vm["uuid"])}
name = {q(nv["display_name"])}
hostname = {q(nv["hostname"])}
project = {q(vm["project_id"])}
availability_zone = {q(nv["availability_zone"])}
meta = {{ {meta} }}
"""
if nv.get("user_data"):
    inv += "user_data = %s\n" % q(nv["user_data"])
if nv.get("key_name"):
    inv += "[[instance.key]]\nname = %s\ndata = %s\n" % (q(nv["key_name"]), q(nv["public_key"]))
inv += '[[instance.port]]\nid = %s\nnetwork = "b0000000-0000-4000-8000-00000000a001"\nmac = %s\nfixed_ips = ["127.0.0.1"]\n' % (
    q(vm["port_id"]), q(vm["mac_address"]))
open(sys.argv[3], "w").write(inv)
print(vm["uuid"], vm["project_id"], fx["nova_url"].rstrip("/"), fx["shared_secret"])
PY
)
SIG=$(printf %s "$UUID" | openssl dgst -sha256 -hmac "$SECRET" | awk '{print $NF}')

cat >"$WORK/api.toml" <<TOML
[api]
listen = "127.0.0.1:$API_PORT"
metadata_proxy_shared_secret = "$SECRET"
inventory = "$WORK/inventory.toml"
state_dir = "$WORK/api-state"
TOML
cat >"$WORK/up.toml" <<TOML
[api]
listen = "127.0.0.1:$UP_API_PORT"
metadata_proxy_shared_secret = "$SECRET"
inventory = "$WORK/inventory.toml"
state_dir = "$WORK/up-state"
[agent]
socket = "$WORK/agent.sock"
inventory = "$WORK/inventory.toml"
metadata_proxy_shared_secret = "$SECRET"
[agent.nova]
nova_metadata_port = $UP_API_PORT
[proxy]
agent_socket = "$WORK/agent.sock"
control_socket = "$WORK/ctl.sock"
[[proxy.namespace]]
router_id = "b0000000-0000-4000-8000-00000000c001"
listen = "127.0.0.1:$UP_PORT"
TOML
"$BIN" api --config "$WORK/api.toml" 2>"$WORK/api.log" & PIDS+=($!)
"$BIN" up --config "$WORK/up.toml" 2>"$WORK/up.log" & PIDS+=($!)
for _ in $(seq 100); do
  curl -fs -o /dev/null "http://127.0.0.1:$UP_PORT/openstack/latest/meta_data.json" \
    && curl -fs -o /dev/null -H "X-Instance-ID: $UUID" -H "X-Tenant-ID: $PROJECT" -H "X-Instance-ID-Signature: $SIG" \
         "http://127.0.0.1:$API_PORT/openstack/latest/meta_data.json" && break
  sleep 0.1
done

SIGNED=(-H "X-Instance-ID: $UUID" -H "X-Tenant-ID: $PROJECT" -H "X-Instance-ID-Signature: $SIG")
P=/openstack/latest/meta_data.json
mask() { sed 's/"random_seed": "[^"]*"/"random_seed": "-"/'; }
curl -fsS "http://127.0.0.1:$UP_PORT$P" | mask >"$WORK/up.json"
curl -fsS "${SIGNED[@]}" "http://127.0.0.1:$API_PORT$P" | mask >"$WORK/api.json"
curl -fsS "${SIGNED[@]}" "$NOVA$P" | mask >"$WORK/nova.json"
if ! cmp -s "$WORK/up.json" "$WORK/nova.json" || ! cmp -s "$WORK/api.json" "$WORK/nova.json"; then
  echo "meta_data.json differs:"; cat "$WORK"/{up,api,nova}.json; exit 1
fi
echo "meta_data.json identical (random_seed masked), $(wc -c <"$WORK/nova.json") bytes: $UUID"

run() { # name url [headers...]
  local name=$1 url=$2; shift 2
  local out; out=$(wrk -t1 -c"$CONNS" -d"${DUR}s" --latency "$@" "$url")
  local rps p99 non2xx errors
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
  non2xx=$(awk '/Non-2xx/ {print $NF}' <<<"$out")
  errors=$(awk '/Socket errors/ {sub(/.*Socket errors: /, ""); print}' <<<"$out")
  printf '%-34s %10s req/s   p50 %8s   p99 %8s   non-2xx %s   socket errors: %s\n' \
    "$name" "$rps" "$(awk '$1 == "50%" {print $2}' <<<"$out")" "$p99" "${non2xx:-0}" "${errors:-none}"
}
echo "wrk -t1 -c$CONNS -d${DUR}s --latency, GET $P"
run "metaproxy up (proxy+agent+api)" "http://127.0.0.1:$UP_PORT$P"
run "metaproxy api (signed headers)" "http://127.0.0.1:$API_PORT$P" "${SIGNED[@]}"
run "nova 34 metadata (signed headers)" "$NOVA$P" "${SIGNED[@]}"
