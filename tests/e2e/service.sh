# `ublk-cow serve CONFIG`, what the systemd unit ublk-cow@NAME runs, with
# systemd played by this script: READY=1 on $NOTIFY_SOCKET once the device
# accepts I/O; after a kill -9 of the daemon, the same command ("the unit
# restarted") recovers the same device with the data written before;
# `snapshot -n` of it is taken by the same process; and SIGTERM
# ("systemctl stop") is del: the overlay clean, the device gone.
# Sourced by run.sh.

# ready_count FILE: how many READY=1 messages the listener logged.
ready_count() { grep -c 'READY=1' "$1" 2>/dev/null || true; }

# wait_ready FILE N: until the listener logged N READY=1 messages (30 s).
wait_ready() {
    local i
    for i in $(seq 300); do
        [ "$(ready_count "$1")" -ge "$2" ] && return 0
        sleep 0.1
    done
    die "no READY=1 number $2 in 30 s: $(cat "$1" 2>/dev/null)"
}

case_serve() {
    local d=$WORK/serve; rm -rf "$d"; mkdir -p "$d"
    local conf=$d/dev.conf ov=$d/dev.overlay sock=$d/notify.sock log=$d/notify.log
    printf '# a device for the unit\nbase = %s\noverlay = %s\nnumber = 9\nqueues = 1  # one\n' \
        "$BASE" "$ov" > "$conf"
    python3 -c 'import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1])
with open(sys.argv[2], "a") as f:
    while True:
        f.write(s.recv(4096).decode().replace("\n", " ") + "\n")
        f.flush()' "$sock" "$log" &
    local listener=$!
    for i in $(seq 50); do [ -S "$sock" ] && break; sleep 0.1; done
    NOTIFY_SOCKET=$sock "$UC" serve "$conf" > "$d/out1" 2> "$d/err1" &
    local pid=$!
    wait_ready "$log" 1 || { kill $listener; return 1; }
    [ -b /dev/ublkb9 ] || die "READY=1 but no /dev/ublkb9"
    grep -q 'STATUS=serving /dev/ublkb9' "$log" || die "no STATUS: $(cat "$log")"
    head -c 2M /dev/urandom > "$d/data"
    dd if="$d/data" of=/dev/ublkb9 bs=1M seek=3 oflag=direct status=none
    kill -9 "$pid"; wait "$pid" 2>/dev/null || true
    "$UC" list -n 9 | grep -q '^9 .* dead ' || die "after kill -9: $("$UC" list -n 9)"
    # The unit restarts: the same command recovers the same device.
    NOTIFY_SOCKET=$sock "$UC" serve "$conf" > "$d/out2" 2> "$d/err2" &
    pid=$!
    wait_ready "$log" 2 || { kill $listener; return 1; }
    grep -q 'recovering' "$d/err2" || die "the second serve did not recover: $(cat "$d/err2")"
    # Unclean: the crash left the overlay open, as `recover` shows it.
    "$UC" list -n 9 | grep -Eq '^9 .* (running|unclean) ' || die "after recovery: $("$UC" list -n 9)"
    cmp <(dd if=/dev/ublkb9 bs=1M skip=3 count=2 iflag=direct status=none) "$d/data" \
        || die "data written before the crash is not there after recovery"
    # A live snapshot of the unit's device: the same process serves on,
    # over the chain, its writes in the new overlay.
    "$UC" snapshot -n 9 --overlay "$d/new.overlay" 2>/dev/null || die "snapshot -n of a served device"
    [ "$(daemon_pid 9)" = "$pid" ] || die "the snapshot replaced serve's process"
    dd if=/dev/urandom of=/dev/ublkb9 bs=1M seek=6 count=1 oflag=direct status=none
    cmp <(dd if=/dev/ublkb9 bs=1M skip=3 count=2 iflag=direct status=none) "$d/data" \
        || die "data written before the snapshot is not there after it"
    # systemctl stop: SIGTERM, and serve exits 0 with the device removed.
    kill -TERM "$pid"
    local rc=0; wait "$pid" || rc=$?
    kill $listener 2>/dev/null; wait $listener 2>/dev/null || true
    [ "$rc" = 0 ] || die "serve exited $rc on SIGTERM: $(cat "$d/err2")"
    [ ! -e /dev/ublkb9 ] || die "/dev/ublkb9 is left after SIGTERM"
    [ ! -e "$UBLK_COW_RUN_DIR/9.json" ] || die "the state file is left after SIGTERM"
    "$UC" info "$ov" | grep -q 'frozen' || die "the snapshotted overlay is not frozen: $("$UC" info "$ov")"
    "$UC" info "$d/new.overlay" | grep -q 'clean: yes' \
        || die "the overlay is not clean: $("$UC" info "$d/new.overlay")"
    # And a bad configuration is one line.
    printf 'base = %s\n' "$BASE" > "$d/bad.conf"
    expect_fail "a configuration without an overlay" "$UC" serve "$d/bad.conf"
    base_unchanged
}

CASES+=("serve: READY=1 when it accepts I/O, recovery after kill -9, snapshot -n, SIGTERM is del|case_serve")
