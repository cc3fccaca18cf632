# vm-tests/host/scenario-2.sh: host side of scenario 2 (failover under a mounted filesystem).
# The guest half is guest/scenario-2.sh (shared with the crash scenario, which runs today).
SCENARIO_TITLE="failover under a mounted ext4"

# TODO(issue 3): replication and `blockctl promote` do not exist yet. When they do:
#   host_prepare: start a primary and a secondary blockd (replicating), GUEST_PORT=the primary's;
#   host_during:  vmt_wait_guest_event writer-running 600; kill -KILL the primary;
#                 blockctl promote the secondary; vmt_send_guest "promoted $secondary_PORT";
#   host_check:   stop the new primary gracefully; e2fsck -fn its backing file;
#   host_cleanup: stop every blockd started.
# A deliberately broken export (e.g. a --blockd-arg that makes the server drop FLUSH) must make
# this scenario FAIL; run.sh passes --blockd-arg values to every blockd it starts.
host_prepare() {
    HOST_SKIP="needs failover (issue 3): replication and blockctl promote are not built yet"
}
