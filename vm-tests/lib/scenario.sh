# vm-tests/lib/scenario.sh: helpers for the host side of scenarios (sourced by run.sh).
# Owns: starting and stopping blockd, test certificates, and host-side checks of a backing file.
#
# Variables run.sh sets before a scenario's hooks run:
#   RUNDIR   this run's directory (logs, backing files, the guest config)
#   BLOCKD   the blockd binary
#   CONSOLE  the guest console log;  CTL  the pipe to the guest's /dev/ttyS1 (write lines to it)
#   GUEST    directory whose contents appear under /vmtest/ in the guest (config is added by run.sh)
#   BLOCKD_EXTRA_ARGS  array of extra blockd arguments from --blockd-arg (the broken-server hook)

# vmt_start_blockd NAME ARGS...: starts `blockd standalone ARGS... --listen 127.0.0.1:0`, waits
# for its ready line and sets NAME_PID and NAME_PORT. Its output goes to $RUNDIR/NAME.log.
vmt_start_blockd() {
    local name=$1
    shift
    local log=$RUNDIR/$name.log
    "$BLOCKD" standalone "$@" --listen 127.0.0.1:0 "${BLOCKD_EXTRA_ARGS[@]}" >"$log" 2>&1 &
    local pid=$!
    local ready
    if ! ready=$(vmt_wait_for_line "$log" '^blockd: serving export' 30 "$pid"); then
        vmt_log "blockd $name did not become ready; its log:"
        sed 's/^/  | /' "$log" >&2
        kill -KILL "$pid" 2>/dev/null || true
        return 1
    fi
    local port=${ready##*:}
    [[ $port =~ ^[0-9]+$ ]] || {
        vmt_log "cannot read the port from: $ready"
        return 1
    }
    printf -v "${name}_PID" '%s' "$pid"
    printf -v "${name}_PORT" '%s' "$port"
    vmt_log "blockd $name ready (pid $pid): ${ready#blockd: }"
}

# vmt_stop_blockd NAME: SIGTERM (graceful), SIGKILL after 20 s; fails unless it exited with 0.
vmt_stop_blockd() {
    local pidvar=${1}_PID
    local pid=${!pidvar:-}
    [[ -n $pid ]] || return 0
    printf -v "$pidvar" '%s' ""
    local rc=0
    vmt_stop "$pid" 20 || rc=$?
    if [[ $rc != 0 ]]; then
        vmt_log "blockd $1 exited with status $rc after SIGTERM; its log:"
        tail -n 20 "$RUNDIR/$1.log" | sed 's/^/  | /' >&2
        return 1
    fi
}

# vmt_make_certs DIR HOSTNAME: a CA, a server certificate for HOSTNAME, 10.0.2.2 and 127.0.0.1
# (the names the guest and the host use), and a client certificate, all EC P-256, valid 2 days.
# Writes the GnuTLS layout blockd reads (ca-cert.pem, server-cert.pem, server-key.pem) plus
# client-cert.pem and client-key.pem.
vmt_make_certs() {
    local dir=$1 host=$2
    mkdir -p "$dir"
    (
        set -e
        cd "$dir"
        local ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
        openssl req -x509 "${ec[@]}" -keyout ca-key.pem -out ca-cert.pem -days 2 \
            -subj "/CN=vm-tests CA" \
            -addext "basicConstraints=critical,CA:TRUE" \
            -addext "keyUsage=critical,keyCertSign,cRLSign"
        issue() { # issue NAME CN EXTENSIONS
            openssl req -new "${ec[@]}" -keyout "$1-key.pem" -out "$1.csr" -subj "/CN=$2"
            printf '%s\n' "$3" >"$1.ext"
            openssl x509 -req -in "$1.csr" -CA ca-cert.pem -CAkey ca-key.pem \
                -set_serial "0x$(openssl rand -hex 8)" -days 2 -extfile "$1.ext" -out "$1-cert.pem"
            rm -f "$1.csr" "$1.ext"
        }
        issue server "$host" "subjectAltName=DNS:$host,IP:10.0.2.2,IP:127.0.0.1
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth"
        issue client vmtest-guest "subjectAltName=DNS:vmtest-guest
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth"
        chmod 600 ./*-key.pem
    ) >"$RUNDIR/certs.log" 2>&1 || {
        vmt_log "making test certificates failed:"
        sed 's/^/  | /' "$RUNDIR/certs.log" >&2
        return 1
    }
}

# vmt_check_backing BACKING: host-side proof that the data reached blockd's backing file: e2fsck
# -fn on the file is clean, and the files the guest listed (VMTEST: MANIFEST lines on the
# console) have their checksums when debugfs copies them out of the image.
vmt_check_backing() {
    local backing=$1 out=$RUNDIR/extracted
    if ! e2fsck -fn "$backing" >"$RUNDIR/host-e2fsck.log" 2>&1; then
        vmt_log "host e2fsck -fn on the backing file found problems:"
        tail -n 20 "$RUNDIR/host-e2fsck.log" | sed 's/^/  | /' >&2
        return 1
    fi
    grep -a 'VMTEST: MANIFEST ' "$CONSOLE" | tr -d '\r' | sed 's/.*VMTEST: MANIFEST //' >"$RUNDIR/manifest"
    local files
    files=$(wc -l <"$RUNDIR/manifest")
    ((files > 0)) || {
        vmt_log "the guest printed no manifest"
        return 1
    }
    rm -rf "$out"
    mkdir -p "$out"
    local top
    for top in $(sed -E 's/^[0-9a-f]+  //; s#/.*##' "$RUNDIR/manifest" | sort -u); do
        debugfs -R "rdump /$top $out" "$backing" >"$RUNDIR/debugfs.log" 2>&1
    done
    if ! (cd "$out" && sha256sum --quiet -c "$RUNDIR/manifest") >"$RUNDIR/host-verify.log" 2>&1; then
        vmt_log "files copied out of the backing file differ from the guest's checksums:"
        head -n 20 "$RUNDIR/host-verify.log" | sed 's/^/  | /' >&2
        return 1
    fi
    rm -rf "$out"
    vmt_log "host check: backing file fsck clean, $files files match the guest's checksums"
}

# vmt_wait_guest_event NAME SECONDS: waits for "VMTEST: EVENT NAME" on the console; fails early
# when the VM has ended (or printed its result) without it.
vmt_wait_guest_event() {
    local deadline=$((SECONDS + $2))
    while ((SECONDS < deadline)); do
        grep -a -q "VMTEST: EVENT $1\\b" "$CONSOLE" 2>/dev/null && return 0
        grep -a -q 'VMTEST: RESULT ' "$CONSOLE" 2>/dev/null && return 1
        [[ -n ${QEMU_PID:-} ]] && ! kill -0 "$QEMU_PID" 2>/dev/null && return 1
        sleep 0.2
    done
    vmt_log "no guest event $1 within $2 s"
    return 1
}

# vmt_send_guest LINE: sends one line to the guest (its /dev/ttyS1, read by vt_wait_host).
vmt_send_guest() {
    printf '%s\n' "$*" >"$CTL"
    vmt_log "sent to guest: $*"
}
