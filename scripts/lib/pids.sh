# shellcheck shell=bash
# Sourced by the storm scripts: processes they started, stopped by PID.
#
#   PIDS+=("$!")   after starting one in the background
#   stop_pids      TERM each started process (newest first), KILL after 10 s,
#                  reap it, and empty PIDS
PIDS=()
stop_pids() {
  local i p
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    p=${PIDS[i]}
    kill -TERM "$p" 2>/dev/null || continue
    for _ in $(seq 1 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  PIDS=()
}
