#!/usr/bin/env bash
# Replication benchmark (not a test): fio --ioengine=nbd through the Primary's NBD export for
# protocols A, B and C with one and two secondaries (every node a separate blockd process on
# 127.0.0.1, all backing files in the same directory, i.e. on one disk), beside `blockd
# standalone` on the same kind of file. Prints IOPS, MiB/s and the ratio to standalone.
#
# Usage: bench/repl-bench.sh [options]
#   --dir DIR          backing directory (default /var/tmp)
#   --size SIZE        backing file size (default 1G)
#   --runtime S        seconds per fio job (default 10)
#   --configs "..."    any of: standalone A1 B1 C1 A2 B2 C2 (default: all)
#   --jobs "..."       any of: randwrite seqwrite (default: both)
#   --no-build         use the existing target/release binaries
#   --quick            --runtime 4
set -euo pipefail

DIR=/var/tmp
SIZE=1G
RUNTIME=10
CONFIGS="standalone A1 B1 C1 A2 B2 C2"
JOBS="randwrite seqwrite"
BUILD=1
while [ $# -gt 0 ]; do
    case "$1" in
        --dir) DIR=$2; shift 2 ;;
        --size) SIZE=$2; shift 2 ;;
        --runtime) RUNTIME=$2; shift 2 ;;
        --configs) CONFIGS=$2; shift 2 ;;
        --jobs) JOBS=$2; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        --quick) RUNTIME=4; shift ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "unknown option: $1" >&2; exit 2 ;;
    esac
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
for t in fio jq nbdinfo; do command -v $t >/dev/null || { echo "missing tool: $t" >&2; exit 1; }; done
if [ "$BUILD" = 1 ]; then (cd "$ROOT" && cargo build -p blockd --release --bins --quiet); fi
TARGET_DIR=$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps | jq -r .target_directory)
BLOCKD=$TARGET_DIR/release/blockd
BLOCKCTL=$TARGET_DIR/release/blockctl

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

# setup CONFIG -> starts the servers, sets URI.
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

declare -A IOPS MIBS
echo "# $(date -u +%Y-%m-%dT%H:%MZ) $(uname -r) $(nproc) CPUs; dir=$DIR size=$SIZE runtime=${RUNTIME}s"
for cfg in $CONFIGS; do
    setup "$cfg"
    for job in $JOBS; do
        out=$WORK/fio.json
        # shellcheck disable=SC2046
        fio --name="$job" --ioengine=nbd --uri="$URI" --size="$SIZE" --time_based \
            --runtime="$RUNTIME" --ramp_time=1 --output-format=json --output="$out" \
            $(job_args "$job") >/dev/null
        IOPS[$cfg,$job]=$(jq -r '.jobs[0].write.iops' "$out")
        MIBS[$cfg,$job]=$(jq -r '.jobs[0].write.bw_bytes / 1048576' "$out")
        printf '  %-10s %-9s %10.0f IOPS %8.1f MiB/s\n' "$cfg" "$job" "${IOPS[$cfg,$job]}" "${MIBS[$cfg,$job]}"
    done
    stop_all
    rm -rf "${WORK:?}/$cfg"
done

echo
printf '| config | job | IOPS | MiB/s | vs standalone |\n|---|---|---:|---:|---:|\n'
for cfg in $CONFIGS; do
    for job in $JOBS; do
        ratio=-
        if [ -n "${IOPS[standalone,$job]:-}" ]; then
            ratio=$(jq -n "${IOPS[$cfg,$job]} / ${IOPS[standalone,$job]} * 100 | round / 100")
        fi
        printf '| %s | %s | %.0f | %.1f | %s |\n' "$cfg" "$job" "${IOPS[$cfg,$job]}" "${MIBS[$cfg,$job]}" "$ratio"
    done
done
