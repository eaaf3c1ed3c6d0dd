# The servers of the remote-base cases and benchmarks (sourced): moto_server
# (S3) and tests/remote/range_server.py (HTTP with Range) on 127.0.0.1.

RDIR=$ROOT/tests/remote
REMOTE_ENV=$WORK/remote.env
# The Python that has moto (ci/setup.sh installs it with pip; under pyenv
# its shims may not be on the guest's PATH).
for d in "$HOME/.pyenv/shims" /root/.pyenv/shims; do
    [ -d "$d" ] && ! command -v moto_server >/dev/null && PATH=$d:$PATH
done

# moto_up PORT BUCKET ENVFILE: starts moto_server on PORT (pid in
# $WORK/moto.pid), makes a user, its key and BUCKET, and writes the AWS_*
# settings to ENVFILE.
moto_up() {
    local port=$1 bucket=$2 envfile=$3
    INITIAL_NO_AUTH_ACTION_COUNT=3 setsid moto_server -H 127.0.0.1 -p "$port" \
        >"$WORK/moto.log" 2>&1 &
    echo $! > "$WORK/moto.pid"
    local i
    for i in $(seq 1 600); do
        (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null && break
        sleep 0.1
    done
    local creds; creds=$(python3 "$RDIR/moto_setup.py" "http://127.0.0.1:$port" "$bucket")
    cat > "$envfile" <<ENV
export AWS_ACCESS_KEY_ID=${creds% *} AWS_SECRET_ACCESS_KEY=${creds#* }
export AWS_REGION=us-east-1 AWS_ENDPOINT_URL=http://127.0.0.1:$port AWS_ALLOW_HTTP=true
MOTO_PORT=$port
ENV
}

# (Re)starts the HTTP range server over $WORK/http on $HTTP_PORT.
http_up() {
    setsid python3 "$RDIR/range_server.py" "$WORK/http" "$HTTP_PORT" \
        >"$WORK/http.out" 2>&1 &
    echo $! > "$WORK/http.pid"
    local i
    for i in $(seq 1 300); do
        grep -q ready "$WORK/http.out" 2>/dev/null && return 0
        sleep 0.1
    done
    die "the range server did not start"
}

http_down() { kill "$(cat "$WORK/http.pid")"; wait_gone "$(cat "$WORK/http.pid")"; }
wait_gone() { while [ "$1" != 0 ] && kill -0 "$1" 2>/dev/null; do sleep 0.1; done; }

