# vm-tests/host/scenario-1.sh: host side of scenario 1 (ext4 over plain NBD, single node).
# Hooks run.sh calls: host_prepare (before boot), host_check (after a guest PASS), host_cleanup.
SCENARIO_TITLE="ext4 over NBD"

host_prepare() {
    vmt_start_blockd primary --backing "$RUNDIR/primary.img" --size 512M --export blockd || return 1
    GUEST_PORT=$primary_PORT
    GUEST_EXPORT=blockd
}

host_check() {
    vmt_stop_blockd primary || return 1
    vmt_check_backing "$RUNDIR/primary.img"
}

host_cleanup() {
    vmt_stop_blockd primary
    rm -f "$RUNDIR/primary.img"
}
