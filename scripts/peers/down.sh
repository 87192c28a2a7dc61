#!/usr/bin/env bash
# Stop the peers started by up.sh (nova, then neutron), each by the PID it
# recorded; remove the fixture and env file, which describe DBs that no
# longer run.  Safe to run when nothing is running.
#   scripts/peers/down.sh           stop; keep venvs (next up.sh skips pip)
#   scripts/peers/down.sh --purge   also delete $PEERS_DIR (venvs, DBs, logs)
set -euo pipefail
# shellcheck source=scripts/peers/lib.sh
. "$(dirname "$0")/lib.sh"

"$PEERS_HERE/nova.sh" stop
"$PEERS_HERE/neutron.sh" stop
rm -f "$PEERS_FIXTURE" "$PEERS_DIR/env"
if [ "${1:-}" = --purge ]; then
  case $PEERS_DIR in /|"") peers_die "refusing to purge '$PEERS_DIR'" ;; esac
  rm -rf "$PEERS_DIR"
  peers_log "purged $PEERS_DIR"
fi
