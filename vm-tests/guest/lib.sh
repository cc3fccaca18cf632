# vm-tests/guest/lib.sh: guest helpers sourced by init and the scenario scripts (busybox sh).
# Owns: the console protocol read by run.sh, steps with timeouts, nbd-client connect/disconnect,
# the file tree with known checksums, and the host-to-guest control channel (/dev/ttyS1).
#
# Console protocol (each on its own line, read by the host):
#   VMTEST: RESULT PASS|FAIL|SKIP scenario=N <detail>   the outcome (exactly one per run)
#   VMTEST: EVENT <name> [args]                         a point the host side may act on
#   VMTEST: MANIFEST <sha256>  <path>                   checksums the host re-checks on the backing
#   [guest] <text>                                      progress

NBD_DEV=/dev/nbd0
MNT=/mnt

vt_log() { echo "[guest $(cut -d" " -f1 /proc/uptime)s] $*"; }

# vt_result STATUS DETAIL: records and prints the scenario's outcome (the first one wins).
vt_result() {
    [ -f /run/vmtest-result ] && return 0
    echo "$1 $2" >/run/vmtest-result
    echo
    echo "VMTEST: RESULT $1 scenario=${VMT_SCENARIO:-?} $2"
}
vt_fail() {
    vt_result FAIL "$*"
    exit 1
}
vt_skip() {
    vt_result SKIP "$*"
    exit 0
}
vt_pass() {
    vt_result PASS "$*"
    exit 0
}
vt_event() { echo "VMTEST: EVENT $*"; }

vt_end() {
    sync
    reboot -f
    sleep 5
}

# vt_run SECONDS DESCRIPTION CMD...: runs one step under a timeout; fails the scenario on error.
vt_run() {
    _secs=$1 _what=$2
    shift 2
    vt_log "$_what"
    timeout "$_secs" "$@"
    _rc=$?
    [ "$_rc" = 0 ] || vt_fail "$_what: exit $_rc ($*)"
}

# vt_boot: modules in the resolved order, then the network (qemu user mode: 10.0.2.15, gateway
# and host loopback at 10.0.2.2).
vt_boot() {
    while read -r m; do
        if ! insmod "/lib/modules/$m.ko"; then
            vt_result FAIL "insmod $m failed"
            return 1
        fi
    done </lib/modules/load-order
    i=0
    while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 50 ]; do
        sleep 0.1
        i=$((i + 1))
    done
    ip link set lo up
    if ! ip link set eth0 up || ! ip addr add 10.0.2.15/24 dev eth0 || ! ip route add default via 10.0.2.2; then
        vt_result FAIL "cannot configure eth0"
        return 1
    fi
    [ -e "$NBD_DEV" ] || {
        vt_result FAIL "$NBD_DEV missing after insmod nbd"
        return 1
    }
    vt_log "modules loaded ($(tr '\n' ' ' </lib/modules/load-order)), eth0 up"
}

# vt_nbd_connect DEVICE PORT [nbd-client options...]: connects DEVICE to the host's export and
# waits until the kernel sees its size.
vt_nbd_connect() {
    _dev=$1 _port=$2
    shift 2
    vt_run 60 "nbd-client $VMT_HOST $_port $_dev -N $VMT_EXPORT $*" \
        nbd-client "$VMT_HOST" "$_port" "$_dev" -N "$VMT_EXPORT" "$@"
    _name=${_dev#/dev/}
    i=0
    while [ "$(cat /sys/block/$_name/size 2>/dev/null || echo 0)" = 0 ]; do
        [ $i -lt 100 ] || vt_fail "$_dev has no size 10 s after nbd-client connected"
        sleep 0.1
        i=$((i + 1))
    done
    vt_log "$_dev connected: $(($(cat /sys/block/$_name/size) * 512)) bytes"
}

vt_nbd_disconnect() {
    vt_run 30 "nbd-client -d $1" nbd-client -d "$1"
    i=0
    while [ "$(cat /sys/block/${1#/dev/}/size 2>/dev/null || echo 0)" != 0 ]; do
        [ $i -lt 100 ] || vt_fail "$1 still has a size 10 s after nbd-client -d"
        sleep 0.1
        i=$((i + 1))
    done
}

# vt_make_tree DIR MANIFEST: writes a tree of random files (empty to 16 MiB, about 45 MiB in
# all, nested directories, a symlink) and records their checksums in MANIFEST (paths relative
# to DIR).
vt_make_tree() {
    _dir=$1 _manifest=$2
    mkdir -p "$_dir" || vt_fail "mkdir $_dir"
    n=1
    for d in a b c/d c/d/e; do
        mkdir -p "$_dir/$d" || vt_fail "mkdir $_dir/$d"
        for f in 0 1 2 3 4 5 6 7; do
            # n^3 * 97 bytes: 97 B .. 3.1 MiB, odd sizes that straddle block boundaries.
            head -c $((n * n * n * 97)) /dev/urandom >"$_dir/$d/file$f.bin" || vt_fail "write $_dir/$d/file$f.bin"
            n=$((n + 1))
        done
    done
    : >"$_dir/empty" || vt_fail "write $_dir/empty"
    head -c $((16 * 1024 * 1024)) /dev/urandom >"$_dir/big.bin" || vt_fail "write $_dir/big.bin"
    ln -s c/d/e/file7.bin "$_dir/link" || vt_fail "symlink $_dir/link"
    (cd "$_dir" && find . -type f | sort | xargs sha256sum) >"$_manifest" || vt_fail "sha256sum of $_dir"
    vt_log "wrote $(wc -l <"$_manifest") files, $(du -sk "$_dir" | cut -f1) KiB under $_dir"
}

# vt_verify_tree DIR MANIFEST: every file of MANIFEST has its checksum and no file is extra.
vt_verify_tree() {
    _dir=$1 _manifest=$2
    _bad=$(cd "$_dir" && sha256sum -c "$_manifest" 2>&1 | grep -v ': OK$')
    [ -z "$_bad" ] || vt_fail "checksum mismatch under $_dir: $(echo "$_bad" | head -n 5 | tr '\n' ';')"
    _have=$(cd "$_dir" && find . -type f | wc -l)
    _want=$(wc -l <"$_manifest")
    [ "$_have" = "$_want" ] || vt_fail "$_dir has $_have files, the manifest $_want"
    [ "$(readlink "$_dir/link")" = c/d/e/file7.bin ] || vt_fail "symlink $_dir/link lost"
    vt_log "verified $_want files under $_dir"
}

# vt_print_manifest MANIFEST PREFIX: prints the checksums for the host (paths under PREFIX).
vt_print_manifest() {
    while read -r sum path; do
        echo "VMTEST: MANIFEST $sum  $2/${path#./}"
    done <"$1"
}

# vt_fsck DEVICE: e2fsck -fn must find the filesystem clean.
vt_fsck() {
    vt_log "e2fsck -fn $1"
    _out=$(timeout 300 e2fsck -fn "$1" 2>&1)
    _rc=$?
    echo "$_out" | sed 's/^/[e2fsck] /'
    [ "$_rc" = 0 ] || vt_fail "e2fsck -fn $1 found problems (exit $_rc)"
}

# vt_mount_cycle [nbd-client options...]: scenario 1's body. Connect, mkfs.ext4, mount, write
# the tree, sync, unmount, disconnect; reconnect (so every read below comes from the server),
# e2fsck -fn clean, mount, verify every checksum, unmount, disconnect.
vt_mount_cycle() {
    vt_nbd_connect "$NBD_DEV" "$VMT_PORT" "$@"
    vt_run 300 "mkfs.ext4 $NBD_DEV" mkfs.ext4 -q -F "$NBD_DEV"
    vt_run 60 "mount $NBD_DEV $MNT" mount -t ext4 "$NBD_DEV" "$MNT"
    vt_make_tree "$MNT/tree" /run/manifest
    vt_run 300 "sync" sync
    vt_run 120 "umount $MNT" umount "$MNT"
    vt_nbd_disconnect "$NBD_DEV"

    vt_nbd_connect "$NBD_DEV" "$VMT_PORT" "$@"
    vt_fsck "$NBD_DEV"
    vt_run 60 "mount $NBD_DEV $MNT again" mount -t ext4 "$NBD_DEV" "$MNT"
    vt_verify_tree "$MNT/tree" /run/manifest
    vt_run 120 "umount $MNT" umount "$MNT"
    vt_nbd_disconnect "$NBD_DEV"
    vt_print_manifest /run/manifest tree
}

# --- host-to-guest control channel (second serial port, a pipe on the host) -------------------
# vt_wait_host WORD SECONDS: waits for a line "WORD args" from the host (init copies the second
# serial port to /run/from-host); prints args. Only complete lines count: the serial port
# delivers a line in pieces, and "promoted 1" must not be read while "promoted 12345" arrives.
vt_wait_host() {
    i=0
    while [ $i -lt $(($2 * 10)) ]; do
        _line=
        if [ -s /run/from-host ] && [ -z "$(tail -c 1 /run/from-host)" ]; then
            _line=$(tr -d '\r' </run/from-host 2>/dev/null | grep -m1 -E "^$1( |\$)")
        fi
        if [ -n "$_line" ]; then
            echo "${_line#$1}" | sed 's/^ //'
            return 0
        fi
        sleep 0.1
        i=$((i + 1))
    done
    return 1
}

# --- crash/failover helpers (scenario 2 and the single-node crash scenario) --------------------
# vt_start_writer DIR LOG: background writer; each 256 KiB file is written with dd conv=fsync
# and its directory fsynced, and only then its checksum is appended to LOG. Prints the pid.
vt_start_writer() {
    (
        i=0
        while :; do
            i=$((i + 1))
            f=$1/w$i.bin
            head -c 262144 /dev/urandom >/run/writer.tmp || exit 1
            dd if=/run/writer.tmp of="$f" bs=64k conv=fsync 2>/dev/null || exit 1
            sync "$1" || exit 1
            echo "$(sha256sum </run/writer.tmp | cut -d' ' -f1)  ./w$i.bin" >>"$2"
        done
    ) >/dev/null 2>&1 &
    echo $!
}

# vt_wait_lines FILE N SECONDS: waits until FILE has at least N lines.
vt_wait_lines() {
    i=0
    while [ "$(wc -l <"$1" 2>/dev/null || echo 0)" -lt "$2" ]; do
        [ $i -lt $(($3 * 10)) ] || return 1
        sleep 0.1
        i=$((i + 1))
    done
}

# vt_crash_cycle HOSTWORD [nbd-client options...]: the guest half of "the server dies under a
# mounted filesystem with a writer running". Mount a fresh ext4, start the fsync writer, emit
# EVENT writer-running once 20 files are durable, wait for the host's "HOSTWORD PORT" (the host
# has killed the server with SIGKILL and brought up the new one on PORT), drop the dead device,
# connect /dev/nbd1 to PORT, mount (the journal replays), unmount, e2fsck -fn must be clean, mount
# again and every file fsynced before the kill must be intact.
vt_crash_cycle() {
    _word=$1
    shift
    vt_nbd_connect "$NBD_DEV" "$VMT_PORT" -t 20 "$@"
    vt_run 300 "mkfs.ext4 $NBD_DEV" mkfs.ext4 -q -F "$NBD_DEV"
    vt_run 60 "mount $NBD_DEV $MNT" mount -t ext4 "$NBD_DEV" "$MNT"
    mkdir -p "$MNT/w" && sync "$MNT" || vt_fail "mkdir $MNT/w"
    : >/run/fsynced
    writer=$(vt_start_writer "$MNT/w" /run/fsynced)
    vt_wait_lines /run/fsynced 20 300 || vt_fail "the writer made fewer than 20 files durable in 300 s"
    vt_event writer-running
    vt_log "writer running (pid $writer); waiting for the host's '$_word'"
    _port=$(vt_wait_host "$_word" 300) || vt_fail "no '$_word' from the host within 300 s"
    vt_log "host says $_word: new server on port $_port; $(wc -l </run/fsynced) files were fsynced"
    cp /run/fsynced /run/fsynced.at-kill
    kill "$writer" 2>/dev/null
    # The old device's server is gone: drop the mount and the device without flushing to it.
    timeout 60 umount -l "$MNT" || vt_log "lazy umount of the dead mount failed"
    timeout 60 nbd-client -d "$NBD_DEV" || vt_log "nbd-client -d $NBD_DEV failed (server gone)"

    vt_nbd_connect /dev/nbd1 "$_port" "$@"
    vt_run 120 "mount /dev/nbd1 $MNT (journal replay)" mount -t ext4 /dev/nbd1 "$MNT"
    vt_run 120 "umount $MNT" umount "$MNT"
    vt_fsck /dev/nbd1
    vt_run 60 "mount /dev/nbd1 $MNT again" mount -t ext4 /dev/nbd1 "$MNT"
    # Files fsynced before the host acted must be intact; later ones may be missing or partial.
    _bad=$(cd "$MNT/w" && sha256sum -c /run/fsynced.at-kill 2>/dev/null | grep -v ': OK$')
    [ -z "$_bad" ] || vt_fail "$(echo "$_bad" | wc -l) of $(wc -l </run/fsynced.at-kill) fsynced files lost or damaged: $(echo "$_bad" | sed 's#^\./##; s#: .*##' | head -n 8 | tr '\n' ' ')"
    vt_log "all $(wc -l </run/fsynced.at-kill) fsynced files intact"
    vt_run 120 "umount $MNT" umount "$MNT"
    vt_nbd_disconnect /dev/nbd1
}
