#!/usr/bin/env bash
# Inject faults into the REAL neutron API peer (scripts/peers/neutron.sh), for
# issue 7's fault tests (tests/peers_faults.rs) and for trying an agent by hand.
#
#   scripts/peers/neutron-fault.sh pause    SIGSTOP gunicorn (master + workers):
#                                           connects still complete (the kernel
#                                           queues them) but nothing answers
#                                           until `resume`: a slow/hung Neutron
#   scripts/peers/neutron-fault.sh resume   SIGCONT; queued requests are answered late
#   scripts/peers/neutron-fault.sh fail     rename the `ports` table: every port
#                                           query takes Neutron's own error path
#                                           and answers 500 (NeutronError body)
#   scripts/peers/neutron-fault.sh heal     rename it back (no-op when not failed)
#   scripts/peers/neutron-fault.sh status
# Both undo commands are idempotent, so a test can call them from a cleanup
# path whatever state it left. Only the recorded gunicorn PID and its children
# are signalled.
set -euo pipefail
# shellcheck source=scripts/peers/lib.sh
. "$(dirname "$0")/lib.sh"

RUN=$PEERS_DIR/neutron
PIDFILE=$RUN/neutron-api.pid
DB=$RUN/neutron.db
AWAY=ports_metaproxy_fault

pids() {
  [ -f "$PIDFILE" ] || peers_die "neutron-api is not running (no $PIDFILE)"
  local master; master=$(cat "$PIDFILE")
  kill -0 "$master" 2>/dev/null || peers_die "neutron-api pid $master is gone"
  ps -o args= -p "$master" | grep -q gunicorn || peers_die "pid $master is not gunicorn"
  echo "$master"
  pgrep -P "$master" || true
}
signal() { # SIG: to the master and its workers
  local p
  for p in $(pids); do kill -"$1" "$p"; done
}

# rename FROM TO: ALTER TABLE if FROM exists; waits up to 10 s for Neutron's locks.
rename() {
  "$PEERS_PYTHON" - "$DB" "$1" "$2" <<'PY'
import sqlite3, sys
db, old, new = sys.argv[1:]
c = sqlite3.connect(db, timeout=10)
if c.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (old,)).fetchone():
    c.execute('ALTER TABLE "%s" RENAME TO "%s"' % (old, new))
    c.commit()
    print("renamed %s -> %s" % (old, new))
else:
    print("no table %s: nothing to do" % old)
PY
}

case ${1:-} in
  pause) signal STOP; peers_log "neutron-api paused (SIGSTOP to $(pids | xargs))" ;;
  resume) signal CONT; peers_log "neutron-api resumed" ;;
  fail) rename ports "$AWAY" ;;
  heal) rename "$AWAY" ports ;;
  status)
    state=$(ps -o stat= -p "$(cat "$PIDFILE")" | cut -c1)
    echo "neutron-api process state: $state (T = paused)"
    "$PEERS_PYTHON" -c "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); print('ports table:', 'renamed (failing)' if c.execute(\"SELECT 1 FROM sqlite_master WHERE name='$AWAY'\").fetchone() else 'present')" "$DB" ;;
  *) echo "usage: $0 pause|resume|fail|heal|status" >&2; exit 2 ;;
esac
