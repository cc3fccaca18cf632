# vm-tests/host/scenario-4.sh: host side of scenario 4 (resync under a mounted filesystem).
# A 2-node protocol C cluster: alpha Primary, beta Secondary. The guest writes tree A on
# alpha's export; beta is disconnected (`blockctl disconnect` on beta); the guest writes tree B
# and unmounts; beta reconnects (`blockctl connect`) and resyncs the blocks alpha marked out of
# sync; alpha is demoted and beta promoted (no --force: it must be UpToDate); the guest mounts
# beta's export and checks both trees (guest/scenario-4.sh).
SCENARIO_TITLE="resync under a mounted ext4"

host_prepare() {
    vmt_cluster_up C 512M alpha beta || return 1
    GUEST_PORT=$alpha_NBD_PORT
    GUEST_EXPORT=$CLUSTER_RES
}

# peer_field NAME FIELD: FIELD of NAME's (one) peer in `blockctl status --json`.
peer_field() {
    timeout 10 "$BLOCKCTL" --config "$CLUSTER_CONF" --node "$1" status "$CLUSTER_RES" --json |
        jq -r ".peers[0].$2"
}

host_during() {
    vmt_wait_guest_event tree-a-written 600 || return 0 # the guest reports why
    vmt_cluster_wait_synced alpha 60 || return 1
    vmt_ctl beta disconnect "$CLUSTER_RES" || return 1
    # Tree B must be written while alpha knows beta is gone (and so tracks it in the bitmap).
    local i
    for ((i = 0; ; i++)); do
        [[ $(peer_field alpha connection) != connected ]] && break
        ((i < 150)) || {
            vmt_log "alpha still sees beta connected 30 s after beta disconnected"
            return 1
        }
        sleep 0.2
    done
    vmt_log "beta disconnected: $(vmt_cluster_status alpha)"
    vmt_send_guest secondary-disconnected
    vmt_wait_guest_event unmounted 600 || return 0
    local dirty
    dirty=$(peer_field alpha out_of_sync_bytes) || return 1
    vmt_log "tree B written while beta was away: alpha has $dirty bytes out of sync for beta"
    ((dirty > 0)) || {
        vmt_log "alpha tracked no out-of-sync bytes for the disconnected beta"
        return 1
    }
    local started=$SECONDS
    vmt_ctl beta connect "$CLUSTER_RES" || return 1
    vmt_ctl alpha wait-sync "$CLUSTER_RES" --timeout 300 >/dev/null || return 1
    vmt_cluster_wait_synced alpha 60 || return 1
    vmt_log "resync of $dirty bytes done in $((SECONDS - started)) s: $(vmt_cluster_status alpha)"
    vmt_ctl alpha demote "$CLUSTER_RES" >/dev/null || return 1
    vmt_cluster_promote beta 30 || return 1
    vmt_log "roles swapped: $(vmt_cluster_status beta)"
    vmt_send_guest "promoted $beta_NBD_PORT"
}

host_check() {
    # The guest's mount on beta replicated back to alpha: both data areas must be identical.
    local size
    size=$(timeout 10 "$BLOCKCTL" --config "$CLUSTER_CONF" --node beta status "$CLUSTER_RES" --json | jq -r .size) || return 1
    vmt_cluster_wait_synced beta 60 || return 1
    vmt_cluster_stop beta || return 1
    vmt_cluster_stop alpha || return 1
    e2fsck -fn "$beta_IMG" >"$RUNDIR/host-e2fsck.log" 2>&1 || {
        vmt_log "host e2fsck -fn on beta's backing file found problems:"
        tail -n 20 "$RUNDIR/host-e2fsck.log" | sed 's/^/  | /' >&2
        return 1
    }
    cmp -n "$size" "$alpha_IMG" "$beta_IMG" >"$RUNDIR/host-cmp.log" 2>&1 || {
        vmt_log "alpha's and beta's data areas differ: $(cat "$RUNDIR/host-cmp.log")"
        return 1
    }
    vmt_log "host check: beta's backing file fsck clean; alpha and beta identical ($size bytes)"
}

host_cleanup() {
    vmt_cluster_stop beta
    vmt_cluster_stop alpha
    rm -f "${alpha_IMG:-}" "${beta_IMG:-}"
}
