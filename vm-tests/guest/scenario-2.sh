# vm-tests/guest/scenario-2.sh: failover under a mounted filesystem with a writer running. The
# host kills the primary (SIGKILL), runs `blockctl promote` on a secondary and sends
# "promoted PORT"; the guest reconnects to the new primary, the journal replays, e2fsck -fn is
# clean and every file fsynced before the kill is intact.
. /vmtest/guest/lib.sh
vt_crash_cycle promoted
vt_pass "failover: $(wc -l </run/fsynced.at-kill) fsynced files intact on the promoted secondary, e2fsck -fn clean after journal replay"
