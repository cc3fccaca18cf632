# vm-tests/host/scenario-4.sh: host side of scenario 4 (resync under a mounted filesystem).
# The guest half is guest/scenario-4.sh.
SCENARIO_TITLE="resync under a mounted ext4"

# TODO(issue 3): replication and `blockctl promote` do not exist yet. When they do:
#   host_prepare: start a primary and a secondary blockd (replicating), GUEST_PORT=the primary's;
#   host_during:  vmt_wait_guest_event tree-a-written 600; disconnect the secondary;
#                 vmt_send_guest secondary-disconnected; vmt_wait_guest_event unmounted 600;
#                 reconnect the secondary, wait until its resync is done, promote it;
#                 vmt_send_guest "promoted $secondary_PORT";
#   host_check:   stop both gracefully; e2fsck -fn the promoted node's backing file;
#   host_cleanup: stop every blockd started.
host_prepare() {
    HOST_SKIP="needs failover (issue 3): replication, resync and blockctl promote are not built yet"
}
