#!/usr/bin/env bash
# CPU flamegraph of one metaproxy process under a boot storm.
#
#   scripts/flamegraph.sh [proxy|agent|api|up] [storm.sh options...]
#   e.g. scripts/flamegraph.sh proxy --vms 2000 --ramp 5s
#
# Builds with the `profiling` cargo profile (release + debug info) and frame
# pointers (RUSTFLAGS=-Cforce-frame-pointers=yes, so `perf -g` can walk Rust
# stacks), runs scripts/storm.sh (three daemons, or `up` for role up) while
# `perf record -e cpu-clock -F 999 -g -p PID` samples the chosen process
# (cpu-clock: hardware events are not available on this VM), then folds the
# stacks with inferno and writes target/flamegraph-ROLE.svg (and the folded
# stacks, target/flamegraph-ROLE.folded); OUT=path.svg overrides.
# Installs linux-perf (apt) and inferno (cargo install, into ~/.cargo/bin)
# when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

ROLE=${1:-proxy}
case $ROLE in
  proxy|agent|api|up) shift || true ;;
  -*) ROLE=proxy ;;
  *) echo "usage: $0 [proxy|agent|api|up] [storm.sh options...]" >&2; exit 2 ;;
esac
OUT=${OUT:-$PWD/target/flamegraph-$ROLE.svg}
export PATH=$HOME/.cargo/bin:$PATH

if ! command -v perf >/dev/null; then
  echo "installing linux-perf" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends linux-perf
fi
if ! command -v inferno-flamegraph >/dev/null || ! command -v inferno-collapse-perf >/dev/null; then
  echo "installing inferno into ~/.cargo/bin" >&2
  cargo install --locked inferno
fi

WORK=$(mktemp -d /tmp/mp-flame.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

# Frame pointers for perf's default (fp) unwinder; the profiling profile has
# its own target dir, so this does not disturb the release build.
export RUSTFLAGS="${RUSTFLAGS:-} -Cforce-frame-pointers=yes"
up=()
[ "$ROLE" = up ] && up=(--up)
rc=0
scripts/storm.sh "${up[@]}" --cargo-profile profiling --perf "$ROLE:$WORK/perf.data" "$@" || rc=$?
[ -s "$WORK/perf.data" ] || { echo "flamegraph: no perf data (storm.sh exit $rc)" >&2; exit 1; }

perf script -i "$WORK/perf.data" 2>/dev/null | inferno-collapse-perf >"${OUT%.svg}.folded"
inferno-flamegraph --title "metaproxy $ROLE under a boot storm ($*)" \
  <"${OUT%.svg}.folded" >"$OUT"
# inferno weighs each stack by the cpu-clock period (ns), so the sum is CPU time.
cpu=$(awk '{s += $NF} END {printf "%.2f", s / 1e9}' "${OUT%.svg}.folded")
echo "flamegraph: $OUT ($cpu s of $ROLE CPU sampled; folded stacks in ${OUT%.svg}.folded)"
exit "$rc"
