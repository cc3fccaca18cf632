#!/usr/bin/env bash
# NBD server benchmark (not a test): fio --ioengine=nbd against blockd, `nbdkit file` and
# qemu-nbd on the same backing file, plus fio --ioengine=io_uring on the file itself as the
# physical limit. Jobs: 4k randwrite/randread at iodepth 32, 1 MiB seq write/read at iodepth 8.
# Servers run in a rotated order on every repetition; the table shows medians, and a second
# table the server's CPU time per request (utime+stime from /proc over the fio run, all server
# threads), a measure that a busy machine disturbs much less than throughput.
#
# Usage: bench/nbd-bench.sh [options]
#   --dirs "D1 D2"       backing directories (default: "/dev/shm /var/tmp")
#   --size SIZE          backing file size for fio/qemu-img (default 1G)
#   --runtime S          seconds per fio job (default 10)
#   --reps N             repetitions (default 3)
#   --servers "..."      any of: blockd blockd-uring blockd-sync blockd-b nbdkit qemu-nbd[:AIO] raw
#                        where AIO is a qemu-nbd --aio mode (threads, io_uring; default threads)
#                        and blockd-b is a second blockd binary (BLOCKD_B) for A/B runs
#                        (default: "blockd nbdkit qemu-nbd:threads qemu-nbd:io_uring raw")
#   --jobs "..."         any of: randwrite randread seqwrite seqread (default: all four)
#   --results FILE       raw per-run results (TSV) are written here (default: a temp file)
#   --no-build           use the existing target/release/blockd
#   --quick              --runtime 3 --reps 1
# Environment: BLOCKD=/path/to/blockd overrides the built binary; BLOCKD_B=/path/to/blockd is
# the binary of server blockd-b (e.g. a build from before a change, in the same run);
# BLOCKD_SAME_HOST_CONGESTION=system|NAME is blockd's --same-host-congestion (default cubic;
# `system` runs it on the system's default, as nbdkit and qemu-nbd do).
set -euo pipefail

DIRS="/dev/shm /var/tmp"
SIZE=1G
RUNTIME=10
REPS=3
SERVERS="blockd nbdkit qemu-nbd:threads qemu-nbd:io_uring raw"
JOBS="randwrite randread seqwrite seqread"
RESULTS=""
BUILD=1

while [ $# -gt 0 ]; do
    case "$1" in
        --dirs) DIRS=$2; shift 2 ;;
        --size) SIZE=$2; shift 2 ;;
        --runtime) RUNTIME=$2; shift 2 ;;
        --reps) REPS=$2; shift 2 ;;
        --servers) SERVERS=$2; shift 2 ;;
        --jobs) JOBS=$2; shift 2 ;;
        --results) RESULTS=$2; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        --quick) RUNTIME=3; REPS=1; shift ;;
        -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
        *) echo "unknown option: $1" >&2; exit 2 ;;
    esac
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=/usr/bin/python3

need() {
    command -v "$1" >/dev/null 2>&1 || { echo "missing tool: $1 ($2)" >&2; exit 1; }
}
need fio "apt-get install fio"
need jq "apt-get install jq"
need nbdinfo "apt-get install libnbd-bin"
[ -x "$PY" ] || { echo "missing $PY" >&2; exit 1; }
case " $SERVERS " in *" nbdkit "*) need nbdkit "apt-get install nbdkit" ;; esac
case " $SERVERS " in *" qemu-nbd"*) need qemu-nbd "apt-get install qemu-utils" ;; esac
fio --enghelp=nbd >/dev/null 2>&1 || { echo "this fio has no nbd engine" >&2; exit 1; }

if [[ " $SERVERS " == *" blockd"* ]]; then
    if [ -n "${BLOCKD:-}" ]; then
        :
    else
        if [ "$BUILD" = 1 ]; then
            (cd "$ROOT" && cargo build -p blockd --release --quiet)
        fi
        TARGET_DIR=$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps | jq -r .target_directory)
        BLOCKD=$TARGET_DIR/release/blockd
    fi
    [ -x "$BLOCKD" ] || { echo "no blockd binary at $BLOCKD" >&2; exit 1; }
fi

WORK=$(mktemp -d /tmp/nbd-bench.XXXXXX)
[ -n "$RESULTS" ] || RESULTS=$(mktemp /tmp/nbd-bench-results.XXXXXX.tsv)
: >"$RESULTS"
SERVER_PID=""
BACKINGS=()

cleanup() {
    stop_server
    for f in "${BACKINGS[@]}"; do rm -f "$f"; done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
    local p
    while :; do
        p=$((20000 + RANDOM % 30000))
        if ! ss -Hltn "sport = :$p" | grep -q .; then echo "$p"; return; fi
    done
}

stop_server() {
    if [ -n "$SERVER_PID" ]; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
        SERVER_PID=""
    fi
}

# start_server NAME FILE PORT -> sets SERVER_PID and URI; waits until it answers NBD.
start_server() {
    local name=$1 file=$2 port=$3 log=$WORK/${1//:/-}.log
    case "$name" in
        blockd|blockd-uring|blockd-sync|blockd-b)
            local engine=auto bin=$BLOCKD
            [ "$name" = blockd-uring ] && engine=uring
            [ "$name" = blockd-sync ] && engine=sync
            [ "$name" = blockd-b ] && bin=${BLOCKD_B:?blockd-b needs BLOCKD_B=/path/to/blockd}
            "$bin" standalone --backing "$file" --listen "127.0.0.1:$port" \
                --export bench --io-engine "$engine" \
                --same-host-congestion "${BLOCKD_SAME_HOST_CONGESTION:-cubic}" >"$log" 2>&1 &
            SERVER_PID=$!
            URI="nbd://127.0.0.1:$port/bench" ;;
        nbdkit)
            nbdkit --foreground --ipaddr 127.0.0.1 --port "$port" --exportname bench \
                file "file=$file" >"$log" 2>&1 &
            SERVER_PID=$!
            URI="nbd://127.0.0.1:$port/bench" ;;
        qemu-nbd|qemu-nbd:*)
            local aio=threads
            [ "$name" = qemu-nbd ] || aio=${name#qemu-nbd:}
            qemu-nbd -f raw --cache=writeback --aio="$aio" --persistent --shared=8 \
                --bind 127.0.0.1 --port "$port" --export-name bench "$file" >"$log" 2>&1 &
            SERVER_PID=$!
            URI="nbd://127.0.0.1:$port/bench" ;;
        *) echo "unknown server $name" >&2; exit 2 ;;
    esac
    local i
    for i in $(seq 1 100); do
        if nbdinfo --size "$URI" >/dev/null 2>&1; then return 0; fi
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            echo "$name died at startup:" >&2; cat "$log" >&2; exit 1
        fi
        sleep 0.1
    done
    echo "$name did not answer on $URI" >&2; cat "$log" >&2; exit 1
}

# job_args JOB -> fio arguments for the workload.
job_args() {
    case "$1" in
        randwrite) echo "--rw=randwrite --bs=4k --iodepth=32" ;;
        randread) echo "--rw=randread --bs=4k --iodepth=32" ;;
        seqwrite) echo "--rw=write --bs=1M --iodepth=8" ;;
        seqread) echo "--rw=read --bs=1M --iodepth=8" ;;
        *) echo "unknown job $1" >&2; exit 2 ;;
    esac
}

# cpu_ticks PID: user+system clock ticks used so far by the process (all its threads).
cpu_ticks() {
    awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0
}
CLK_TCK=$(getconf CLK_TCK)

# run_fio SERVER JOB FILE LOCATION REP: one fio run, appends
# "loc server job rep iops MiB/s cpu-us-per-request" (cpu "-" for raw).
run_fio() {
    local server=$1 job=$2 file=$3 loc=$4 rep=$5 out=$WORK/fio.json dir=read
    case "$job" in *write) dir=write ;; esac
    sync
    local common=(--name="$job" --size="$SIZE" --time_based --runtime="$RUNTIME"
        --ramp_time=1 --numjobs=1 --group_reporting --output-format=json --output="$out")
    local t0=0
    [ "$server" = raw ] || t0=$(cpu_ticks "$SERVER_PID")
    # shellcheck disable=SC2046
    if [ "$server" = raw ]; then
        fio "${common[@]}" --ioengine=io_uring --direct=0 --filename="$file" \
            $(job_args "$job") >/dev/null
    else
        fio "${common[@]}" --ioengine=nbd --uri="$URI" $(job_args "$job") >/dev/null
    fi
    local iops mibs cpu=-
    iops=$(jq -r ".jobs[0].$dir.iops" "$out")
    mibs=$(jq -r ".jobs[0].$dir.bw_bytes / 1048576" "$out")
    if [ "$server" != raw ]; then
        # CPU over ramp + run divided by the requests of both (fio counts the run only).
        local t1 ios
        t1=$(cpu_ticks "$SERVER_PID")
        ios=$(jq -r "(.jobs[0].$dir.iops * ($RUNTIME + 1))" "$out")
        cpu=$(awk -v d=$((t1 - t0)) -v n="$ios" -v hz="$CLK_TCK" \
            'BEGIN { if (n > 0) printf "%.2f", d * 1e6 / hz / n; else print "-" }')
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$loc" "$server" "$job" "$rep" "$iops" "$mibs" "$cpu" >>"$RESULTS"
    # The client's own CPU per request (fio's usr+sys over its run): it varies between fio
    # processes (the copy into the socket costs 2-3x more in some runs, whatever the server),
    # so a slow run with a high figure here is the client's, not the server's.
    local client
    client=$(jq -r ".jobs[0] | if .$dir.iops > 0 then (.usr_cpu + .sys_cpu) * 1e4 / .$dir.iops else 0 end" "$out")
    printf '  %-8s %-12s %-9s rep %s: %10.0f IOPS %8.1f MiB/s %8s us CPU/req (fio %.1f us/req)\n' \
        "$loc" "$server" "$job" "$rep" "$iops" "$mibs" "$cpu" "$client"
}

read -r -a server_list <<<"$SERVERS"
echo "# $(date -u +%Y-%m-%dT%H:%MZ) $(uname -r) $(nproc) CPUs; size=$SIZE runtime=${RUNTIME}s reps=$REPS"
# The system's TCP congestion control is what nbdkit and qemu-nbd use over loopback; blockd
# switches its same-host connections to cubic unless told otherwise (--same-host-congestion).
echo "# tcp congestion control: $(sysctl -n net.ipv4.tcp_congestion_control 2>/dev/null || echo unknown) (blockd same-host: ${BLOCKD_SAME_HOST_CONGESTION:-cubic})"
[ -n "${BLOCKD:-}" ] && echo "# blockd: $BLOCKD"
[ -n "${BLOCKD_B:-}" ] && echo "# blockd-b: $BLOCKD_B"
for dir in $DIRS; do
    mkdir -p "$dir"
    file=$(mktemp "$dir/nbd-bench.XXXXXX.img")
    BACKINGS+=("$file")
    loc=$(basename "$dir")
    [ "$dir" = /dev/shm ] && loc=tmpfs
    [ "$loc" = tmpfs ] || loc=disk:$dir
    echo "== $dir: filling $SIZE backing file $file"
    fio --name=fill --filename="$file" --size="$SIZE" --rw=write --bs=1M --ioengine=io_uring \
        --iodepth=8 --end_fsync=1 --output-format=terse >/dev/null
    n=${#server_list[@]}
    for rep in $(seq 1 "$REPS"); do
        for i in $(seq 0 $((n - 1))); do
            server=${server_list[$(((i + rep - 1) % n))]}
            if [ "$server" != raw ]; then
                start_server "$server" "$file" "$(free_port)"
            fi
            for job in $JOBS; do
                run_fio "$server" "$job" "$file" "$loc" "$rep"
            done
            stop_server
        done
    done
done

echo
"$PY" - "$RESULTS" <<'EOF'
import collections, statistics, sys

runs = collections.defaultdict(list)
cpu = collections.defaultdict(list)
order_loc, order_srv, order_job = [], [], []
for line in open(sys.argv[1]):
    loc, srv, job, rep, iops, mibs, c = line.rstrip("\n").split("\t")
    runs[(loc, srv, job)].append((float(iops), float(mibs)))
    if c != "-":
        cpu[(loc, srv, job)].append(float(c))
    for seen, v in ((order_loc, loc), (order_srv, srv), (order_job, job)):
        if v not in seen:
            seen.append(v)

labels = {"randwrite": "4k randwrite QD32", "randread": "4k randread QD32",
          "seqwrite": "1M seq write QD8", "seqread": "1M seq read QD8"}
peers = [s for s in order_srv if s == "nbdkit" or s.startswith("qemu-nbd")]
mine = [s for s in order_srv if s.startswith("blockd")]

def med(loc, srv, job):
    v = runs.get((loc, srv, job))
    if not v:
        return None
    # 4k jobs compare IOPS, 1M jobs MiB/s
    idx = 0 if job.startswith("rand") else 1
    return statistics.median(x[idx] for x in v)

for loc in order_loc:
    print(f"### {loc} (median of {max(len(v) for k, v in runs.items() if k[0] == loc)} runs; "
          "4k jobs in IOPS, 1M jobs in MiB/s)\n")
    head = ["job"] + order_srv
    for m in mine:
        if peers:
            head.append(f"{m}/best peer")
        if "raw" in order_srv:
            head.append(f"{m}/raw")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for job in order_job:
        row = [labels.get(job, job)]
        for srv in order_srv:
            v = med(loc, srv, job)
            row.append("-" if v is None else (f"{v:,.0f}" if job.startswith("rand") else f"{v:,.0f}"))
        for m in mine:
            b = med(loc, m, job)
            if peers:
                best = max((med(loc, p, job) or 0) for p in peers)
                row.append(f"{b / best:.2f}x" if b and best else "-")
            if "raw" in order_srv:
                r = med(loc, "raw", job)
                row.append(f"{b / r:.2f}x" if b and r else "-")
        print("| " + " | ".join(row) + " |")
    print()
    servers = [s for s in order_srv if s != "raw"]
    if not servers:
        continue
    print(f"Server CPU per request on {loc}, microseconds (median; lower is better)\n")
    head = ["job"] + servers + [f"{m}/best peer" for m in mine if peers]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for job in order_job:
        med_cpu = {s: statistics.median(cpu[(loc, s, job)]) for s in servers if cpu.get((loc, s, job))}
        row = [labels.get(job, job)] + [f"{med_cpu[s]:.1f}" if s in med_cpu else "-" for s in servers]
        for m in mine:
            if peers:
                best = min((med_cpu[p] for p in peers if p in med_cpu), default=None)
                row.append(f"{med_cpu[m] / best:.2f}x" if m in med_cpu and best else "-")
        print("| " + " | ".join(row) + " |")
    print()
EOF
echo "raw results: $RESULTS"
