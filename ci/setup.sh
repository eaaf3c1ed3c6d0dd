#!/bin/bash
# Everything `make demo` and `make test` need on a fresh Debian machine with
# Rust: libclang-dev for libublk's bindgen, then the VM tools.
set -eu
cd "$(dirname "$0")/.."
if ! dpkg -s libclang-dev >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libclang-dev >/dev/null
fi
bash ci/vm-setup.sh
