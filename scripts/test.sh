#!/usr/bin/env bash
# The README's test command: install what the tests need, then run the whole suite.
#   scripts/test.sh            everything (fmt, clippy, unit + integration tests)
#   SKIP_INSTALL=1 scripts/test.sh   do not touch system packages
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

# Debian packages the tests use. Installed only when missing (idempotent).
PACKAGES=(iproute2 curl haproxy procps)

install_packages() {
  local missing=()
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && { echo "packages present: ${PACKAGES[*]}"; return; }
  if [ "$(id -u)" -ne 0 ]; then
    echo "WARNING: missing packages (${missing[*]}) and not root: tests that need them will skip loudly" >&2
    return
  fi
  step "installing ${missing[*]}"
  # Keep package scripts from starting services (haproxy) on this machine.
  local prc=/usr/sbin/policy-rc.d created=0
  if [ ! -e "$prc" ]; then printf '#!/bin/sh\nexit 101\n' >"$prc"; chmod +x "$prc"; created=1; fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
  [ "$created" = 1 ] && rm -f "$prc"
  return 0
}

if [ "${SKIP_INSTALL:-0}" != 1 ] && command -v apt-get >/dev/null; then
  step "system packages"
  install_packages
fi

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --quiet -- -D warnings

step "cargo test (unit, integration, namespace and doc tests)"
if [ "$(id -u)" -ne 0 ]; then
  echo "WARNING: not root: network-namespace tests will print SKIPPED" >&2
fi
cargo test --all-targets --quiet
cargo test --doc --quiet

step "benches compile"
cargo bench --no-run --quiet

echo
echo "scripts/test.sh: all green"
