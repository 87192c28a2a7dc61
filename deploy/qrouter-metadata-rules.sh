#!/usr/bin/env bash
# Install, in every qrouter-<uuid> namespace, the two iptables rules Neutron's
# L3 agent stops installing once enable_metadata_proxy = False, so VMs reach
# metaproxy's [::]:9697 listener through 169.254.169.254:80 again
# (docs/migrating-from-neutron.md, cut-over step 2):
#
#   nat    PREROUTING  -d 169.254.169.254/32 -i qr-+ -p tcp --dport 80 -j REDIRECT --to-ports 9697
#   filter INPUT       -p tcp --dport 9697 -m mark ! --mark 0x1/0xffff -j DROP
#
# plus the same for fe80::a9fe:a9fe/128 with ip6tables when the namespace has
# IPv6. The mark is the one the L3 agent's mangle rule still sets
# (metadata_access_mark, default 0x1, mask 0xffff). Idempotent: each rule is
# checked with -C before it is added. The L3 agent's iptables manager keeps
# rules it did not write, so they survive its resyncs.
#
#   qrouter-metadata-rules.sh            # every qrouter- namespace, once
#   qrouter-metadata-rules.sh --remove   # delete the rules again (roll back)
#   qrouter-metadata-rules.sh --watch    # repeat every $INTERVAL s (default 2)
#
# Environment: PREFIX (qrouter-), PORT (9697), MARK (0x1), INTERVAL (2).
# Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN for ip netns exec).
set -euo pipefail

PREFIX=${PREFIX:-qrouter-}
PORT=${PORT:-9697}
MARK=${MARK:-0x1}
INTERVAL=${INTERVAL:-2}
MODE=add
case "${1:-}" in
  "") ;;
  --remove) MODE=remove ;;
  --watch) MODE=watch ;;
  *) echo "usage: $0 [--remove|--watch]" >&2; exit 2 ;;
esac

# rule <netns> <iptables|ip6tables> <table> <chain> <rule...>
rule() {
  local ns=$1 ipt=$2 table=$3 chain=$4
  shift 4
  if ip netns exec "$ns" "$ipt" -w -t "$table" -C "$chain" "$@" 2>/dev/null; then
    if [ "$MODE" = remove ]; then
      ip netns exec "$ns" "$ipt" -w -t "$table" -D "$chain" "$@"
    fi
  elif [ "$MODE" != remove ]; then
    ip netns exec "$ns" "$ipt" -w -t "$table" -I "$chain" "$@"
    echo "$ns: $ipt -t $table -I $chain $*"
  fi
}

one_pass() {
  local ns
  for ns in $(ip netns list | awk -v p="$PREFIX" 'index($1, p) == 1 {print $1}'); do
    rule "$ns" iptables nat PREROUTING -d 169.254.169.254/32 -i qr-+ -p tcp -m tcp --dport 80 \
      -j REDIRECT --to-ports "$PORT" || continue
    rule "$ns" iptables filter INPUT -p tcp -m tcp --dport "$PORT" \
      -m mark ! --mark "$MARK/0xffff" -j DROP || continue
    if [ "$(ip netns exec "$ns" cat /proc/sys/net/ipv6/conf/all/disable_ipv6 2>/dev/null || echo 1)" = 0 ]; then
      rule "$ns" ip6tables nat PREROUTING -d fe80::a9fe:a9fe/128 -i qr-+ -p tcp -m tcp --dport 80 \
        -j REDIRECT --to-ports "$PORT" || continue
      rule "$ns" ip6tables filter INPUT -p tcp -m tcp --dport "$PORT" \
        -m mark ! --mark "$MARK/0xffff" -j DROP || continue
    fi
  done
}

if [ "$MODE" = watch ]; then
  MODE=add
  while true; do
    # A namespace deleted mid-pass makes its commands fail; the next pass is clean.
    one_pass || true
    sleep "$INTERVAL"
  done
else
  one_pass
fi
