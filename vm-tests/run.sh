#!/usr/bin/env bash
# vm-tests/run.sh: runs VM scenarios against the real Linux NBD client.
#
# Usage: run.sh [options] SCENARIO...
#   SCENARIO   1|mount  2|failover  3|tls  4|resync  crash  (or "all": 1 2 3 4 crash)
# Options:
#   --console          show the guest console live (qemu's serial on this terminal; Ctrl-A X quits)
#   --shell            with --console: a guest shell after the scenario (exit it to end the VM)
#   --timeout SECONDS  per-scenario limit for the VM (default 420)
#   --blockd-arg ARG   extra argument for every blockd the host starts (repeatable): the hook
#                      for running a scenario against a deliberately broken server, e.g.
#                      `--blockd-arg --debug-drop-flush 2` (replicated scenarios only) must FAIL
#   --no-build         do not run `cargo build --workspace --bins` (use the existing binary)
#   --strict           a SKIP counts as a failure
# Environment: VMTESTS_BLOCKD (blockd binary), VMTESTS_CACHE (cache dir, default vm-tests/.cache).
#
# For each scenario: start the host side (blockd on 127.0.0.1, a free port), boot the VM with
# qemu -accel tcg and user-mode networking (the guest reaches the host's loopback at 10.0.2.2),
# pass the scenario in a per-run config archive appended to the initramfs, read the console and
# take the guest's "VMTEST: RESULT" line; then run the host-side checks. Prints one line per
# scenario and a closing "vm-tests: N passed, N failed, N skipped"; exits 1 if any failed.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/host.sh"
source "$VMT_DIR/lib/scenario.sh"
source "$VMT_DIR/lib/cluster.sh"

console=0 shell=0 timeout_s=420 build=1 strict=0
BLOCKD_EXTRA_ARGS=()
scenarios=()
while (($#)); do
    case $1 in
    --console) console=1 ;;
    --shell) shell=1 ;;
    --timeout)
        timeout_s=${2:?--timeout needs seconds}
        shift
        ;;
    --blockd-arg)
        BLOCKD_EXTRA_ARGS+=("${2:?--blockd-arg needs a value}")
        shift
        ;;
    --no-build) build=0 ;;
    --strict) strict=1 ;;
    -h | --help)
        sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
        exit 0
        ;;
    all) scenarios+=(1 2 3 4 crash) ;;
    1 | mount) scenarios+=(1) ;;
    2 | failover) scenarios+=(2) ;;
    3 | tls) scenarios+=(3) ;;
    4 | resync) scenarios+=(4) ;;
    crash) scenarios+=(crash) ;;
    *) vmt_die "unknown argument or scenario: $1 (see --help)" ;;
    esac
    shift
done
((${#scenarios[@]})) || vmt_die "name at least one scenario (see --help)"
((shell == 0 || console == 1)) || vmt_die "--shell needs --console"
[[ $(id -u) == 0 ]] || vmt_die "run as root (apt downloads, device nodes in the initramfs)"

((console == 0)) || exec 3<&0 # the terminal, for qemu in --console mode
vmt_ensure_qemu
image=$("$VMT_DIR/build-image.sh")
if [[ -n ${VMTESTS_BLOCKD:-} ]]; then
    BLOCKD=$VMTESTS_BLOCKD
else
    if ((build)); then
        vmt_log "cargo build --workspace --bins"
        (cd "$VMT_ROOT" && cargo build -q --workspace --bins) || vmt_die "building blockd failed"
    fi
    BLOCKD=${CARGO_TARGET_DIR:-$VMT_ROOT/target}/debug/blockd
fi
[[ -x $BLOCKD ]] || vmt_die "no blockd binary at $BLOCKD"

# start_guest SECONDS: boots the VM in the background with $RUNDIR/initrd and sets QEMU_PID;
# the console goes to $CONSOLE (and to the terminal with --console, where qemu also reads the
# keyboard: Ctrl-A X quits). qemu's status is 124 when the time limit killed it.
start_guest() {
    # --foreground with --console: timeout otherwise puts qemu in its own process group, which
    # the terminal stops (SIGTTOU) when qemu sets it to raw mode.
    local fg=()
    ((console)) && fg=(--foreground)
    local qemu=(timeout "${fg[@]}" -k 10 "$1" qemu-system-x86_64 -accel tcg -cpu max -m 512 -smp 1
        -nodefaults -no-user-config -no-reboot -display none
        -kernel "$image/vmlinuz" -initrd "$RUNDIR/initrd"
        -append "console=ttyS0 panic=-1 $( ((console)) || echo quiet)"
        -netdev user,id=n0 -device virtio-net-pci,netdev=n0,romfile=
        -chardev "pipe,id=ctl,path=$RUNDIR/ctl")
    if ((console)); then
        "${qemu[@]}" -serial mon:stdio -serial chardev:ctl <&3 > >(tee "$CONSOLE") 2>&1 &
    else
        "${qemu[@]}" -serial stdio -serial chardev:ctl </dev/null >"$CONSOLE" 2>&1 &
    fi
    QEMU_PID=$!
}

# run_scenario N: runs one scenario in a subshell (its hooks and servers stay inside it) and
# writes "STATUS detail" to $RUNDIR/result.
run_scenario() {
    local n=$1
    RUNDIR=$VMT_CACHE/runs/$(date +%Y%m%d-%H%M%S)-scenario$n
    mkdir -p "$RUNDIR"
    (
        set -euo pipefail
        CONSOLE=$RUNDIR/console.log
        CTL=$RUNDIR/ctl.in
        GUEST=$RUNDIR/guest/vmtest
        mkdir -p "$GUEST"
        GUEST_CONFIG=()
        result() {
            printf '%s\n' "$*" >"$RUNDIR/result"
            exit 0
        }
        host_prepare() { :; }
        host_during() { :; }
        host_check() { :; }
        host_cleanup() { :; }
        source "$VMT_DIR/host/scenario-$n.sh"
        printf '%s\n' "$SCENARIO_TITLE" >"$RUNDIR/title"
        QEMU_PID="" CAT_PID=""
        trap 'set +e; [[ -n $QEMU_PID ]] && kill "$QEMU_PID" 2>/dev/null
            [[ -n $CAT_PID ]] && kill "$CAT_PID" 2>/dev/null; host_cleanup' EXIT

        HOST_SKIP=""
        host_prepare || result FAIL "host side failed to start (see $RUNDIR)"
        [[ -z $HOST_SKIP ]] || result SKIP "$HOST_SKIP"

        {
            printf 'VMT_SCENARIO=%s\nVMT_HOST=10.0.2.2\nVMT_PORT=%s\nVMT_EXPORT=%s\n' \
                "$n" "$GUEST_PORT" "$GUEST_EXPORT"
            printf 'VMT_DATE=%s\nVMT_SHELL=%s\nVMT_LOGLEVEL=%s\n' "$(date -u +%s)" "$shell" \
                "$((console ? 6 : 4))"
            printf '%s\n' "${GUEST_CONFIG[@]}"
        } >"$GUEST/config"
        # The per-run archive is appended to the cached initramfs; the kernel unpacks both.
        (cd "$RUNDIR/guest" && find . | LC_ALL=C sort | "$image/busybox" cpio -o -H newc 2>/dev/null) |
            gzip -1 >"$RUNDIR/config.cpio.gz"
        cat "$image/initramfs.gz" "$RUNDIR/config.cpio.gz" >"$RUNDIR/initrd"
        rm -f "$RUNDIR/ctl.in" "$RUNDIR/ctl.out"
        mkfifo "$RUNDIR/ctl.in" "$RUNDIR/ctl.out"
        cat "$RUNDIR/ctl.out" >"$RUNDIR/ctl-from-guest.log" &
        CAT_PID=$!

        local started=$SECONDS rc=0
        start_guest "$timeout_s"
        # The scenario's host steps run while the guest does (they watch $CONSOLE, write $CTL).
        if ! host_during; then
            vmt_stop "$QEMU_PID" 5 || true
            result FAIL "host steps during the run failed (see $RUNDIR)"
        fi
        wait "$QEMU_PID" || rc=$?
        QEMU_PID=""
        rm -f "$RUNDIR/initrd" # the cached image plus config.cpio.gz rebuild it
        local took=$((SECONDS - started))
        printf '%s\n' "$took" >"$RUNDIR/guest-seconds"

        local line
        line=$(grep -a -m1 'VMTEST: RESULT ' "$CONSOLE" | tr -d '\r' | sed 's/.*VMTEST: RESULT //' || true)
        if [[ -z $line ]]; then
            if [[ $rc == 124 || $rc == 137 ]]; then
                result FAIL "no result within ${timeout_s}s (VM killed)"
            fi
            result FAIL "the VM ended (qemu status $rc) without a result line"
        fi
        local status=${line%% *} detail=${line#* }
        detail=${detail#scenario=* }
        if [[ $status == PASS ]]; then
            host_check || result FAIL "guest passed but the host check failed: $detail"
        fi
        result "$status" "$detail"
    ) || printf 'FAIL host side of scenario %s exited with status %s\n' "$n" "$?" >"$RUNDIR/result"
}

# Keep the logs of the 20 latest scenario runs.
if [[ -d $VMT_CACHE/runs ]]; then
    ls -1d "$VMT_CACHE"/runs/*/ 2>/dev/null | sort | head -n -20 | xargs -r rm -rf
fi
passed=0 failed=0 skipped=0
for n in "${scenarios[@]}"; do
    started=$SECONDS
    run_scenario "$n"
    took=$((SECONDS - started))
    read -r status detail <"$RUNDIR/result" || status=FAIL
    title=$(cat "$RUNDIR/title" 2>/dev/null || echo "?")
    printf 'vm-tests: scenario %s (%s): %s in %ss: %s\n' "$n" "$title" "$status" "$took" "$detail"
    case $status in
    PASS) passed=$((passed + 1)) ;;
    SKIP) skipped=$((skipped + 1)) ;;
    *)
        failed=$((failed + 1))
        if ((console == 0)); then
            printf 'vm-tests: scenario %s console (last 80 lines of %s):\n' "$n" "$RUNDIR/console.log"
            tail -n 80 "$RUNDIR/console.log" 2>/dev/null | sed 's/^/  | /'
        fi
        ;;
    esac
done
if ((strict)); then
    failed=$((failed + skipped))
fi
printf 'vm-tests: %d passed, %d failed, %d skipped\n' "$passed" "$failed" "$skipped"
((failed == 0))
