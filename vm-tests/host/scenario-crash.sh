# vm-tests/host/scenario-crash.sh: the single-node half of scenario 2. Once the guest's fsync
# writer runs, blockd is killed with SIGKILL and started again on the same backing file (a new
# port); the guest reconnects and checks that every fsynced file survived.
SCENARIO_TITLE="blockd SIGKILL and restart under a mounted ext4"

host_prepare() {
    vmt_start_blockd primary --backing "$RUNDIR/primary.img" --size 512M --export blockd || return 1
    GUEST_PORT=$primary_PORT
    GUEST_EXPORT=blockd
}

host_during() {
    vmt_wait_guest_event writer-running 600 || return 0 # the guest reports why
    vmt_log "SIGKILL blockd (pid $primary_PID) under the running writer"
    kill -KILL "$primary_PID"
    wait "$primary_PID" 2>/dev/null || true
    primary_PID=""
    # The restarted server appends to the same log; a fresh log keeps the ready line unambiguous.
    mv "$RUNDIR/primary.log" "$RUNDIR/primary-killed.log"
    vmt_start_blockd primary --backing "$RUNDIR/primary.img" --export blockd || return 1
    vmt_send_guest "restarted $primary_PORT"
}

host_check() {
    vmt_stop_blockd primary || return 1
    e2fsck -fn "$RUNDIR/primary.img" >"$RUNDIR/host-e2fsck.log" 2>&1 || {
        vmt_log "host e2fsck -fn on the backing file found problems:"
        tail -n 20 "$RUNDIR/host-e2fsck.log" | sed 's/^/  | /' >&2
        return 1
    }
}

host_cleanup() {
    vmt_stop_blockd primary
    rm -f "$RUNDIR/primary.img"
}
