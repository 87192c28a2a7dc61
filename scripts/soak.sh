#!/usr/bin/env bash
# Long soak (issue 7): steady load against `metaproxy up` (api + agent +
# proxy in one process) while its RSS and fd count are sampled every second;
# both must be flat after a warm-up. The CI-sized version is
# tests/limits_soak.rs.
#
#   scripts/soak.sh [minutes=60] [vms=200]
#   LOG_LEVEL=debug              the daemons' log level (default warn)
#   SPLIT=1 scripts/soak.sh ...   api, agent and proxy as three processes,
#                                 each sampled (which one grows?)
#
# Load: back-to-back `metaproxy storm --profile keepalive` runs (each VM
# from its own 127.16/12 source), alternating with cloud-init runs
# (connection per request, the full crawl), plus a trickle of half-sent
# heads that the proxy closes at http_request. Samples go to
# $SOAK_CSV (default /tmp/soak-<pid>.csv; with SPLIT=1 one file per
# process, suffixed .api/.agent/.proxy): seconds, RSS KiB, fds.
# Exit status 0 when the end is within the slack of the post-warm-up start.
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES=${1:-60}
VMS=${2:-200}
RSS_SLACK_KIB=${RSS_SLACK_KIB:-4096}
FD_SLACK=${FD_SLACK:-16}
WORK=$(mktemp -d /tmp/mp-soak.XXXXXX)
CSV=${SOAK_CSV:-/tmp/soak-$$.csv}
PIDS=()
KEEP=0 # set when a storm fails: the daemons' logs and the storm output stay in $WORK
# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true
  if [ "$KEEP" = 1 ]; then echo "logs kept in $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

cargo build --release --quiet --bin metaproxy
BIN=target/release/metaproxy
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PROXY_PORT=$(free_port); API_PORT=$(free_port)
ROUTER=5707ae75-0000-4000-8002-000000000000 # `inventory synth` router 0
"$BIN" inventory synth --vms "$VMS" --networks 4 --routers 1 --out "$WORK/inventory.toml"
cat >"$WORK/up.toml" <<TOML
[api]
listen = "127.0.0.1:$API_PORT"
metadata_proxy_shared_secret = "soak-secret"
inventory = "$WORK/inventory.toml"
state_dir = "$WORK/state"

[agent]
socket = "$WORK/agent.sock"
inventory = "$WORK/inventory.toml"
metadata_proxy_shared_secret = "soak-secret"
[agent.nova]
nova_metadata_port = $API_PORT

[proxy]
agent_socket = "$WORK/agent.sock"
control_socket = "$WORK/ctl.sock"
[proxy.timeouts]
http_request = "2s"
keep_alive = "5s"
[[proxy.namespace]]
router_id = "$ROUTER"
listen = "127.0.0.1:$PROXY_PORT"
TOML
NAMES=(); PROCPIDS=(); FILES=()
if [ "${SPLIT:-0}" = 1 ]; then
  for c in api agent proxy; do
    "$BIN" --log-level "${LOG_LEVEL:-warn}" $c --config "$WORK/up.toml" 2>"$WORK/$c.log" & PIDS+=($!)
    NAMES+=("$c"); PROCPIDS+=($!); FILES+=("$CSV.$c")
    sleep 0.5
  done
else
  "$BIN" --log-level "${LOG_LEVEL:-warn}" up --config "$WORK/up.toml" 2>"$WORK/up.log" & PIDS+=($!)
  NAMES+=(up); PROCPIDS+=($!); FILES+=("$CSV")
fi
UP=${PROCPIDS[-1]} # the proxy (or up): the load runs while it lives
for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$PROXY_PORT/" && break; sleep 0.1; done

sample() { # seconds rss fds per process, every second, until killed
  local t0=$SECONDS i
  while kill -0 "$UP" 2>/dev/null; do
    for i in "${!PROCPIDS[@]}"; do
      echo "$((SECONDS - t0)) $(awk '/VmRSS/ {print $2}' "/proc/${PROCPIDS[$i]}/status") $(find "/proc/${PROCPIDS[$i]}/fd" -mindepth 1 -maxdepth 1 | wc -l)" >>"${FILES[$i]}"
    done
    sleep 1
  done
}
for f in "${FILES[@]}"; do : >"$f"; done
sample & PIDS+=($!)

stalls() { # a half-sent head every 200 ms, left to http_request
  while kill -0 "$UP" 2>/dev/null; do
    python3 - "$PROXY_PORT" 2>/dev/null <<'PY' &
import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.sendall(b"GET /stalled HTTP/1.1\r\nHo")
time.sleep(3)
PY
    sleep 0.2
  done
}
stalls & PIDS+=($!); STALLS=$!

echo "soak: $MINUTES min, $VMS VMs per storm, ${NAMES[*]} pids ${PROCPIDS[*]}, samples in ${FILES[*]}; load $(cut -d' ' -f1-3 /proc/loadavg)"
END=$((SECONDS + MINUTES * 60)); RUNS=0; FAILED=0; PROFILES=(keepalive keepalive cloud-init)
while [ $SECONDS -lt $END ]; do
  P=${PROFILES[$((RUNS % 3))]}
  if ! "$BIN" --log-level warn storm --target "127.0.0.1:$PROXY_PORT" --inventory "$WORK/inventory.toml" \
      --vms "$VMS" --profile "$P" --ramp 1s --workers 1 >"$WORK/storm.out" 2>&1; then
    FAILED=$((FAILED + 1)); KEEP=1; echo "storm run $RUNS ($P) failed at $((SECONDS))s:"; tail -5 "$WORK/storm.out"
    cp "$WORK/storm.out" "$WORK/storm-failed-$RUNS.out"
  fi
  RUNS=$((RUNS + 1))
  sleep "${PAUSE:-0.2}"
done
LOAD_END=$(tail -1 "${FILES[0]}" | cut -d' ' -f1)
kill "$STALLS" 2>/dev/null || true
sleep 8 # keep-alive (5 s) and stalled (2 s) connections time out: the quiesced sample
for p in "${PROCPIDS[@]}"; do kill -0 "$p" || { echo "FAIL: pid $p died"; cat "$WORK"/*.log; exit 1; }; done
echo "storm runs: $RUNS ($FAILED failed); load $(cut -d' ' -f1-3 /proc/loadavg)"
# Warm-up: 10 % of the run, at least 15 s, at most 60 s.
WARM=$(( MINUTES * 6 < 15 ? 15 : (MINUTES * 6 > 60 ? 60 : MINUTES * 6) ))
analyze() { # name file
awk -v name="$1" -v warm="$WARM" -v lend="$LOAD_END" -v rs="$RSS_SLACK_KIB" -v fs="$FD_SLACK" -v failed="$FAILED" '
  NR == 1 { fidle = $3; ridle = $2 }
  $1 >= warm && !start { start = 1; r0 = $2; f0 = $3 }
  $1 <= lend { n++; r[n] = $2; f[n] = $3; if ($2 > rmax) rmax = $2 }
  { rq = $2; fq = $3; tq = $1 }
  END {
    # The end under load: the lowest of its last 5 samples (the load is cyclic).
    re = r[n]; fe = f[n]
    for (i = n - 4; i <= n; i++) if (i > 0) { if (r[i] < re) re = r[i]; if (f[i] < fe) fe = f[i] }
    printf "%s under load: RSS %d KiB at %d s (after warm-up) -> %d KiB at %d s (max %d); fds %d -> %d\n", name, r0, warm, re, lend, rmax, f0, fe
    printf "%s quiesced at %d s: RSS %d KiB, fds %d (before any load: %d KiB, %d fds)\n", name, tq, rq, fq, ridle, fidle
    ok = (re <= r0 + rs) && (fe <= f0 + fs) && failed == 0
    print (ok ? name ": PASS: flat" : name ": FAIL: grew (or storms failed)")
    exit !ok
  }' "$2"
}
STATUS=0
for i in "${!NAMES[@]}"; do analyze "${NAMES[$i]}" "${FILES[$i]}" || STATUS=1; done
exit $STATUS
