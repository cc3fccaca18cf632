# vm-tests/guest/scenario-3.sh: scenario 1 over TLS. The server requires TLS and a client
# certificate from its CA. The guest first shows that a plaintext client, a client certificate
# from another CA, and a wrong server name are all refused, then runs the mount cycle with
# nbd-client's certificate options (files from the per-run /vmtest/tls).
. /vmtest/guest/lib.sh
if ! nbd-client -h 2>&1 | grep -q -- '-certfile'; then
    vt_skip "this nbd-client ($(nbd-client -V 2>&1 | head -n1)) has no TLS support"
fi
tls=/vmtest/tls
for f in ca-cert.pem client-cert.pem client-key.pem; do
    [ -f "$tls/$f" ] || vt_fail "missing $tls/$f (run.sh adds it)"
done

# vt_refused DESCRIPTION nbd-client-options...: connecting /dev/nbd1 that way must fail.
vt_refused() {
    _what=$1
    shift
    vt_log "$_what must be refused"
    if timeout 60 nbd-client "$VMT_HOST" "$VMT_PORT" /dev/nbd1 -N "$VMT_EXPORT" "$@" >/tmp/refused.log 2>&1; then
        nbd-client -d /dev/nbd1
        vt_fail "$_what: nbd-client connected"
    fi
    { cat /tmp/refused.log; echo; } | grep -v '^$' | sed 's/^/[nbd-client] /'
}
vt_refused "a plaintext client"
vt_refused "a client certificate from another CA" -certfile "$tls/rogue-client-cert.pem" \
    -keyfile "$tls/rogue-client-key.pem" -cacertfile "$tls/ca-cert.pem" -tlshostname "$VMT_TLS_HOSTNAME"
vt_refused "a server name the certificate does not carry" -certfile "$tls/client-cert.pem" \
    -keyfile "$tls/client-key.pem" -cacertfile "$tls/ca-cert.pem" -tlshostname wrong.vmtest

vt_mount_cycle -certfile "$tls/client-cert.pem" -keyfile "$tls/client-key.pem" \
    -cacertfile "$tls/ca-cert.pem" -tlshostname "$VMT_TLS_HOSTNAME"
vt_pass "ext4 on $NBD_DEV over TLS (client certificate, server name $VMT_TLS_HOSTNAME; plaintext, foreign CA and wrong name refused): mkfs, write $(wc -l </run/manifest) files, e2fsck -fn clean, checksums verified after reconnect"
