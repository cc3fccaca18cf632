# vm-tests/host/scenario-3.sh: host side of scenario 3 (scenario 1 over TLS). blockd runs with
# --tls (TLS required) and a certificate directory holding ca-cert.pem, so the guest's nbd-client
# must also present a client certificate issued by that CA.
SCENARIO_TITLE="ext4 over NBD with TLS"
TLS_HOSTNAME=blockd.vmtest

host_prepare() {
    vmt_make_certs "$RUNDIR/tls" "$TLS_HOSTNAME" || return 1
    local server=$RUNDIR/tls-server
    mkdir -p "$server" "$GUEST/tls"
    cp "$RUNDIR/tls/ca-cert.pem" "$RUNDIR/tls/server-cert.pem" "$RUNDIR/tls/server-key.pem" "$server/"
    cp "$RUNDIR/tls/ca-cert.pem" "$RUNDIR/tls/client-cert.pem" "$RUNDIR/tls/client-key.pem" "$GUEST/tls/"
    # A client certificate from another CA, which the server must refuse.
    vmt_make_certs "$RUNDIR/tls-rogue" "$TLS_HOSTNAME" || return 1
    cp "$RUNDIR/tls-rogue/client-cert.pem" "$GUEST/tls/rogue-client-cert.pem"
    cp "$RUNDIR/tls-rogue/client-key.pem" "$GUEST/tls/rogue-client-key.pem"
    # nbd-client that rejects the server's name sends a TLS close_notify mid-handshake and keeps
    # the socket open; blockd then waits out its handshake timeout (30 s by default) before it
    # closes. A 5 s timeout keeps the wrong-name probe short.
    vmt_start_blockd primary --backing "$RUNDIR/primary.img" --size 512M --export blockd \
        --tls-dir "$server" --tls --handshake-timeout 5 || return 1
    GUEST_PORT=$primary_PORT
    GUEST_EXPORT=blockd
    GUEST_CONFIG+=("VMT_TLS_HOSTNAME=$TLS_HOSTNAME")
}

host_check() {
    vmt_stop_blockd primary || return 1
    vmt_check_backing "$RUNDIR/primary.img"
}

host_cleanup() {
    vmt_stop_blockd primary
    rm -f "$RUNDIR/primary.img"
}
