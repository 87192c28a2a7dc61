# shellcheck shell=bash
# Sourced by the bench scripts: haproxy configured exactly as Neutron renders
# it for an L3 router (metadata-path.md §1.3), with three changes for a
# loopback bench: bind 127.0.0.1:PORT instead of :::9697, no user/group/daemon
# (run it with -db to keep it in the foreground), and no log lines (no syslog
# here; Neutron's `log /dev/log` would only add cost to haproxy).
#
#   neutron_haproxy_cfg OUT PORT AGENT_SOCKET ROUTER_ID PIDFILE
#     the L3 router's (qrouter-): stamps X-Neutron-Router-ID.
#   neutron_ovn_haproxy_cfg OUT BIND AGENT_SOCKET NETWORK_ID PIDFILE
#     the OVN metadata agent's (ovnmeta-, neutron/agent/ovn/metadata/driver.py):
#     binds BIND (169.254.169.254:80 in the namespace), adds X-OVN-Network-ID.

# The global and defaults sections both templates share (driver_base.py).
_neutron_haproxy_head() {
  cat >"$1" <<CFG
global
    maxconn     1024
    nbthread    2
    pidfile     $2

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
CFG
}

neutron_haproxy_cfg() {
  _neutron_haproxy_head "$1" "$5"
  cat >>"$1" <<CFG

listen listener
    bind 127.0.0.1:$2
    server metadata $3

    http-request del-header X-Neutron-Network-ID
    http-request set-header X-Neutron-Router-ID $4
CFG
}

neutron_ovn_haproxy_cfg() {
  _neutron_haproxy_head "$1" "$5"
  cat >>"$1" <<CFG

listen listener
    bind $2
    server metadata $3
    http-request add-header X-OVN-Network-ID $4
CFG
}
