# vm-tests/host/scenario-2.sh: host side of scenario 2 (failover under a mounted filesystem).
# A 2-node protocol C cluster on the host: alpha Primary, beta Secondary, in sync. The guest
# mounts ext4 from alpha's export and runs an fsync writer; then alpha is killed with SIGKILL,
# beta is promoted with `blockctl promote` (no --force: beta must be UpToDate), and the guest
# reconnects to beta's export (guest/scenario-2.sh, shared with the crash scenario).
SCENARIO_TITLE="failover under a mounted ext4"

host_prepare() {
    vmt_cluster_up C 512M alpha beta || return 1
    GUEST_PORT=$alpha_NBD_PORT
    GUEST_EXPORT=$CLUSTER_RES
}

host_during() {
    vmt_wait_guest_event writer-running 600 || return 0 # the guest reports why
    # Kill at a random moment of the running writer (0 to 1.5 s after its 20th durable file).
    local ms=$((RANDOM % 1500))
    sleep "$((ms / 1000)).$(printf '%03d' $((ms % 1000)))"
    vmt_log "before the kill (${ms} ms after writer-running): $(vmt_cluster_status alpha)"
    vmt_cluster_kill alpha
    # beta may take a moment to notice the lost peer; promote retries while refused by state.
    vmt_cluster_promote beta 30 || return 1
    vmt_log "after the promotion: $(vmt_cluster_status beta)"
    vmt_send_guest "promoted $beta_NBD_PORT"
}

host_check() {
    vmt_cluster_stop beta || return 1
    e2fsck -fn "$beta_IMG" >"$RUNDIR/host-e2fsck.log" 2>&1 || {
        vmt_log "host e2fsck -fn on beta's backing file found problems:"
        tail -n 20 "$RUNDIR/host-e2fsck.log" | sed 's/^/  | /' >&2
        return 1
    }
}

host_cleanup() {
    vmt_cluster_kill alpha
    vmt_cluster_stop beta
    rm -f "${alpha_IMG:-}" "${beta_IMG:-}"
}
