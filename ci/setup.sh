#!/bin/bash
# Everything `make demo` and `make test` need on a fresh Debian machine with
# Rust: libclang-dev for libublk's bindgen; man-db and groff to check the
# man pages; systemd for `systemd-analyze verify` of the unit; lintian and
# cargo-deb (built once into the cargo home's bin, kept there) for the
# Debian package; moto_server (an S3 server, from PyPI) for the tests of
# remote bases; then the VM tools.
set -eu
cd "$(dirname "$0")/.."
PACKAGES="libclang-dev man-db groff-base systemd lintian"
missing=""
for p in $PACKAGES; do
    dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
if [ -n "$missing" ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
fi
CARGO_DEB_VERSION=3.8.0
if ! cargo deb --version 2>/dev/null | grep -q " $CARGO_DEB_VERSION\b"; then
    cargo install cargo-deb --locked --version "$CARGO_DEB_VERSION"
fi
MOTO_VERSION=5.2.1
if [ "$(python3 -c 'import moto; print(moto.__version__)' 2>/dev/null)" != "$MOTO_VERSION" ] ||
    ! command -v moto_server >/dev/null; then
    python3 -m pip install -q --root-user-action=ignore "moto[server]==$MOTO_VERSION"
    if command -v pyenv >/dev/null; then pyenv rehash; fi
fi
bash ci/vm-setup.sh
