#!/usr/bin/env bash
# Replication benchmark (not a test): fio --ioengine=nbd through the Primary's NBD export for
# protocols A, B and C with one and two secondaries (every node a separate blockd process on
# 127.0.0.1, all backing files in the same directory, i.e. on one disk), beside `blockd
# standalone` on the same kind of file. Prints IOPS, MiB/s, the ratio to standalone, and the CPU
# time each blockd process spent per request (utime+stime from /proc, a load-independent cost).
#
# Usage: bench/repl-bench.sh [options]
#   --dir DIR          backing directory (default /var/tmp)
#   --size SIZE        backing file size (default 1G)
#   --runtime S        seconds per fio job (default 10)
#   --configs "..."    any of: standalone A1 B1 C1 A2 B2 C2 (default: all)
#   --jobs "..."       any of: randwrite seqwrite (default: both)
#   --repeat N         run the whole set N times, interleaved; the table shows medians (default 1)
#   --perf DIR         also `perf record -g` every blockd process during each job into DIR
#   --no-build         use the existing target/release binaries
#   --bin-dir DIR      use blockd and blockctl from DIR (implies --no-build; A/B comparisons)
#   --quick            --runtime 4
set -euo pipefail

DIR=/var/tmp
SIZE=1G
RUNTIME=10
CONFIGS="standalone A1 B1 C1 A2 B2 C2"
JOBS="randwrite seqwrite"
REPEAT=1
PERF_DIR=
BUILD=1
BIN_DIR=
while [ $# -gt 0 ]; do
    case "$1" in
        --dir) DIR=$2; shift 2 ;;
        --size) SIZE=$2; shift 2 ;;
        --runtime) RUNTIME=$2; shift 2 ;;
        --configs) CONFIGS=$2; shift 2 ;;
        --jobs) JOBS=$2; shift 2 ;;
        --repeat) REPEAT=$2; shift 2 ;;
        --perf) PERF_DIR=$2; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        --bin-dir) BIN_DIR=$2; BUILD=0; shift 2 ;;
        --quick) RUNTIME=4; shift ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "unknown option: $1" >&2; exit 2 ;;
    esac
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
for t in fio jq nbdinfo; do command -v $t >/dev/null || { echo "missing tool: $t" >&2; exit 1; }; done
if [ "$BUILD" = 1 ]; then (cd "$ROOT" && cargo build -p blockd --release --bins --quiet); fi
if [ -z "$BIN_DIR" ]; then
    BIN_DIR=$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps | jq -r .target_directory)/release
fi
BLOCKD=$BIN_DIR/blockd
BLOCKCTL=$BIN_DIR/blockctl
TCK=$(getconf CLK_TCK)
if [ -n "$PERF_DIR" ]; then mkdir -p "$PERF_DIR"; fi

WORK=$(mktemp -d "$DIR/repl-bench.XXXXXX")
PIDS=()
stop_all() {
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    PIDS=()
}
cleanup() { stop_all; rm -rf "$WORK"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

port() { echo $((20000 + RANDOM % 30000)); }

wait_nbd() {
    for _ in $(seq 100); do nbdinfo --size "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done
    echo "no NBD server at $1" >&2; exit 1
}

# CPU ticks (user + system, all threads) of a process.
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# Context switches (voluntary + involuntary, all threads) of a process.
switches() { cat /proc/"$1"/task/*/status 2>/dev/null | awk '/ctxt_switches/ {n += $2} END {print n + 0}'; }

# setup CONFIG -> starts the servers (PIDS[0] is the one serving NBD), sets URI.
setup() {
    local cfg=$1 d=$WORK/$1
    rm -rf "$d"; mkdir -p "$d"
    if [ "$cfg" = standalone ]; then
        local p; p=$(port)
        "$BLOCKD" standalone --backing "$d/disk.img" --size "$SIZE" --listen "127.0.0.1:$p" \
            --export bench >"$d/log" 2>&1 &
        PIDS+=($!)
        URI="nbd://127.0.0.1:$p/bench"
        wait_nbd "$URI"
        return
    fi
    local proto=${cfg:0:1} n=$((${cfg:1:1} + 1)) base; base=$(port)
    {
        echo "[global]"
        echo "protocol = \"$proto\""
        echo "secret-file = \"secret\""
        echo "resync-rate = \"4G\""
        echo "control-socket = \"$d/{node}.sock\""
        echo "[global.tls]"
        echo "ca = \"certs/ca.pem\""
        echo "cert = \"certs/{node}.pem\""
        echo "key = \"certs/{node}.key\""
        for i in $(seq 0 $((n - 1))); do
            echo "[resource.bench.node.n$i]"
            echo "id = $i"
            echo "address = \"127.0.0.1:$((base + i))\""
            echo "nbd = \"127.0.0.1:$((base + 100 + i))\""
            echo "backing = \"n$i.img\""
        done
    } >"$d/cluster.toml"
    "$BLOCKCTL" --config "$d/cluster.toml" certs --dir "$d/certs" >/dev/null
    "$BLOCKCTL" --config "$d/cluster.toml" gen-secret "$d/secret"
    for i in $(seq 0 $((n - 1))); do
        truncate -s "$SIZE" "$d/n$i.img"
        "$BLOCKCTL" --config "$d/cluster.toml" --node "n$i" create-md bench >/dev/null
        "$BLOCKD" --config "$d/cluster.toml" --node "n$i" >"$d/n$i.log" 2>&1 &
        PIDS+=($!)
    done
    for i in $(seq 0 $((n - 1))); do
        for _ in $(seq 100); do
            "$BLOCKCTL" --config "$d/cluster.toml" --node "n$i" status bench >/dev/null 2>&1 && break
            sleep 0.1
        done
    done
    "$BLOCKCTL" --config "$d/cluster.toml" --node n0 promote bench --force
    "$BLOCKCTL" --config "$d/cluster.toml" --node n0 wait-sync bench --timeout 300 2>/dev/null
    URI="nbd://127.0.0.1:$((base + 100))/bench"
    wait_nbd "$URI"
}

job_args() {
    case "$1" in
        randwrite) echo "--rw=randwrite --bs=4k --iodepth=32" ;;
        seqwrite) echo "--rw=write --bs=1M --iodepth=8" ;;
        *) echo "unknown job $1" >&2; exit 2 ;;
    esac
}

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {if (NR==0) print "-"; else if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }

# Per (config, job): space-separated values, one per repetition.
declare -A IOPS MIBS RATIO CPU SA
echo "# $(date -u +%Y-%m-%dT%H:%MZ) $(uname -r) $(nproc) CPUs; dir=$DIR size=$SIZE runtime=${RUNTIME}s repeat=$REPEAT"
echo "# cpu/req: CPU microseconds per request of each blockd process (n0 = Primary), from /proc utime+stime"
for rep in $(seq "$REPEAT"); do
    for cfg in $CONFIGS; do
        setup "$cfg"
        for job in $JOBS; do
            out=$WORK/fio.json
            # Warm up (ramp) outside the measured window so CPU counters cover only it.
            # shellcheck disable=SC2046
            fio --name="$job" --ioengine=nbd --uri="$URI" --size="$SIZE" --time_based \
                --runtime=1 --output-format=json --output="$out" $(job_args "$job") >/dev/null
            declare -a before=() cs_before=()
            for p in "${PIDS[@]}"; do before+=("$(ticks "$p")"); cs_before+=("$(switches "$p")"); done
            perf_pids=()
            if [ -n "$PERF_DIR" ]; then
                for k in "${!PIDS[@]}"; do
                    perf record ${PERF_ARGS:--g} -o "$PERF_DIR/$cfg-$job-n$k.data" -p "${PIDS[$k]}" \
                        >/dev/null 2>&1 &
                    perf_pids+=($!)
                done
            fi
            # shellcheck disable=SC2046
            fio --name="$job" --ioengine=nbd --uri="$URI" --size="$SIZE" --time_based \
                --runtime="$RUNTIME" --output-format=json --output="$out" \
                $(job_args "$job") >/dev/null
            for p in "${perf_pids[@]}"; do kill -INT "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
            ios=$(jq -r '.jobs[0].write.total_ios' "$out")
            fiocpu=$(jq -r --argjson n "$ios" '(.jobs[0].usr_cpu + .jobs[0].sys_cpu) / 100 * .jobs[0].job_runtime * 1000 / ([$n, 1] | max) | . * 10 | round / 10' "$out")
            iops=$(jq -r '.jobs[0].write.iops' "$out")
            mibs=$(jq -r '.jobs[0].write.bw_bytes / 1048576' "$out")
            cpu=""
            cs=""
            for k in "${!PIDS[@]}"; do
                t=$(( $(ticks "${PIDS[$k]}") - ${before[$k]} ))
                cpu+="${cpu:+/}$(awk -v t="$t" -v n="$ios" -v h="$TCK" 'BEGIN {printf "%.1f", t / h * 1e6 / (n > 0 ? n : 1)}')"
                c=$(( $(switches "${PIDS[$k]}") - ${cs_before[$k]} ))
                cs+="${cs:+/}$(awk -v c="$c" -v n="$ios" 'BEGIN {printf "%.2f", c / (n > 0 ? n : 1)}')"
            done
            IOPS[$cfg,$job]+=" $iops"
            MIBS[$cfg,$job]+=" $mibs"
            CPU[$cfg,$job]+=" $cpu"
            if [ "$cfg" = standalone ]; then SA[$job]=$iops; fi
            if [ -n "${SA[$job]:-}" ]; then
                RATIO[$cfg,$job]+=" $(awk -v a="$iops" -v b="${SA[$job]}" 'BEGIN {printf "%.3f", a / b}')"
            fi
            printf '  run %d %-10s %-9s %8.0f IOPS %8.1f MiB/s  cpu/req(us) %s (fio %s)  switches/req %s\n' \
                "$rep" "$cfg" "$job" "$iops" "$mibs" "$cpu" "$fiocpu" "$cs"
        done
        stop_all
        rm -rf "${WORK:?}/$cfg"
    done
done

echo
printf '| config | job | IOPS | MiB/s | vs standalone | CPU us/req per node (n0/n1/..) |\n|---|---|---:|---:|---:|---|\n'
for cfg in $CONFIGS; do
    for job in $JOBS; do
        iops=$(echo "${IOPS[$cfg,$job]}" | median)
        mibs=$(echo "${MIBS[$cfg,$job]}" | median)
        ratio=$(echo "${RATIO[$cfg,$job]:-}" | median)
        # Median per node over the repetitions.
        nodes=$(echo "${CPU[$cfg,$job]}" | awk '{print split($1, a, "/")}')
        cpu=""
        for k in $(seq "$nodes"); do
            v=$(echo "${CPU[$cfg,$job]}" | tr ' ' '\n' | grep -v '^$' | cut -d/ -f"$k" | tr '\n' ' ' | median)
            cpu+="${cpu:+/}$v"
        done
        printf '| %s | %s | %.0f | %.1f | %s | %s |\n' "$cfg" "$job" "$iops" "$mibs" "$ratio" "$cpu"
    done
done
