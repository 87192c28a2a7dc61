#!/usr/bin/env bash
# Run every fuzz target (fuzz/fuzz_targets) for a bounded time with libFuzzer.
#   scripts/fuzz.sh [seconds-per-target=30] [target ...]
# Builds with coverage instrumentation on the stable toolchain (no ASAN: the
# targets are safe Rust; panics and failed invariants are what we hunt).
# Seeds are checked in under fuzz/seeds/<target>; the growing corpus lives in
# fuzz/corpus/<target> and crashes in fuzz/artifacts/<target>/ (both ignored
# by git). Exit status is non-zero if any target finds a crash.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
SECS=${1:-30}
shift || true
TARGETS=("$@")
[ ${#TARGETS[@]} -eq 0 ] && TARGETS=(request_rewrite response_framing chunked imdsv2_token inventory_loader agent_identity agent_request ovsdb_decoder)
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table -Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
export CARGO_TARGET_DIR=${FUZZ_TARGET_DIR:-target}
# An explicit --target keeps RUSTFLAGS off build scripts and proc macros.
HOST=$(rustc -vV | sed -n 's/^host: //p')
cargo build --release --quiet --bins --target "$HOST"
BIN="$CARGO_TARGET_DIR/$HOST/release"
status=0
for t in "${TARGETS[@]}"; do
  mkdir -p "corpus/$t" "artifacts/$t"
  echo "==> fuzz $t for ${SECS}s"
  if ! "$BIN/$t" -max_total_time="$SECS" -print_final_stats=1 -artifact_prefix="artifacts/$t/" \
      "corpus/$t" "seeds/$t" 2>"artifacts/$t/last.log"; then
    echo "CRASH in $t: see fuzz/artifacts/$t/ (reproduce: fuzz/$BIN/$t <file>)"
    tail -30 "artifacts/$t/last.log"
    status=1
  fi
  grep -E "stat::number_of_executed_units|stat::peak_rss_mb" "artifacts/$t/last.log" | sed "s/^/    $t /"
done
exit $status
