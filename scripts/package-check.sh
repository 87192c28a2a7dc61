#!/usr/bin/env bash
# The Debian package on this machine, end to end (issue 15, item 2):
#
#   1. build it (scripts/package.sh) and a second version of it, and run
#      lintian (any tag of warning level or above not in debian/lintian-overrides
#      fails);
#   2. install it (apt-get); check what it installed: the system user, the
#      state directory (0700 metaproxy), the conffile (root:metaproxy 0640), the
#      units (present, NOT enabled, NOT started), every Documentation= of the
#      units; `metaproxy proxy --config /etc/metaproxy/metaproxy.toml --check`
#      as the metaproxy user;
#   3. run the installed metaproxy-proxy.service as systemd would: its
#      ExecStartPre= and ExecStart= lines parsed from the installed unit, its
#      RuntimeDirectory=, User=/Group=, AmbientCapabilities=,
#      CapabilityBoundingSet=, NoNewPrivileges=, LimitNOFILE=, LimitMEMLOCK= and
#      UMask= applied with setpriv, prlimit and umask; serve one request from a
#      "VM" namespace through a qrouter- namespace the proxy discovered, to a
#      stand-in agent + api (the installed binary, on a temporary config and
#      inventory) on the shipped config's agent socket path; stop it (SIGTERM,
#      exit 0);
#   4. upgrade to the second version: a locally edited conffile and the state
#      directory's content survive, the units stay disabled;
#   5. purge: no file of `dpkg -L`, no state, runtime or config directory, no
#      unit, no unit state, no statoverride left (the metaproxy account stays,
#      as Debian does for system users).
#
#   scripts/package-check.sh
#
# Needs root (prints SKIPPED and exits 0 otherwise), dpkg/apt, ip, curl,
# setpriv and prlimit. Refuses (SKIPPED) to run where metaproxy is already
# installed or configured, or a Neutron agent socket exists: the check purges
# the package. Everything it starts is stopped by PID, also on failure.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '==> package-check: %s\n' "$*"; }
fail() { printf 'package-check: FAIL: %s\n' "$*" >&2; exit 1; }
skip() { printf 'SKIPPED package-check: %s\n' "$*"; exit 0; }

[ "$(id -u)" -eq 0 ] || skip "not root (installs a package, creates a system user and network namespaces; CI runs this as root)"
for tool in dpkg apt-get ip curl setpriv prlimit; do
  command -v "$tool" >/dev/null || skip "\`$tool\` not installed (a Debian machine with iproute2, curl and util-linux)"
done
if dpkg-query -W -f='${Status}' metaproxy 2>/dev/null | grep -q 'installed\|config-files'; then
  skip "package metaproxy is already on this machine (the check purges it: remove it first)"
fi
for p in /etc/metaproxy /var/lib/metaproxy /var/lib/neutron/metadata_proxy; do
  [ ! -e "$p" ] || skip "$p exists (the check would replace or delete it)"
done

if ! command -v lintian >/dev/null; then
  say "installing lintian"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends lintian >/dev/null \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends lintian >/dev/null; }
fi

T0=$(date +%s)
WORK=$(mktemp -d /tmp/metaproxy-package-check.XXXXXX)
chmod 0755 "$WORK"
PIDS=()
NAMESPACES=()
CREATED_NEUTRON_DIR=0
cleanup() {
  local rc=$?
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  for ns in "${NAMESPACES[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
  if [ "$CREATED_NEUTRON_DIR" = 1 ]; then rm -rf /var/lib/neutron; fi
  if [ "$rc" -ne 0 ]; then
    for f in "$WORK"/*.log; do [ -f "$f" ] && { echo "--- $f" >&2; tail -n 30 "$f" >&2; }; done
    dpkg --purge metaproxy >/dev/null 2>&1 || true
  fi
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT

# --- 1. build, lintian ------------------------------------------------------
say "building (scripts/package.sh)"
# Each into its own directory: cargo-deb clears target/debian of older
# packages of the same name when it writes one.
DEB=$(scripts/package.sh --output "$WORK/v1/" | tail -n 1)
VERSION=$(dpkg-deb -f "$DEB" Version)
# The upgrade target: the same tree with a version suffix, as a newer build
# would be (cargo-deb --deb-version; the binary is not rebuilt).
DEB2=$(scripts/package.sh --fast --deb-version "${VERSION}+check1" --output "$WORK/v2/" | tail -n 1)
[ "$(dpkg-deb -f "$DEB2" Version)" = "${VERSION}+check1" ] || fail "second package has version $(dpkg-deb -f "$DEB2" Version)"
say "lintian $DEB"
lintian --fail-on warning,error "$DEB" \
  || fail "lintian: fix the tag or justify it in debian/lintian-overrides"

# Without systemd running here (CI containers) the units' start/restart logic
# of the maintainer scripts cannot run: check what it would do. On upgrade
# only try-restart (units that were running), never start; stop on remove.
dpkg-deb -e "$DEB" "$WORK/control"
grep -q '^[[:space:]]*deb-systemd-invoke try-restart metaproxy-' "$WORK/control/postinst" \
  || fail "postinst does not try-restart the units on upgrade"
! grep -Eq 'deb-systemd-invoke (start|restart) |_dh_action=start' "$WORK/control/postinst" \
  || fail "postinst starts units (enabling them is checked after the install below)"
grep -q 'deb-systemd-invoke stop metaproxy-' "$WORK/control/prerm" || fail "prerm does not stop the units on removal"

# --- 2. install, check what is installed ------------------------------------
UNITS=(metaproxy-agent metaproxy-api metaproxy-ovn metaproxy-proxy metaproxy-qrouter-rules metaproxy-up)
units_disabled() {
  local u
  for u in "${UNITS[@]}"; do
    [ -f "/usr/lib/systemd/system/$u.service" ] || fail "$u.service not installed"
    if compgen -G "/etc/systemd/system/*.wants/$u.service" >/dev/null; then
      fail "$u.service is enabled after $1 (the units must ship disabled)"
    fi
    if [ -d /run/systemd/system ]; then
      ! systemctl -q is-active "$u.service" || fail "$u.service was started by $1"
    fi
  done
}

say "installing $DEB"
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$DEB" >"$WORK/apt-install.log" 2>&1 \
  || fail "apt-get install $DEB: $(tail -n 5 "$WORK/apt-install.log")"
[ "$(dpkg-query -W -f='${Version}' metaproxy)" = "$VERSION" ] || fail "installed version is not $VERSION"

getent passwd metaproxy >/dev/null || fail "no metaproxy user after install"
METAPROXY_UID=$(id -u metaproxy)
[ "$METAPROXY_UID" -lt 1000 ] || fail "metaproxy is not a system user (uid $METAPROXY_UID)"
[ "$(getent passwd metaproxy | cut -d: -f7)" = /usr/sbin/nologin ] || fail "metaproxy has a login shell"
[ "$(stat -c '%a %U' /var/lib/metaproxy)" = "700 metaproxy" ] \
  || fail "/var/lib/metaproxy is $(stat -c '%a %U:%G' /var/lib/metaproxy), want 700 metaproxy"
CONF=/etc/metaproxy/metaproxy.toml
[ "$(stat -c '%a %U %G' "$CONF")" = "640 root metaproxy" ] \
  || fail "$CONF is $(stat -c '%a %U:%G' "$CONF"), want 640 root:metaproxy"
dpkg-query -W -f='${Conffiles}\n' metaproxy | grep -q " $CONF " || fail "$CONF is not a conffile"
cmp -s "$CONF" deploy/network-node.toml || fail "$CONF differs from deploy/network-node.toml"
[ -x /usr/libexec/metaproxy/qrouter-metadata-rules.sh ] || fail "qrouter-metadata-rules.sh not installed where its unit runs it"
for f in /usr/share/doc/metaproxy/copyright /usr/share/doc/metaproxy/changelog.Debian.gz /usr/share/man/man1/metaproxy.1.gz; do
  [ -f "$f" ] || fail "$f missing"
done
units_disabled install
changelog_version=$(zcat /usr/share/doc/metaproxy/changelog.Debian.gz | sed -n '1s/^metaproxy (\([^)]*\)).*/\1/p')
[ "$changelog_version" = "$VERSION" ] \
  || fail "debian/changelog's last entry is ${changelog_version:-unreadable}, the package $VERSION: add an entry"
# Every Documentation=file:// of every unit, and every absolute program it runs.
for u in "${UNITS[@]}"; do
  f=/usr/lib/systemd/system/$u.service
  # shellcheck disable=SC2013 # words: Documentation= holds a blank-separated list
  for doc in $(sed -n 's|^Documentation=file://||p' "$f"); do
    [ -f "$doc" ] || fail "$u.service: Documentation=file://$doc is not installed"
  done
  # shellcheck disable=SC2013 # one program per Exec line, the first word
  for prog in $(sed -n 's/^Exec[A-Za-z]*=[-+@:!]*\(\/[^ ]*\).*/\1/p' "$f"); do
    [ -x "$prog" ] || fail "$u.service runs $prog, which is not installed"
  done
done
# The installed units as systemd reads them: unknown keys, programs that are
# not where ExecStart= looks (any message fails).
if command -v systemd-analyze >/dev/null; then
  unit_files=()
  for u in "${UNITS[@]}"; do unit_files+=("/usr/lib/systemd/system/$u.service"); done
  out=$(systemd-analyze verify "${unit_files[@]}" 2>&1) || fail "systemd-analyze verify: $out"
  [ -z "$out" ] || fail "systemd-analyze verify: $out"
fi
# The shipped config validates, read as the daemons read it (user metaproxy).
setpriv --reuid metaproxy --regid metaproxy --init-groups -- \
  /usr/bin/metaproxy proxy --config "$CONF" --check >"$WORK/check.log" 2>&1 \
  || fail "metaproxy proxy --config $CONF --check: $(cat "$WORK/check.log")"
say "installed: user metaproxy (uid $METAPROXY_UID), $CONF 0640 root:metaproxy, /var/lib/metaproxy 0700, units disabled, proxy --check OK"

# --- 3. the installed proxy unit, serving one request -----------------------
UNIT=/usr/lib/systemd/system/metaproxy-proxy.service
# The last value of KEY= in the unit (systemd: later assignments win; an
# empty one resets; the unit has no drop-ins here).
unit_get() { sed -n "s/^$1=//p" "$UNIT" | tail -n 1; }
# CAP_SYS_ADMIN CAP_NET_BIND_SERVICE -> +sys_admin,+net_bind_service
caps_arg() { local c out=""; for c in $1; do c=${c#CAP_}; out+="${out:+,}+${c,,}"; done; printf '%s' "$out"; }

USER_=$(unit_get User)
GROUP_=$(unit_get Group)
AMBIENT=$(unit_get AmbientCapabilities)
BOUNDING=$(unit_get CapabilityBoundingSet)
NNP=$(unit_get NoNewPrivileges)
NOFILE=$(unit_get LimitNOFILE)
MEMLOCK=$(unit_get LimitMEMLOCK)
UMASK=$(unit_get UMask)
RUNTIME_DIR=$(unit_get RuntimeDirectory)
RUNTIME_MODE=$(unit_get RuntimeDirectoryMode)
EXEC_START=$(unit_get ExecStart)
if [ -z "$USER_" ] || [ -z "$EXEC_START" ] || [ -z "$AMBIENT" ]; then
  fail "$UNIT: no User=, ExecStart= or AmbientCapabilities="
fi
[ "$AMBIENT" = "$BOUNDING" ] || fail "$UNIT: AmbientCapabilities= ($AMBIENT) and CapabilityBoundingSet= ($BOUNDING) differ; teach this script the difference"
[ "$MEMLOCK" = infinity ] && MEMLOCK=unlimited
# systemd (PID 1, all capabilities) sets these; root without CAP_SYS_RESOURCE
# (some containers) cannot raise a hard limit: use the hard limit, say so.
if ! prlimit --nofile="$NOFILE" -- true 2>/dev/null; then
  echo "package-check: note: LimitNOFILE=$NOFILE is above this machine's hard limit and CAP_SYS_RESOURCE is missing: using $(ulimit -Hn)"
  NOFILE=$(ulimit -Hn)
fi
if ! prlimit --memlock="$MEMLOCK" -- true 2>/dev/null; then
  MEMLOCK=$(prlimit --pid $$ --memlock --output HARD --noheadings | tr -d ' ')
  echo "package-check: note: LimitMEMLOCK= cannot be raised here: using the hard limit, $MEMLOCK bytes"
fi

# The neighbours the shipped config expects: the agent on
# proxy.agent_socket (/var/lib/neutron/metadata_proxy, where
# neutron-metadata-agent would be) and namespaces under /run/netns.
AGENT_SOCKET=$(sed -n 's/^agent_socket = "\(.*\)"/\1/p' "$CONF")
[ "$AGENT_SOCKET" = /var/lib/neutron/metadata_proxy ] || fail "unexpected proxy.agent_socket $AGENT_SOCKET in $CONF"
if [ ! -d /var/lib/neutron ]; then
  install -d -m 0755 /var/lib/neutron
  CREATED_NEUTRON_DIR=1
fi

# One router, one VM behind it (tests/common/netns.rs's layout, smaller).
TAG=$(printf '%08x' $$)
ROUTER_ID="0c0ec000-0000-4000-8000-0000${TAG}"
NET_ID="0c0ea000-0000-4000-8000-0000${TAG}"
VM_UUID="0c0e0001-0000-4000-8000-0000${TAG}"
PROJECT="0c0e0000000040008000${TAG}0000"
RNS="qrouter-$ROUTER_ID"
VNS="mppkg-$$-vm1"
for ns in "$RNS" "$VNS"; do
  NAMESPACES+=("$ns")
  ip netns add "$ns"
  ip -n "$ns" link set lo up
done
ip -n "$RNS" link add qr-vm1 type veth peer name eth0 netns "$VNS"
ip -n "$RNS" addr add 10.97.0.1/24 dev qr-vm1
ip -n "$RNS" link set qr-vm1 up
ip -n "$VNS" addr add 10.97.0.11/24 dev eth0
ip -n "$VNS" link set eth0 up
ip -n "$VNS" route add default via 10.97.0.1

cat >"$WORK/inventory.toml" <<EOF
[[network]]
id = "$NET_ID"
name = "package-check"
project = "$PROJECT"
[[network.subnet]]
id = "${NET_ID/a000/b000}"
cidr = "10.97.0.0/24"
gateway = "10.97.0.1"

[[router]]
id = "$ROUTER_ID"
networks = ["$NET_ID"]

[[instance]]
uuid = "$VM_UUID"
name = "package-check-vm1"
hostname = "package-check-vm1"
project = "$PROJECT"

[[instance.port]]
id = "${VM_UUID/0001-0000/0001-0e00}"
network = "$NET_ID"
mac = "fa:16:3e:0c:0e:01"
fixed_ips = ["10.97.0.11"]
EOF
API_PORT=$((20000 + $$ % 20000))
SECRET="package-check-$$-$RANDOM"
cat >"$WORK/standin.toml" <<EOF
# Stand-ins for neutron-metadata-agent and Nova's metadata API.
[api]
listen = "127.0.0.1:$API_PORT"
metadata_proxy_shared_secret = "$SECRET"
inventory = "$WORK/inventory.toml"
state_dir = "$WORK/api-state"

[agent]
socket = "$AGENT_SOCKET"
socket_mode = "all"
inventory = "$WORK/inventory.toml"
metadata_proxy_shared_secret = "$SECRET"
[agent.nova]
nova_metadata_host = "127.0.0.1"
nova_metadata_port = $API_PORT
EOF
/usr/bin/metaproxy api --config "$WORK/standin.toml" >"$WORK/api.log" 2>&1 &
API_PID=$!
PIDS+=("$API_PID")
/usr/bin/metaproxy agent --config "$WORK/standin.toml" >"$WORK/agent.log" 2>&1 &
AGENT_PID=$!
PIDS+=("$AGENT_PID")
for _ in $(seq 100); do [ -S "$AGENT_SOCKET" ] && break; sleep 0.1; done
[ -S "$AGENT_SOCKET" ] || fail "stand-in agent did not create $AGENT_SOCKET"

# What systemd does before ExecStart=: RuntimeDirectory=, then ExecStartPre=
# ("+": as root, outside the sandbox; otherwise as User=).
if [ -n "$RUNTIME_DIR" ]; then
  install -d -m "${RUNTIME_MODE:-0755}" -o "$USER_" -g "${GROUP_:-$USER_}" "/run/$RUNTIME_DIR"
fi
SETPRIV=(setpriv --reuid "$USER_" --regid "${GROUP_:-$USER_}" --init-groups
  --inh-caps "$(caps_arg "$AMBIENT")" --ambient-caps "$(caps_arg "$AMBIENT")"
  --bounding-set "-all,$(caps_arg "$BOUNDING")")
[ "$NNP" = yes ] && SETPRIV+=(--no-new-privs)
while IFS= read -r pre; do
  case $pre in
    +*) sh -c "${pre#+}" ;;
    *) "${SETPRIV[@]}" -- sh -c "${pre#[-@:!]}" ;;
  esac
done < <(sed -n 's/^ExecStartPre=//p' "$UNIT")

say "starting the unit's ExecStart as $USER_ (caps $AMBIENT, nofile $NOFILE): $EXEC_START"
# shellcheck disable=SC2086 # ExecStart= is split on blanks, as systemd splits it (no quotes in it)
(umask "${UMASK:-0022}"; exec prlimit --nofile="$NOFILE" --memlock="$MEMLOCK" -- "${SETPRIV[@]}" -- ${EXEC_START#[-@:+!]}) \
  >"$WORK/proxy.log" 2>&1 &
PROXY_PID=$!
PIDS+=("$PROXY_PID")

# Discovery binds [::]:9697 in the new qrouter- namespace within about a second.
URL=http://10.97.0.1:9697/openstack/latest/meta_data.json
BODY=""
for _ in $(seq 150); do
  kill -0 "$PROXY_PID" 2>/dev/null || fail "the installed proxy exited: $(tail -n 5 "$WORK/proxy.log")"
  BODY=$(ip netns exec "$VNS" curl -s -f -m 2 "$URL" 2>/dev/null) && break
  BODY=""
  sleep 0.2
done
[ -n "$BODY" ] || fail "no answer from $URL in the VM namespace"
case $BODY in *"\"uuid\": \"$VM_UUID\""*|*"\"uuid\":\"$VM_UUID\""*) ;; *) fail "answer is not VM $VM_UUID's metadata: $BODY" ;; esac
# It is the unit's process that answered: user, capabilities.
[ "$(ps -o user= -p "$PROXY_PID" | tr -d ' ')" = "$USER_" ] || fail "proxy does not run as $USER_"
want_caps=$(setpriv --reuid "$USER_" --regid "${GROUP_:-$USER_}" --init-groups \
  --inh-caps "$(caps_arg "$AMBIENT")" --ambient-caps "$(caps_arg "$AMBIENT")" -- sh -c 'grep CapAmb /proc/self/status')
[ "$(grep CapAmb "/proc/$PROXY_PID/status")" = "$want_caps" ] || fail "proxy ambient capabilities are not the unit's"
grep -q "listener up: $RNS" "$WORK/proxy.log" || fail "proxy log has no 'listener up: $RNS'"
say "served $VM_UUID's meta_data.json through $RNS (proxy pid $PROXY_PID as $USER_)"

kill -TERM "$PROXY_PID"
status=0
wait "$PROXY_PID" || status=$?
[ "$status" -eq 0 ] || fail "proxy exited $status on SIGTERM"
for pid in "$AGENT_PID" "$API_PID"; do kill -TERM "$pid"; wait "$pid" || true; done
PIDS=()

# --- 4. upgrade --------------------------------------------------------------
echo "# package-check: a local edit" >>"$CONF"
echo kept >/var/lib/metaproxy/package-check
say "upgrading to $(dpkg-deb -f "$DEB2" Version)"
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$DEB2" >"$WORK/apt-upgrade.log" 2>&1 \
  || fail "upgrade: $(tail -n 5 "$WORK/apt-upgrade.log")"
[ "$(dpkg-query -W -f='${Version}' metaproxy)" = "${VERSION}+check1" ] || fail "upgrade did not install ${VERSION}+check1"
tail -n 1 "$CONF" | grep -q '^# package-check: a local edit$' || fail "upgrade overwrote the edited $CONF"
[ "$(cat /var/lib/metaproxy/package-check)" = kept ] || fail "upgrade lost /var/lib/metaproxy's content"
[ "$(id -u metaproxy)" = "$METAPROXY_UID" ] || fail "upgrade changed the metaproxy uid"
[ "$(stat -c '%a %U %G' "$CONF")" = "640 root metaproxy" ] || fail "upgrade changed $CONF's mode or owner"
units_disabled upgrade

# --- 5. purge ----------------------------------------------------------------
dpkg -L metaproxy >"$WORK/files"
say "purging ($(wc -l <"$WORK/files") paths in dpkg -L)"
dpkg --purge metaproxy >"$WORK/purge.log" 2>&1 || fail "dpkg --purge: $(cat "$WORK/purge.log")"
! dpkg-query -W -f='${Status}' metaproxy 2>/dev/null | grep -q 'installed\|config-files' || fail "package still known to dpkg after purge"
while IFS= read -r f; do
  [ -d "$f" ] && continue # shared directories (/usr/bin ...) stay; ours are checked below
  [ ! -e "$f" ] || fail "$f left after purge"
done <"$WORK/files"
for d in /etc/metaproxy /var/lib/metaproxy /run/metaproxy /usr/share/doc/metaproxy /usr/libexec/metaproxy; do
  [ ! -e "$d" ] || fail "$d left after purge"
done
for u in "${UNITS[@]}"; do
  ! compgen -G "/etc/systemd/system/*/$u.service" >/dev/null || fail "$u.service symlinks left after purge"
  [ -z "$(find /var/lib/systemd/deb-systemd-helper-* -name "$u.service*" 2>/dev/null)" ] \
    || fail "$u.service state (deb-systemd-helper) left after purge"
  [ ! -e "/etc/systemd/system/$u.service" ] || fail "$u.service mask left after purge"
done
! dpkg-statoverride --list "$CONF" >/dev/null || fail "statoverride for $CONF left after purge"

say "OK in $(($(date +%s) - T0)) s: lintian clean, install, serve as the unit, upgrade, purge (user metaproxy kept, as Debian does)"
