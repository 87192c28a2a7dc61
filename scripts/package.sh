#!/usr/bin/env bash
# Build the Debian package (issue 15): a release build of metaproxy packaged by
# cargo-deb from [package.metadata.deb] in Cargo.toml (what it installs and
# why: docs/operations.md, "Installing the Debian package").
#
#   scripts/package.sh [cargo-deb options, e.g. --deb-version V --output DIR]
#
# Prints the path of the .deb as its last line. Installs cargo-deb (cargo
# install --locked) and, as root, help2man (the man page) when missing; needs
# dpkg-dev (dpkg-shlibdeps: the libc6 dependency). The release build is the one
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

# metaproxy(1) from the binary's own --help (help2man, with
# debian/metaproxy.1.include), so it cannot drift from the CLI. Dated by the
# changelog's last entry: the same tree gives the same page.
need() { # need COMMAND DEBIAN-PACKAGE WHY
  command -v "$1" >/dev/null && return
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    echo "==> apt-get install $2 ($3)" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$2" >&2
  else
    echo "scripts/package.sh: needs $1 for $3 (apt-get install $2)" >&2
    exit 1
  fi
}
need help2man help2man "the man page"
need dpkg-shlibdeps dpkg-dev "the libc6 dependency"
mkdir -p target/man
SOURCE_DATE_EPOCH=$(date -d "$(sed -n 's/^ -- .*>  //p' debian/changelog | head -n 1)" +%s)
export SOURCE_DATE_EPOCH
help2man --no-info --section 1 --include debian/metaproxy.1.include \
  --name "OpenStack metadata path: namespace proxy, metadata agent and metadata API" \
  target/release/metaproxy | gzip -9n >target/man/metaproxy.1.gz
# --no-build: package the binary just built instead of letting cargo-deb
# rebuild it (cargo-deb's build would not share flags with storm.sh's).
out=$(cargo deb --no-build "$@")
deb=$(printf '%s\n' "$out" | tail -n 1)
[ -f "$deb" ] || { printf 'scripts/package.sh: cargo deb printed no package path:\n%s\n' "$out" >&2; exit 1; }
printf '%s\n' "$deb"
