# shellcheck shell=bash
# Sourced by the bench scripts: haproxy configured exactly as Neutron renders
# it for an L3 router (metadata-path.md §1.3), with three changes for a
# loopback bench: bind 127.0.0.1:PORT instead of :::9697, no user/group/daemon
# (run it with -db to keep it in the foreground), and no log lines (no syslog
# here; Neutron's `log /dev/log` would only add cost to haproxy).
#
#   neutron_haproxy_cfg OUT PORT AGENT_SOCKET ROUTER_ID PIDFILE
neutron_haproxy_cfg() {
  cat >"$1" <<CFG
global
    maxconn     1024
    nbthread    2
    pidfile     $5

defaults
    mode http
    option http-server-close
    option forwardfor
    retries                 3
    timeout http-request    30s
    timeout connect         30s
    timeout client          32s
    timeout server          32s
    timeout http-keep-alive 30s

listen listener
    bind 127.0.0.1:$2
    server metadata $3

    http-request del-header X-Neutron-Network-ID
    http-request set-header X-Neutron-Router-ID $4
CFG
}
