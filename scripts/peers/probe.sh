#!/usr/bin/env bash
# Smoke check of running peers with curl (exit 1 if a check fails):
#  1. nova: signed request for instance vm1, as the metadata agent sends it
#     (X-Instance-ID, X-Tenant-ID, X-Instance-ID-Signature =
#     hex(HMAC-SHA256(secret, instance_id)), X-Forwarded-For) for
#     /openstack/latest/meta_data.json -> 200 with vm1's uuid; a wrong
#     signature -> 403
#  2. neutron: router1 -> its networks (device_owner router interfaces)
#  3. neutron: one batched fixed_ips=ip_address%3D... lookup on router1's
#     networks for vm1, vm2, vm4 (and a miss) -> those three ports
#   scripts/peers/probe.sh [FIXTURE]
set -euo pipefail
# shellcheck source=scripts/peers/lib.sh
. "$(dirname "$0")/lib.sh"
FX=${1:-$PEERS_FIXTURE}
[ -f "$FX" ] || peers_die "fixture $FX not found (run scripts/peers/up.sh)"
fx() { "$PEERS_PYTHON" -c 'import json,sys; d=json.load(open(sys.argv[1]))
for k in sys.argv[2].split("."): d=d[k]
print(d)' "$FX" "$1"; }
fail=0
check() { if [ "$1" = "$2" ]; then echo "  ok   $3"; else echo "  FAIL $3 (got '$1', want '$2')"; fail=1; fi; }

NOVA=$(fx nova_url); NEUTRON=$(fx neutron_url); SECRET=$(fx shared_secret)
IID=$(fx instances.vm1.uuid); TENANT=$(fx instances.vm1.project_id); IP=$(fx instances.vm1.ip_address)
SIG=$("$PEERS_PYTHON" -c 'import hashlib,hmac,sys
print(hmac.new(sys.argv[1].encode(), sys.argv[2].encode(), hashlib.sha256).hexdigest())' "$SECRET" "$IID")
TMP=$(mktemp -d); trap 'rm -rf "$TMP"' EXIT

echo "== nova metadata: GET $NOVA/openstack/latest/meta_data.json as vm1 ($IID, XFF $IP)"
st=$(curl -sS -o "$TMP/md.json" -w '%{http_code}' --max-time 30 \
  -H "X-Instance-ID: $IID" -H "X-Tenant-ID: $TENANT" \
  -H "X-Instance-ID-Signature: $SIG" -H "X-Forwarded-For: $IP" \
  "$NOVA/openstack/latest/meta_data.json")
echo "  status $st: $(head -c 300 "$TMP/md.json")..."
check "$st" 200 "meta_data.json status"
uuid=$("$PEERS_PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1])).get("uuid"))' "$TMP/md.json" 2>/dev/null || echo '?')
check "$uuid" "$IID" "meta_data.json uuid"
st=$(curl -sS -o /dev/null -w '%{http_code}' --max-time 30 \
  -H "X-Instance-ID: $IID" -H "X-Tenant-ID: $TENANT" \
  -H "X-Instance-ID-Signature: 0${SIG:1}" -H "X-Forwarded-For: $IP" \
  "$NOVA/openstack/latest/meta_data.json")
check "$st" 403 "bad signature rejected"

R1=$(fx routers.router1.id)
OWN='device_owner=network:router_interface&device_owner=network:ha_router_replicated_interface&device_owner=network:router_interface_distributed'
URL="$NEUTRON/v2.0/ports?device_id=$R1&$OWN&fields=network_id"
echo "== neutron: router1 -> networks"
echo "  GET $URL"
st=$(curl -sS -o "$TMP/rn.json" -w '%{http_code}' --max-time 30 "$URL")
echo "  status $st: $(cat "$TMP/rn.json")"
check "$st" 200 "router networks status"
got=$("$PEERS_PYTHON" -c 'import json,sys; print(" ".join(sorted(p["network_id"] for p in json.load(open(sys.argv[1]))["ports"])))' "$TMP/rn.json")
want=$("$PEERS_PYTHON" -c 'import json,sys; print(" ".join(sorted(json.load(open(sys.argv[1]))["routers"]["router1"]["network_ids"])))' "$FX")
check "$got" "$want" "router1 networks = net1 + loopnet"

NETQ=$("$PEERS_PYTHON" -c 'import json,sys; print("&".join("network_id="+n for n in json.load(open(sys.argv[1]))["routers"]["router1"]["network_ids"]))' "$FX")
IPS="$(fx instances.vm1.ip_address) $(fx instances.vm2.ip_address) $(fx instances.vm4.ip_address) 10.10.0.99"
IPQ=$(for i in $IPS; do printf '&fixed_ips=ip_address%%3D%s' "$i"; done)
URL="$NEUTRON/v2.0/ports?$NETQ$IPQ&fields=device_id&fields=tenant_id&fields=project_id&fields=fixed_ips&fields=network_id"
echo "== neutron: batched IP lookup ($IPS) on router1's networks"
echo "  GET $URL"
st=$(curl -sS -o "$TMP/ip.json" -w '%{http_code}' --max-time 30 "$URL")
echo "  status $st: $(head -c 600 "$TMP/ip.json")..."
check "$st" 200 "batched lookup status"
got=$("$PEERS_PYTHON" -c 'import json,sys; print(" ".join(sorted(p["device_id"] for p in json.load(open(sys.argv[1]))["ports"])))' "$TMP/ip.json")
want="$(fx instances.vm1.uuid) $(fx instances.vm2.uuid) $(fx instances.vm4.uuid)"
check "$got" "$want" "batched lookup -> vm1 vm2 vm4 (miss and net2's vm3 absent)"

if [ "$fail" = 0 ]; then echo "probe: all checks passed"; else echo "probe: FAILED" >&2; exit 1; fi
