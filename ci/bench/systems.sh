# The systems a benchmark compares (sourced). `sys_up NAME` prints the device
# of a fresh instance over $BASE; `sys_down NAME DEV` removes it. Systems that
# write to their backing file (kernel loop) get a private copy of the base.

sys_up() {
    case $1 in
        loop)
            cp --sparse=never "$BASE" $B/loop.img
            losetup --find --show --direct-io=on $B/loop.img ;;
        ublk-cow)
            "$UC" add --base "$BASE" ;;
        ublk-cow-q1)
            "$UC" add --base "$BASE" --queues 1 ;;
        *) echo "unknown system $1" >&2; return 1 ;;
    esac
}

sys_down() {
    case $1 in
        loop) losetup -d "$2"; rm -f $B/loop.img ;;
        ublk-cow*) "$UC" del -n "$(dev_id "$2")" ;;
    esac
}
