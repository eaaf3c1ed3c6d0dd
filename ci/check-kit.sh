#!/bin/bash
# What ships, checked (`make check-kit`, part of `make test`): `make
# install` into a staging directory; the installed binary's --version and
# --help; every installed man page clean under `man --warnings`; the systemd
# unit verified by systemd-analyze; `make uninstall` leaving nothing; then
# the Debian package (`make deb`) inspected with dpkg-deb and linted.
set -eu
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "check-kit: $*" >&2; exit 1; }

root=$tmp/root
make --no-print-directory install DESTDIR="$root" >/dev/null
bin=$root/usr/local/bin/ublk-cow
"$bin" --version | grep -Eq '^ublk-cow [0-9]+\.[0-9]+\.[0-9]+ \(commit ([0-9a-f]+|unknown)\)$' \
    || fail "--version: $("$bin" --version)"
"$bin" --help | grep -q 'copy-on-write block device' || fail "--help: $("$bin" --help)"
pages=$(ls "$root/usr/local/share/man/man1" | wc -l)
[ "$pages" -ge 11 ] || fail "$pages man pages installed"
for p in "$root"/usr/local/share/man/man1/*.1; do
    w=$(man --warnings -l "$p" 2>&1 >/dev/null) || fail "man $p failed: $w"
    [ -z "$w" ] || fail "man --warnings $p: $w"
done
for f in share/bash-completion/completions/ublk-cow share/zsh/site-functions/_ublk-cow \
    share/fish/vendor_completions.d/ublk-cow.fish lib/modules-load.d/ublk-cow.conf; do
    [ -s "$root/usr/local/$f" ] || fail "$f not installed"
done
unit=$root/usr/local/lib/systemd/system/ublk-cow@.service
grep -qx 'ExecStart=/usr/local/bin/ublk-cow serve /etc/ublk-cow/%i.conf' "$unit" \
    || fail "the installed unit runs: $(grep ExecStart "$unit")"
# The unit as an instance, its binary the staged one; the man pages it
# names are looked up in the staged tree.
mkdir "$tmp/unit"
sed "s|/usr/local/bin|$root/usr/local/bin|" "$unit" > "$tmp/unit/ublk-cow@check.service"
out=$(MANPATH=$root/usr/local/share/man systemd-analyze verify "$tmp/unit/ublk-cow@check.service" 2>&1) \
    || fail "systemd-analyze verify: $out"
[ -z "$out" ] || fail "systemd-analyze verify: $out"
make --no-print-directory uninstall DESTDIR="$root" >/dev/null
left=$(find "$root" -type f)
[ -z "$left" ] || fail "make uninstall left: $left"
echo "check-kit: make install/uninstall, --version, --help, man pages, unit: ok"

if [ -n "${CHECK_KIT_NO_DEB:-}" ]; then
    exit 0
fi
make --no-print-directory deb >/dev/null
deb=$(ls -t target/debian/ublk-cow_*.deb | head -n1)
dpkg-deb --info "$deb" > "$tmp/info"
grep -q '^ Package: ublk-cow$' "$tmp/info" || fail "dpkg-deb --info: $(cat "$tmp/info")"
dpkg-deb --contents "$deb" | awk '{print $6}' > "$tmp/contents"
for f in ./usr/bin/ublk-cow ./usr/share/man/man1/ublk-cow.1.gz ./usr/share/man/man1/ublk-cow-add.1.gz \
    ./usr/share/bash-completion/completions/ublk-cow ./usr/share/zsh/vendor-completions/_ublk-cow \
    ./usr/share/fish/vendor_completions.d/ublk-cow.fish ./lib/systemd/system/ublk-cow@.service \
    ./usr/share/doc/ublk-cow/copyright; do
    grep -qx "$f" "$tmp/contents" || fail "$deb lacks $f"
done
dpkg-deb --fsys-tarfile "$deb" | tar -xO ./lib/systemd/system/ublk-cow@.service \
    | grep -qx 'ExecStart=/usr/bin/ublk-cow serve /etc/ublk-cow/%i.conf' || fail "the packaged unit"
lintian --allow-root --fail-on error "$deb" > "$tmp/lintian" 2>&1 || fail "lintian: $(cat "$tmp/lintian")"
echo "check-kit: $deb: dpkg-deb --info/--contents, lintian (no errors): ok"
sed 's/^/  /' "$tmp/lintian"
