#!/usr/bin/env bash
# A private MariaDB server for the peers' Nova 34 databases, as production
# runs them. scripts/peers/nova.sh starts it when NOVA_DB=mariadb (what
# scripts/test.sh does); nova-manage and nova-api-metadata then use it through
# PyMySQL, and `metaproxy api --source nova` reads the same databases.
#
#   scripts/peers/nova-mariadb.sh start    fresh datadir (mariadb-install-db),
#                                          mariadbd on
#                                          127.0.0.1:$MARIADB_PORT (13306) and
#                                          the socket $MARIADB_DIR/sock; empty
#                                          databases nova, nova_api, nova_cell0
#                                          and a user nova with a password that
#                                          needs percent-encoding in a URL;
#                                          writes $MARIADB_DIR/env (MARIADB_URL)
#   scripts/peers/nova-mariadb.sh stop     kill the recorded mariadbd PID only,
#                                          then delete its datadir
#   scripts/peers/nova-mariadb.sh status
#
# The server reads no /etc/mysql configuration (--no-defaults), listens on
# loopback only, and trades durability for speed (no fsync, no binlog): its
# data is thrown away by stop. The datadir is on tmpfs (/dev/shm) when there
# is one: on a disk shared with builds, Nova's DDL (about 300 CREATE TABLEs)
# waits for the disk even without fsync, 44 s instead of 19 s here.
# MARIADB_DATADIR overrides it. Logs, socket and PID stay in $MARIADB_DIR.
#
# Needs Debian's mariadb-server installed without starting its service, as
# scripts/test.sh does it:
#   printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
#   apt-get install -y --no-install-recommends mariadb-server; rm /usr/sbin/policy-rc.d
set -euo pipefail
# shellcheck source=scripts/peers/lib.sh
. "$(dirname "$0")/lib.sh"

RUN=$MARIADB_DIR
PIDFILE=$RUN/mariadbd.pid
if [ -z "${MARIADB_DATADIR:-}" ]; then
  if [ -d /dev/shm ] && [ -w /dev/shm ] && [ "$(stat -f -c %T /dev/shm)" = tmpfs ]; then
    MARIADB_DATADIR=/dev/shm/metaproxy-peers-mariadb.$MARIADB_PORT
  else
    MARIADB_DATADIR=$RUN/data
  fi
fi
# A password with URL-reserved characters: nova.conf carries it percent-encoded.
URL="mysql+pymysql://nova:p%40ss%3Aw0rd@127.0.0.1:$MARIADB_PORT"
# Throw-away data: no fsync, no binlog, a small redo log; Debian's defaults
# for the character set (its /etc/mysql is not read).
FAST=(--skip-log-bin --sync-frm=0 --innodb-flush-log-at-trx-commit=0 --innodb-flush-method=nosync
  --innodb-doublewrite=0 --innodb-log-file-size=32M --innodb-buffer-pool-size=128M
  --character-set-server=utf8mb4 --collation-server=utf8mb4_general_ci)

start() {
  command -v mariadbd >/dev/null || command -v /usr/sbin/mariadbd >/dev/null \
    || peers_die "mariadbd not installed (see the header of $0)"
  [ -f "$PIDFILE" ] && stop
  port_busy "$MARIADB_PORT" && peers_die "127.0.0.1:$MARIADB_PORT is already in use by another process"
  local t0=$SECONDS
  case $MARIADB_DATADIR in /|/dev/shm|/tmp|"") peers_die "refusing datadir '$MARIADB_DATADIR'" ;; esac
  rm -rf "$RUN" "$MARIADB_DATADIR"; mkdir -p "$RUN" "$MARIADB_DATADIR"
  chown mysql:mysql "$RUN" "$MARIADB_DATADIR"
  echo "$MARIADB_DATADIR" >"$RUN/datadir"
  mariadb-install-db --no-defaults --user=mysql --datadir="$MARIADB_DATADIR" \
    --auth-root-authentication-method=socket --skip-test-db "${FAST[@]}" \
    >"$RUN/install.log" 2>&1 || { tail -n 20 "$RUN/install.log" >&2; peers_die "mariadb-install-db failed; log $RUN/install.log"; }
  setsid /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$MARIADB_DATADIR" --socket="$RUN/sock" \
    --port="$MARIADB_PORT" --bind-address=127.0.0.1 --pid-file="$RUN/server.pid" \
    --log-error="$RUN/err.log" --skip-name-resolve "${FAST[@]}" \
    </dev/null >/dev/null 2>&1 &
  echo $! >"$PIDFILE"
  local pid; pid=$(cat "$PIDFILE")
  for _ in $(seq 1 120); do
    mariadb --no-defaults --socket="$RUN/sock" -uroot -e 'SELECT 1' >/dev/null 2>&1 && break
    kill -0 "$pid" 2>/dev/null || { tail -n 20 "$RUN/err.log" >&2; peers_die "mariadbd (pid $pid) exited; log $RUN/err.log"; }
    sleep 0.25
  done
  mariadb --no-defaults --socket="$RUN/sock" -uroot -e "
    CREATE DATABASE nova; CREATE DATABASE nova_api; CREATE DATABASE nova_cell0;
    CREATE USER 'nova'@'127.0.0.1' IDENTIFIED BY 'p@ss:w0rd';
    GRANT ALL ON nova.* TO 'nova'@'127.0.0.1'; GRANT ALL ON nova_api.* TO 'nova'@'127.0.0.1';
    GRANT ALL ON nova_cell0.* TO 'nova'@'127.0.0.1';" \
    || { stop; peers_die "mariadbd did not accept connections on $RUN/sock; log $RUN/err.log"; }
  printf '# written by scripts/peers/nova-mariadb.sh\nMARIADB_URL=%q\n' "$URL" >"$RUN/env"
  peers_log "mariadbd $(/usr/sbin/mariadbd --version | awk '{print $3}') ready in $((SECONDS - t0)) s: pid $pid, 127.0.0.1:$MARIADB_PORT, socket $RUN/sock, datadir $MARIADB_DATADIR"
}

# Kill exactly the recorded PID, if it still is a mariadbd, and wait for it.
stop() {
  [ -f "$PIDFILE" ] || { peers_log "mariadbd: not running (no $PIDFILE)"; return 0; }
  local pid; pid=$(cat "$PIDFILE")
  if kill -0 "$pid" 2>/dev/null && ! is_zombie "$pid" && ps -o args= -p "$pid" | grep -q mariadbd; then
    kill -TERM "$pid"
    for _ in $(seq 1 80); do { kill -0 "$pid" 2>/dev/null && ! is_zombie "$pid"; } || break; sleep 0.25; done
    if kill -0 "$pid" 2>/dev/null && ! is_zombie "$pid"; then
      peers_log "mariadbd: pid $pid ignored SIGTERM for 20 s, SIGKILL"; kill -KILL "$pid"
    fi
    peers_log "mariadbd: stopped pid $pid"
  else
    peers_log "mariadbd: pid $pid is not a running mariadbd: not touching it"
  fi
  rm -f "$PIDFILE" "$RUN/env"
  # The datadir this script made (recorded at start): tmpfs is memory.
  if [ -f "$RUN/datadir" ] && { ! kill -0 "$pid" 2>/dev/null || is_zombie "$pid"; }; then
    local d; d=$(cat "$RUN/datadir")
    case $d in /dev/shm/metaproxy-peers-mariadb.*|"$RUN"/data) rm -rf "$d" ;; esac
    rm -f "$RUN/datadir"
  fi
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  status)
    if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null && ! is_zombie "$(cat "$PIDFILE")"; then
      echo "mariadbd running, pid $(cat "$PIDFILE"), 127.0.0.1:$MARIADB_PORT"
    else echo "mariadbd not running"; exit 1; fi ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
