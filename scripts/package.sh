#!/usr/bin/env bash
# Build the Debian package (issue 15): a release build of metaproxy packaged by
# cargo-deb from [package.metadata.deb] in Cargo.toml (what it installs and
# why: docs/operations.md, "Installing the Debian package").
#
#   scripts/package.sh [cargo-deb options, e.g. --deb-version V --output DIR]
#
# Prints the path of the .deb as its last line. Installs cargo-deb (cargo
# install --locked) when missing. The release build is the one
# scripts/storm.sh makes (same command), so in CI it costs nothing extra.
set -euo pipefail
cd "$(dirname "$0")/.."

# cargo-deb 3.x: the [package.metadata.deb.systemd-units] keys used here.
CARGO_DEB_VERSION=^3.8
if ! command -v cargo-deb >/dev/null; then
  echo "==> cargo install cargo-deb --locked (version $CARGO_DEB_VERSION)" >&2
  cargo install cargo-deb --locked --version "$CARGO_DEB_VERSION" >&2
fi

cargo build --profile release --quiet --bin metaproxy
# --no-build: package the binary just built instead of letting cargo-deb
# rebuild it (cargo-deb's build would not share flags with storm.sh's).
out=$(cargo deb --no-build "$@")
deb=$(printf '%s\n' "$out" | tail -n 1)
[ -f "$deb" ] || { printf 'scripts/package.sh: cargo deb printed no package path:\n%s\n' "$out" >&2; exit 1; }
printf '%s\n' "$deb"
