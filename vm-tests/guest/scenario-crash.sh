# vm-tests/guest/scenario-crash.sh: the single-node half of scenario 2. The host kills blockd
# (SIGKILL) under a mounted filesystem with a writer running and restarts it on the same backing
# file, then sends "restarted PORT"; every file fsynced before the kill must be intact.
. /vmtest/guest/lib.sh
vt_crash_cycle restarted
vt_pass "blockd SIGKILLed and restarted: $(wc -l </run/fsynced.at-kill) fsynced files intact, e2fsck -fn clean after journal replay"
