#!/usr/bin/env bash
# Issue 16's scale measurement: a real Southbound ovsdb-server (Debian's) on
# a Unix socket under a temp dir, filled as Neutron and northd would with
# 10 000 VM Port_Binding rows across 500 networks (plus each network's
# localport metadata port), 100 of them in 50 networks bound to this
# chassis; then
# - our replica (examples/ovn_scale.rs, 3 fresh processes): time to a
#   synced snapshot, RSS, rows held, and µs per (network, IP) lookup;
# - Neutron's per-request get_network_port_bindings_by_ip scan, in Python
#   (scripts/ovn-scale.py), over every Port_Binding row of the same DB;
# all in the same run. Prints medians of 3 and the ratio.
#
# Usage: scripts/ovn-scale.sh            (debug build of the example)
#        OVN_SCALE_RELEASE=1 scripts/ovn-scale.sh
# Needs ovn-central ovn-common openvswitch-common (ovsdb-server, -tool,
# -client, /usr/share/ovn/ovn-sb.ovsschema) and python3.
set -euo pipefail

cd "$(dirname "$0")/.."
SCHEMA=/usr/share/ovn/ovn-sb.ovsschema
ITERS_RUST=${ITERS_RUST:-5000}
ITERS_PY=${ITERS_PY:-3}

for t in ovsdb-server ovsdb-tool ovsdb-client python3; do
    command -v "$t" >/dev/null || { echo "needs $t (apt-get install ovn-central ovn-common openvswitch-common python3)" >&2; exit 1; }
done
[[ -f $SCHEMA ]] || { echo "needs $SCHEMA (apt-get install ovn-common)" >&2; exit 1; }

tmp=$(mktemp -d)
server_pid=
cleanup() {
    if [[ -n $server_pid ]]; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    rm -rf "$tmp"
}
trap cleanup EXIT

profile=debug
build=(cargo build --quiet --example ovn_scale)
if [[ -n ${OVN_SCALE_RELEASE:-} ]]; then
    profile=release
    build+=(--release)
fi
"${build[@]}"
bin=target/$profile/examples/ovn_scale

remote=unix:$tmp/sb.sock
ovsdb-tool create "$tmp/sb.db" "$SCHEMA"
ovsdb-server --remote="punix:$tmp/sb.sock" --unixctl="$tmp/ctl" -vconsole:off \
    --log-file="$tmp/ovsdb-server.log" "$tmp/sb.db" </dev/null >/dev/null 2>"$tmp/stderr" &
server_pid=$!
for _ in $(seq 200); do
    ovsdb-client --timeout=2 list-tables "$remote" OVN_Southbound >/dev/null 2>&1 && break
    sleep 0.1
done
echo "ovsdb-server $(ovsdb-server --version | head -1 | awk '{print $NF}'), schema $(ovsdb-tool schema-version "$SCHEMA")"

t0=$(date +%s.%N)
python3 scripts/ovn-scale.py populate "$remote" "$tmp/queries.json"
t1=$(date +%s.%N)
echo "populated in $(awk "BEGIN {printf \"%.1f\", $t1 - $t0}") s"

ovsdb-client dump -f json "$remote" OVN_Southbound >"$tmp/dump.json"

: >"$tmp/ours.jsonl"
for i in 1 2 3; do
    "$bin" "$remote" scale-local "$tmp/queries.json" "$ITERS_RUST" | tee -a "$tmp/ours.jsonl"
    echo "ours run $i done" >&2
done
python3 scripts/ovn-scale.py scan "$tmp/dump.json" "$tmp/queries.json" "$ITERS_PY" | tee "$tmp/neutron.json"

python3 - "$tmp/ours.jsonl" "$tmp/neutron.json" "$tmp/dump.json" "$profile" <<'PY'
import json, statistics, sys
ours = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
neu = json.load(open(sys.argv[2]))
dump = [json.loads(l) for l in open(sys.argv[3]) if l.strip()]
db = {t["caption"].split(" ")[0]: len(t["data"]) for t in dump}
med = lambda k: statistics.median(o[k] for o in ours)
us = med("us_per_lookup_median")
print(f"--- summary ({sys.argv[4]} build of examples/ovn_scale; medians of 3) ---")
print(f"DB rows: Port_Binding {db['Port_Binding']}, Datapath_Binding {db['Datapath_Binding']}")
print(f"replica rows: {ours[0]['replica_rows']}")
print(f"start-up to synced snapshot: {med('startup_ms'):.1f} ms (runs {[round(o['startup_ms'], 1) for o in ours]})")
print(f"RSS: {med('rss_kib_before')} KiB before connecting, {med('rss_kib_synced')} KiB synced")
print(f"ours: {us:.3f} us per lookup (per-process medians {[round(o['us_per_lookup_median'], 3) for o in ours]})")
print(f"Neutron's scan (Python): {neu['us_per_lookup_median']:.0f} us per lookup (runs {[round(x) for x in neu['us_per_lookup_runs']]})")
print(f"ratio: {neu['us_per_lookup_median'] / us:.0f}x")
PY
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
