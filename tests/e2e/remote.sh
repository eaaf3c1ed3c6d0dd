# A remote base (`add --base s3://...`, `http://...`): moto_server (S3) and
# tests/remote/range_server.py (HTTP with Range) on 127.0.0.1 in the guest,
# started once for all cases (`remote_up`). Sourced by run.sh.

source "$(dirname "${BASH_SOURCE[0]}")/remote-servers.sh"
# Python (moto, boto3) is slow under emulation: the objects are small.
RIMG=$WORK/remote.img
RIMG_MB=16

# Starting the servers and putting the objects takes about two minutes
# under emulation, mostly Python's imports: run.sh begins it in the
# background before the first case (`remote_start`), and the first remote
# case waits for it (`remote_up`).
REMOTE_SETUP=$WORK/remote-setup
remote_start() {
    rm -f "$REMOTE_SETUP.rc"
    ( (set -e; remote_setup) > "$REMOTE_SETUP.log" 2>&1; echo $? > "$REMOTE_SETUP.rc" ) &
    echo $! > "$REMOTE_SETUP.pid"
}

# Starts the servers unless they run or are being started, and sources
# the AWS_* settings and ports into this shell.
remote_up() {
    if [ -f "$REMOTE_SETUP.pid" ]; then
        local i line
        for i in $(seq 1 3000); do
            [ -f "$REMOTE_SETUP.rc" ] && break
            sleep 0.2
        done
        rm -f "$REMOTE_SETUP.pid"
        while read -r line; do say "  (background) $line"; done < "$REMOTE_SETUP.log"
        [ "$(cat "$REMOTE_SETUP.rc" 2>/dev/null)" = 0 ] ||
            die "starting the servers in the background failed (rc $(cat "$REMOTE_SETUP.rc" 2>/dev/null || echo none))"
    fi
    remote_setup
    # shellcheck disable=SC1090
    source "$REMOTE_ENV"
}

# Unless they run: the servers, with an S3 object `disk.img` ($RIMG,
# random) and `ext4.img`, and disk.img over HTTP.
remote_setup() {
    if [ ! -f "$REMOTE_ENV" ]; then
        local mport=18081 hport=18082
        # Left from a case that stopped moto: started again below.
        if [ -f "$WORK/http.pid" ]; then kill "$(cat "$WORK/http.pid")" 2>/dev/null || true; fi
        wait_gone "$(cat "$WORK/http.pid" 2>/dev/null || echo 0)" 
        mkdir -p "$WORK/http"
        moto_up $mport images "$REMOTE_ENV"
        echo "HTTP_PORT=$hport" >> "$REMOTE_ENV"
        # shellcheck disable=SC1090
        source "$REMOTE_ENV"
        say "  moto_server ready ($SECONDS s)"
        head -c $((RIMG_MB << 20)) /dev/urandom > "$RIMG"
        python3 "$RDIR/s3put.py" images disk.img "$RIMG"
        # An ext4 image with a few files.
        rm -rf "$WORK/ext4-files"; mkdir -p "$WORK/ext4-files"
        head -c $((3 << 20)) /dev/urandom > "$WORK/ext4-files/big"
        seq 1 20000 > "$WORK/ext4-files/numbers"
        truncate -s 16M "$WORK/ext4.img"
        mkfs.ext4 -q -d "$WORK/ext4-files" "$WORK/ext4.img"
        python3 "$RDIR/s3put.py" images ext4.img "$WORK/ext4.img"
        cp "$RIMG" "$WORK/http/disk.img"
        http_up
        say "  servers ready ($SECONDS s)"
    fi
}

case_remote_s3() {
    remote_up
    local url=s3://images/disk.img
    local dev; dev=$(add --base $url --overlay "$WORK/remote.ov")
    local id; id=$(dev_id "$dev")
    "$UC" list | grep -q "$url" || die "list does not name the URL"
    local want; want=$(digest "$RIMG")
    [ "$(digest "$dev")" = "$want" ] || die "the device reads other data than the object"
    local gets bytes; gets=$(stat_of "$id" remote_gets); bytes=$(stat_of "$id" remote_bytes)
    say "  whole device read: $gets GETs, $bytes bytes ($SECONDS s)"
    # Readahead's prefetch asks for several units in one GET: count bytes.
    [ "$bytes" -ge $((RIMG_MB << 20)) ] || die "only $bytes bytes fetched for $RIMG_MB MiB"
    # Read again: every unit is in the overlay now.
    [ "$(digest "$dev")" = "$want" ] || die "a second read differs"
    [ "$(stat_of "$id" remote_gets)" = "$gets" ] || die "a second read fetched again"
    # A write lands in the overlay; after del and add the fetched part
    # and the write are still there, with no GET.
    dd if=/dev/urandom of="$WORK/w.bin" bs=1k count=6 status=none
    dd if="$WORK/w.bin" of="$dev" bs=1k seek=4097 oflag=direct conv=notrunc status=none
    want=$(digest "$dev")
    "$UC" del -n "$id"
    dev=$(add --base $url --overlay "$WORK/remote.ov"); id=$(dev_id "$dev")
    [ "$(digest "$dev")" = "$want" ] || die "after del and add the device reads other data"
    [ "$(stat_of "$id" remote_gets)" = 0 ] || die "the kept overlay was fetched again"
    "$UC" del -n "$id"

    # The object replaced while a device serves it: blocks not fetched
    # fail with EIO, fetched ones still read as before; and `add` with the
    # old overlay is refused, one line.
    dev=$(add --base $url); id=$(dev_id "$dev")
    local head_sha; head_sha=$(dd if="$dev" bs=1M count=1 iflag=direct status=none | sha256sum)
    head -c $((RIMG_MB << 20)) /dev/urandom > "$WORK/other.img"
    python3 "$RDIR/s3put.py" images disk.img "$WORK/other.img"
    if dd if="$dev" of=/dev/null bs=4k count=1 skip=$((8 << 8)) iflag=direct status=none 2>"$WORK/dd.err"; then
        die "a block of the replaced object was served"
    fi
    grep -q "Input/output error" "$WORK/dd.err" || die "not EIO: $(cat "$WORK/dd.err")"
    [ "$(dd if="$dev" bs=1M count=1 iflag=direct status=none | sha256sum)" = "$head_sha" ] ||
        die "a fetched block changed with the object"
    "$UC" del -n "$id"
    local ov_sha; ov_sha=$(digest "$WORK/remote.ov")
    expect_fail "an overlay made for another version" add --base $url --overlay "$WORK/remote.ov"
    [ "$(digest "$WORK/remote.ov")" = "$ov_sha" ] || die "a refused add changed the overlay"
    python3 "$RDIR/s3put.py" images disk.img "$RIMG"
    rm -f "$WORK/remote.ov" "$WORK/other.img"
}

# A stack of layers built with devices over the raw image, pushed
# bottom-up over its copy in S3, served with a local overlay: the device
# reads as the local stack does. And a layer made over the S3 base itself,
# frozen and pushed over the URL it records.
case_remote_pushed_layers() {
    remote_up
    local l1=$WORK/push-l1 l2=$WORK/push-l2 top=$WORK/push-top dev id
    rm -f "$l1" "$l2" "$top"
    dev=$(add --base "$RIMG" --overlay "$l1"); id=$(dev_id "$dev")
    dd if=/dev/urandom of="$dev" bs=64k count=48 seek=16 oflag=direct conv=notrunc status=none
    blkdiscard -z -o $((8 << 20)) -l $((1 << 20)) "$dev"
    "$UC" del -n "$id"
    "$UC" snapshot "$l1" --overlay "$l2" > /dev/null
    dev=$(add --base "$l1" --overlay "$l2"); id=$(dev_id "$dev")
    dd if=/dev/urandom of="$dev" bs=4k count=100 seek=300 oflag=direct conv=notrunc status=none
    dd if=/dev/urandom of="$dev" bs=4k count=8 seek=$((8 << 8)) oflag=direct conv=notrunc status=none
    "$UC" del -n "$id"
    "$UC" snapshot "$l2" --overlay "$top" > /dev/null
    dev=$(add --base "$l2" --overlay "$top"); id=$(dev_id "$dev")
    local want; want=$(digest "$dev")
    "$UC" del -n "$id"
    "$UC" push "$l1" s3://images/l1.cow --backing s3://images/disk.img || die "push of l1 failed"
    "$UC" push "$l2" s3://images/l2.cow --backing s3://images/l1.cow || die "push of l2 failed"
    expect_fail "l2 pushed over the raw image" \
        "$UC" push "$l2" s3://images/l2-wrong.cow --backing s3://images/disk.img
    dev=$(add --base s3://images/l2.cow); id=$(dev_id "$dev")
    [ "$(digest "$dev")" = "$want" ] || die "the pushed stack reads other data than the local one"
    say "  pushed stack read: $(stat_of "$id" remote_gets) GETs ($SECONDS s)"
    "$UC" del -n "$id"
    # An overlay over the remote base: a snapshot with a new overlay over it
    # is refused with nothing changed; frozen alone, it is pushed over the
    # URL it records, and served from there.
    local r=$WORK/push-r
    rm -f "$r"
    dev=$(add --base s3://images/disk.img --overlay "$r"); id=$(dev_id "$dev")
    dd if=/dev/urandom of="$dev" bs=64k count=16 seek=40 oflag=direct conv=notrunc status=none
    want=$(digest "$dev")
    "$UC" del -n "$id"
    local r_sha; r_sha=$(digest "$r")
    expect_fail "a snapshot with an overlay over a remote base" \
        "$UC" snapshot "$r" --overlay "$WORK/push-r2"
    [ "$(digest "$r")" = "$r_sha" ] && [ ! -e "$WORK/push-r2" ] || die "a refused snapshot changed files"
    "$UC" snapshot "$r" > /dev/null
    "$UC" push "$r" s3://images/r.cow || die "push of a layer over the remote base failed"
    dev=$(add --base s3://images/r.cow); id=$(dev_id "$dev")
    [ "$(digest "$dev")" = "$want" ] || die "the pushed layer over the remote base reads other data"
    "$UC" del -n "$id"
    rm -f "$l1" "$l2" "$top" "$r"
}

case_remote_ext4_and_cache() {
    remote_up
    local dev; dev=$(add --base s3://images/ext4.img)
    local id; id=$(dev_id "$dev")
    mkdir -p "$WORK/mnt"
    mount -o ro,noload "$dev" "$WORK/mnt"
    cmp "$WORK/mnt/big" "$WORK/ext4-files/big" || die "a file of the ext4 image differs"
    cmp "$WORK/mnt/numbers" "$WORK/ext4-files/numbers" || die "numbers differs"
    umount "$WORK/mnt"
    # The whole image into the overlay, then the server gone: every read
    # still works.
    "$UC" cache -n "$id" > "$WORK/cache.out" 2>&1 || { cat "$WORK/cache.out"; die "cache failed"; }
    say "  $(tail -n1 "$WORK/cache.out")"
    kill "$(cat "$WORK/moto.pid")"; wait_gone "$(cat "$WORK/moto.pid")"
    rm -f "$REMOTE_ENV"
    [ "$(digest "$dev")" = "$(digest "$WORK/ext4.img")" ] || die "after cache, with the server gone, the device differs"
    mount -o ro,noload "$dev" "$WORK/mnt"
    cmp "$WORK/mnt/big" "$WORK/ext4-files/big" || die "after cache a file differs"
    umount "$WORK/mnt"
    "$UC" del -n "$id"
}

case_remote_http_outage() {
    remote_up
    local url=http://127.0.0.1:$HTTP_PORT/disk.img
    local dev; dev=$(add --base "$url" --fetch-timeout 3s)
    local id; id=$(dev_id "$dev")
    dd if="$dev" of=/dev/null bs=1M count=2 iflag=direct status=none
    http_down
    # Fetched: served. Not fetched: EIO within the timeout, and the daemon
    # lives.
    dd if="$dev" of=/dev/null bs=1M count=2 iflag=direct status=none ||
        die "a fetched range failed with the server down"
    local t0=$SECONDS
    if dd if="$dev" of=/dev/null bs=4k count=1 skip=$((10 << 8)) iflag=direct status=none 2>"$WORK/dd.err"; then
        die "a read of an unfetched block succeeded with the server down"
    fi
    grep -q "Input/output error" "$WORK/dd.err" || die "not EIO: $(cat "$WORK/dd.err")"
    local took=$((SECONDS - t0))
    say "  unfetched read failed after ${took}s: $(cat "$WORK/dd.err")"
    [ "$took" -le 20 ] || die "EIO took ${took}s with a 3s timeout"
    "$UC" list | grep -q running || die "the daemon is gone"
    http_up
    local want; want=$(dd if="$RIMG" bs=4k count=1 skip=$((10 << 8)) status=none | sha256sum)
    [ "$(dd if="$dev" bs=4k count=1 skip=$((10 << 8)) iflag=direct status=none | sha256sum)" = "$want" ] ||
        die "after the server came back the same read differs"
    # A write, the daemon killed, `recover`: the same object, the write
    # kept, the rest of the object still fetched on demand.
    dd if=/dev/urandom of="$dev" bs=4k count=1 seek=5 oflag=direct conv=notrunc status=none
    local before; before=$(dd if="$dev" bs=1M count=1 iflag=direct status=none | sha256sum)
    kill_and_recover "$id"
    [ "$(dd if="$dev" bs=1M count=1 iflag=direct status=none | sha256sum)" = "$before" ] ||
        die "after recover the first MiB differs"
    [ "$(dd if="$dev" bs=1M skip=12 count=1 iflag=direct status=none | sha256sum)" = \
      "$(dd if="$RIMG" bs=1M skip=12 count=1 status=none | sha256sum)" ] ||
        die "after recover an unfetched MiB differs"
    "$UC" del -n "$id"
}

case_remote_bad_input() {
    remote_up
    local n; n=$(ublk_devices)
    expect_fail "a malformed URL" add --base "s3://"
    expect_fail "an unknown bucket" add --base s3://nobucket/disk.img
    expect_fail "an unknown key" add --base s3://images/nokey.img
    AWS_SECRET_ACCESS_KEY=wrong expect_fail "wrong credentials" add --base s3://images/disk.img
    AWS_ENDPOINT_URL=http://127.0.0.1:1 expect_fail "an unreachable endpoint" add --base s3://images/disk.img
    head -c 1000 /dev/urandom > "$WORK/http/odd.img"
    expect_fail "a size not a multiple of 512" add --base "http://127.0.0.1:$HTTP_PORT/odd.img"
    expect_fail "--fetch-size on a local base" add --base "$BASE" --fetch-size 1M
    [ "$(ublk_devices)" = "$n" ] || die "a refused add left a device"
}

CASES+=(
    "remote base over S3: whole device, overlay kept, replaced object|case_remote_s3"
    "remote base: layers pushed to S3 (a local stack, and one over the S3 base) read as before|case_remote_pushed_layers"
    "remote base over HTTP: outage fails with EIO, then works; recover|case_remote_http_outage"
    "remote base: bad input refused in one line|case_remote_bad_input"
    "remote base: ext4 mounted, cache, server gone|case_remote_ext4_and_cache"
)
