#!/usr/bin/env bash
# Readable-secondary benchmark (not a test): fio 4k random writes at depth 32 through the
# Primary's NBD export of a 2-node protocol C cluster (both nodes separate blockd processes on
# 127.0.0.1, backing files in one directory), alternately without a snapshot and with one open on
# the Secondary (a fresh snapshot per run, its copy-on-write area as large as the device so it
# never fills). Prints IOPS, the with/without ratio (target >= 0.8), and the copy-on-write bytes
# per overwritten block and per write, and each node's CPU time per write (utime+stime from
# /proc/PID/stat over the fio run: on a shared machine this is steadier than IOPS).
#
# Usage: bench/snapshot-bench.sh [--dir DIR] [--size SIZE] [--runtime S] [--repeat N] [--no-build]
#                               [--bin-dir DIR (blockd and blockctl from there, e.g. an older build)]
#                               [--perf PREFIX (perf record -g of the Secondary: PREFIX.without.data
#                                and PREFIX.with.data, last repetition)]
set -euo pipefail

DIR=/var/tmp
SIZE=1G
RUNTIME=10
REPEAT=3
BUILD=1
BIN_DIR=""
PERF=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dir) DIR=$2; shift 2 ;;
        --size) SIZE=$2; shift 2 ;;
        --runtime) RUNTIME=$2; shift 2 ;;
        --repeat) REPEAT=$2; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        --bin-dir) BIN_DIR=$2; BUILD=0; shift 2 ;;
        --perf) PERF=$2; shift 2 ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "unknown option: $1" >&2; exit 2 ;;
    esac
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
for t in fio jq nbdinfo; do command -v $t >/dev/null || { echo "missing tool: $t" >&2; exit 1; }; done
if [ "$BUILD" = 1 ]; then (cd "$ROOT" && cargo build -p blockd --release --bins --quiet); fi
[ -n "$BIN_DIR" ] || BIN_DIR=$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps | jq -r .target_directory)/release
BLOCKD=$BIN_DIR/blockd
BLOCKCTL=$BIN_DIR/blockctl

WORK=$(mktemp -d "$DIR/snapshot-bench.XXXXXX")
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

base=$((20000 + RANDOM % 30000))
C=$WORK/cluster.toml
{
    echo "[global]"
    echo "protocol = \"C\""
    echo "secret-file = \"secret\""
    echo "control-socket = \"$WORK/{node}.sock\""
    echo "[global.tls]"
    echo "ca = \"certs/ca.pem\""
    echo "cert = \"certs/{node}.pem\""
    echo "key = \"certs/{node}.key\""
    for i in 0 1; do
        echo "[resource.bench.node.n$i]"
        echo "id = $i"
        echo "address = \"127.0.0.1:$((base + i))\""
        echo "nbd = \"127.0.0.1:$((base + 100 + i))\""
        echo "backing = \"n$i.img\""
        echo "snapshot-dir = \"$WORK\""
    done
} >"$C"
ctl() { "$BLOCKCTL" --config "$C" --node "$@"; }
"$BLOCKCTL" --config "$C" certs --dir "$WORK/certs" >/dev/null
"$BLOCKCTL" --config "$C" gen-secret "$WORK/secret"
for i in 0 1; do
    truncate -s "$SIZE" "$WORK/n$i.img"
    ctl "n$i" create-md bench >/dev/null
    "$BLOCKD" --config "$C" --node "n$i" >"$WORK/n$i.log" 2>&1 &
    PIDS+=($!)
done
for i in 0 1; do
    for _ in $(seq 100); do ctl "n$i" status bench >/dev/null 2>&1 && break; sleep 0.1; done
done
ctl n0 promote bench --force
ctl n0 wait-sync bench --timeout 300 2>/dev/null
URI="nbd://127.0.0.1:$((base + 100))/bench"
for _ in $(seq 100); do nbdinfo --size "$URI" >/dev/null 2>&1 && break; sleep 0.1; done
DEV_BYTES=$(nbdinfo --size "$URI")

run_fio() {
    fio --name=randwrite --ioengine=nbd --uri="$URI" --size="$SIZE" --time_based \
        --runtime="$1" --rw=randwrite --bs=4k --iodepth=32 --output-format=json \
        --output="$WORK/fio.json" >/dev/null
}
# CPU ticks (utime+stime) of a process.
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
TCK=$(getconf CLK_TCK)
# Runs fio for $1 s and sets IOPS, IOS, CPU_P and CPU_S (microseconds of CPU per write on the
# Primary and the Secondary).
measure() {
    local p0 s0 p1 s1 perf=""
    if [ -n "$PERF" ] && [ "$rep" = "$REPEAT" ]; then
        perf record -g -o "$PERF.$2.data" -p "${PIDS[1]}" 2>/dev/null &
        perf=$!
    fi
    # Start each run with nothing left to write back from the previous one (on a disk, the
    # earlier runs' writeback would otherwise fall into this one).
    sync
    p0=$(ticks "${PIDS[0]}") s0=$(ticks "${PIDS[1]}")
    run_fio "$1"
    p1=$(ticks "${PIDS[0]}") s1=$(ticks "${PIDS[1]}")
    if [ -n "$perf" ]; then kill -INT "$perf"; wait "$perf" || true; fi
    IOPS=$(jq -r '.jobs[0].write.iops' "$WORK/fio.json")
    IOS=$(jq -r '.jobs[0].write.total_ios' "$WORK/fio.json")
    CPU_P=$(awk -v a="$p0" -v b="$p1" -v n="$IOS" -v t="$TCK" 'BEGIN {printf "%.1f", (b - a) * 1e6 / t / (n > 0 ? n : 1)}')
    CPU_S=$(awk -v a="$s0" -v b="$s1" -v n="$IOS" -v t="$TCK" 'BEGIN {printf "%.1f", (b - a) * 1e6 / t / (n > 0 ? n : 1)}')
}
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }

echo "# $(date -u +%Y-%m-%dT%H:%MZ) $(uname -r) $(nproc) CPUs; dir=$DIR size=$SIZE runtime=${RUNTIME}s repeat=$REPEAT"
run_fio 2 # warm up
WITHOUT="" WITH="" RATIOS="" PER_BLOCK="" PER_WRITE="" CPU_A="" CPU_B=""
for rep in $(seq "$REPEAT"); do
    measure "$RUNTIME" without
    a=$IOPS cpa="$CPU_P/$CPU_S"
    ctl n0 wait-sync bench --timeout 300 2>/dev/null
    ctl n1 snapshot bench --name "b$rep" --cow-size "$((DEV_BYTES * 2))" >/dev/null
    measure "$RUNTIME" with
    b=$IOPS ios=$IOS cpb="$CPU_P/$CPU_S"
    ctl n0 wait-sync bench --timeout 300 2>/dev/null
    st=$(ctl n1 status bench --json)
    used=$(echo "$st" | jq -r ".snapshots[] | select(.name == \"b$rep\") | .cow_used_bytes")
    invalid=$(echo "$st" | jq -r ".snapshots[] | select(.name == \"b$rep\") | .invalid // empty")
    [ -z "$invalid" ] || { echo "snapshot invalidated: $invalid" >&2; exit 1; }
    # Blocks preserved, from the area's format version (offset 8 of its header; the area is
    # `bench@bN.snap`, `bench.bN.snap` with older builds): version 1 (older builds) spends 4160
    # bytes per block; versions 2 and 3 a 4 KiB page per block and a 4 KiB table page per 256
    # blocks.
    version=$(od -An -t u4 -j 8 -N 4 "$(find "$WORK" \( -name "bench@b$rep.snap" -o -name "bench.b$rep.snap" \) | head -1)" | tr -d ' ')
    ctl n1 snapshot bench --drop "b$rep" >/dev/null
    if [ "$version" = 1 ]; then
        blocks=$((used / 4160))
    else
        pages=$((used / 4096))
        blocks=$((pages - (pages + 256) / 257))
    fi
    ratio=$(awk -v a="$a" -v b="$b" 'BEGIN {printf "%.3f", b / a}')
    pb=$(awk -v u="$used" -v n="$blocks" 'BEGIN {printf "%.0f", u / (n > 0 ? n : 1)}')
    pw=$(awk -v u="$used" -v n="$ios" 'BEGIN {printf "%.0f", u / (n > 0 ? n : 1)}')
    printf '  run %d: without %8.0f IOPS (CPU us/write Primary/Secondary %s), with snapshot %8.0f IOPS (CPU %s; ratio %s), %d writes, %d blocks preserved, %s COW bytes/block, %s COW bytes/write\n' \
        "$rep" "$a" "$cpa" "$b" "$cpb" "$ratio" "$ios" "$blocks" "$pb" "$pw"
    WITHOUT+=" $a" WITH+=" $b" RATIOS+=" $ratio" PER_BLOCK+=" $pb" PER_WRITE+=" $pw"
    CPU_A+=" ${cpa#*/}" CPU_B+=" ${cpb#*/}"
done
echo
printf '| job | without snapshot IOPS | with snapshot IOPS | ratio | Secondary CPU us/write without / with | COW bytes per overwritten 4 KiB block | COW bytes per write |\n|---|---:|---:|---:|---:|---:|---:|\n'
printf '| 4k randwrite qd32, protocol C | %.0f | %.0f | %s | %s / %s | %s | %s |\n' \
    "$(echo "$WITHOUT" | median)" "$(echo "$WITH" | median)" "$(echo "$RATIOS" | median)" \
    "$(echo "$CPU_A" | median)" "$(echo "$CPU_B" | median)" \
    "$(echo "$PER_BLOCK" | median)" "$(echo "$PER_WRITE" | median)"
