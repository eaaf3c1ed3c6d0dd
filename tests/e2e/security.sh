# Security cases: who can read a device's data and use its daemon. Overlays
# and the files in the run directory are private (0600), the run directory
# is 0700 and refused when open to others, the control socket serves root
# and the device's owner only, and a new overlay is never created through a
# symlink. Sourced by run.sh.

# as_nobody CMD...: CMD as an unprivileged user without groups.
as_nobody() { setpriv --reuid=65534 --regid=65534 --clear-groups "$@"; }

# mode_is WANT PATH: PATH's permission bits are WANT (octal, as stat -c %a).
mode_is() {
    local m; m=$(stat -c %a "$2")
    [ "$m" = "$1" ] || die "$2 has mode $m, not $1"
}

# overlay_of ID: the overlay file of device ID.
overlay_of() {
    "$UC" list --json | python3 -c 'import json,sys
print(next(d["overlay"] for d in json.load(sys.stdin) if d["id"] == int(sys.argv[1])))' "$1"
}

# peer_request SOCKET: sends a stats request to SOCKET from a process whose
# effective uid is 65534 (nobody) but whose file-system uid is root's, so
# that it can reach the socket through the 0700 run directory and only the
# daemon's own check of the peer (SO_PEERCRED, the effective uid) is left to
# stop it. Prints the first reply line.
peer_request() {
    python3 - "$1" <<'EOF'
import ctypes, os, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
os.setgroups([])
os.setresgid(65534, 65534, 65534)
os.setresuid(65534, 65534, 0)
libc.setfsuid(0)
# setfsuid(-1) changes nothing and returns the current file-system uid.
assert libc.setfsuid(-1) == 0 and os.geteuid() == 65534
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(b'{"op":"stats"}\n')
print(s.makefile().readline().strip())
EOF
}

# The files of device ID in the run directory are there and are 0600.
run_files_private() {
    local id=$1 f
    mode_is 700 "$UBLK_COW_RUN_DIR"
    for f in json map log sock; do
        [ -e "$UBLK_COW_RUN_DIR/$id.$f" ] || die "$UBLK_COW_RUN_DIR/$id.$f is missing"
    done
    for f in "$UBLK_COW_RUN_DIR"/*; do mode_is 600 "$f"; done
}

case_security_private_files() {
    local dev id ov ov2=$WORK/sec-new.overlay reply pid
    dev=$(add --base "$BASE"); id=$(dev_id "$dev")
    dd if=/dev/urandom of="$dev" bs=64k count=4 oflag=direct status=none
    ov=$(overlay_of "$id")
    mode_is 600 "$ov"
    run_files_private "$id"
    # Someone else: cannot read the overlay, reach the daemon, or stop it.
    if as_nobody cat "$ov" >/dev/null 2>&1; then die "nobody read the temporary overlay $ov"; fi
    expect_fail "stats by nobody" as_nobody "$UC" stats -n "$id"
    expect_fail "cache by nobody" as_nobody "$UC" cache -n "$id"
    expect_fail "del by nobody" as_nobody "$UC" del -n "$id"
    [ -b "$dev" ] || die "$dev is gone after nobody's del"
    # Past the directory, the daemon itself refuses with one line...
    reply=$(peer_request "$UBLK_COW_RUN_DIR/$id.sock")
    say "  a peer of uid 65534 got: $reply"
    case $reply in
        *'"error"'*"permission denied to uid 65534"*) ;;
        *) die "the daemon answered uid 65534: $reply" ;;
    esac
    grep -q "permission denied to uid 65534" "$UBLK_COW_RUN_DIR/$id.log" \
        || die "the refusal is not in the daemon's log"
    # ...and goes on serving root.
    "$UC" stats -n "$id" >/dev/null || die "stats by root failed after a refusal"
    # A recovered daemon keeps the owner, and its new files are private too.
    pid=$(grep -o '"pid": *[0-9]*' "$UBLK_COW_RUN_DIR/$id.json" | grep -o '[0-9]*$')
    kill -9 "$pid"
    while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
    "$UC" recover -n "$id" >/dev/null
    run_files_private "$id"
    reply=$(peer_request "$UBLK_COW_RUN_DIR/$id.sock")
    case $reply in
        *"permission denied to uid 65534"*) ;;
        *) die "after recover, the daemon answered uid 65534: $reply" ;;
    esac
    "$UC" del -n "$id"
    [ ! -e "$ov" ] || die "the temporary overlay $ov is left after del"

    # A new persistent overlay is private too.
    rm -f "$ov2"
    dev=$(add --base "$BASE" --overlay "$ov2"); id=$(dev_id "$dev")
    mode_is 600 "$ov2"
    if as_nobody cat "$ov2" >/dev/null 2>&1; then die "nobody read the new overlay $ov2"; fi
    "$UC" del -n "$id"
    rm -f "$ov2"
    base_unchanged
}

case_security_run_dir() {
    local d=$WORK/sec-run devs; devs=$(ublk_devices)
    # One open to all is refused, and left as it was.
    rm -rf "$d"; mkdir -m 0777 "$d"
    expect_fail "add with a run directory of mode 0777" \
        env UBLK_COW_RUN_DIR="$d" "$UC" add --base "$BASE"
    expect_fail "list with a run directory of mode 0777" env UBLK_COW_RUN_DIR="$d" "$UC" list
    mode_is 777 "$d"
    [ -z "$(ls -A "$d")" ] || die "files made in the refused run directory: $(ls -A "$d")"
    [ "$(ublk_devices)" = "$devs" ] || die "a device was made with a refused run directory"
    # A missing one is made 0700.
    rm -rf "$d"
    local dev id
    dev=$(UBLK_COW_RUN_DIR=$d/sub "$UC" add --base "$BASE"); id=$(dev_id "$dev")
    UBLK_COW_RUN_DIR=$d/sub run_files_private "$id"
    UBLK_COW_RUN_DIR=$d/sub "$UC" del -n "$id"
    rm -rf "$d"
    base_unchanged
}

case_security_symlink() {
    local link=$WORK/sec-link.overlay target=$WORK/sec-target.overlay devs
    devs=$(ublk_devices)
    rm -f "$link" "$target"
    ln -s "$target" "$link"
    expect_fail "a new overlay through a dangling symlink" \
        "$UC" add --base "$BASE" --overlay "$link"
    "$UC" add --base "$BASE" --overlay "$link" 2>&1 | grep -q symlink \
        || die "the refusal does not name the symlink"
    [ ! -e "$target" ] || die "the symlink's target $target was created"
    [ -L "$link" ] || die "the symlink was removed"
    [ "$(ublk_devices)" = "$devs" ] || die "a device was made for a refused overlay"
    rm -f "$link"
    base_unchanged
}

CASES+=("security: overlays and run-directory files are private; others cannot read, use or stop a device|case_security_private_files")
CASES+=("security: a run directory open to others is refused; a new one is made 0700|case_security_run_dir")
CASES+=("security: a new overlay is not created through a symlink|case_security_symlink")
