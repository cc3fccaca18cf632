#!/usr/bin/env bash
# filed vs csync2, side by side in one run: seconds and bytes on the wire for
#   push10k    push of 10,000 small files (1-8 KiB) to an empty peer       (csync2 -x  | filed sync)
#   delta64m   1-byte overwrite in a 64 MiB file both peers already have   (csync2 -x  | filed sync)
#   rename16m  rename of a 16 MiB file both peers already have            (csync2 -x  | filed sync)
#   check100k  check of an unchanged 100,000-file tree (second run)        (csync2 -cr | filed check)
# plus, for information, the first push of the 64 MiB file (full64m).
#
# Each tool runs two nodes on loopback addresses (csync2: 127.0.0.22/.23, filed: 127.0.0.24/.25,
# both on port 30865, TLS on), with the same seeded files. Wire bytes are IP bytes in both
# directions (headers and TLS included), counted by nftables rules on the loopback output hook
# for the tool's server addresses and port (clients may connect from 127.0.0.1). Every measured sync is verified (the peer tree must equal
# the source tree) before its figures are kept.
#
# csync2 quirks handled here: hosts are named by IP address (that is what -N binds and what the
# config must name); each node has its own CSYNC2_SYSTEM_DIR (config, lock file, TLS files) and -D
# database directory; both nodes use ONE self-signed certificate/key, since with per-node
# self-signed certificates csync2's GnuTLS handshake fails (csync2 bug #38).
#
# Usage: bench/filed-bench.sh                 # both tools, all cases
#        TOOLS=csync2 CASES="push10k" bench/filed-bench.sh
# Env:   FILED_BIN (default: target/release/filed, built with `cargo build --release -p filed`)
#        BENCH_DIR (default /var/tmp/filed-bench; wiped), KEEP=1 keeps it.
# Needs root (nft, binding 127.0.0.x), csync2, openssl, nft, python3.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
W=${BENCH_DIR:-/var/tmp/filed-bench}
TOOLS=${TOOLS:-"csync2 filed"}
CASES=${CASES:-"push10k full64m delta64m rename16m check100k"}
FILED=${FILED_BIN:-$ROOT/target/release/filed}
PORT=30865
# Node addresses; away from 127.0.0.2/.3, which the examples and integration tests use.
CS_A=${CS_A:-127.0.0.22} CS_B=${CS_B:-127.0.0.23} # csync2
FD_A=${FD_A:-127.0.0.24} FD_B=${FD_B:-127.0.0.25} # filed
NFT_TABLE=filed_bench
RESULTS=$W/results.tsv
PIDS=()

log() { printf '%s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill -- "-$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true
    done
    nft delete table inet "$NFT_TABLE" 2>/dev/null || true
    [[ ${KEEP:-} ]] || rm -rf "$W/csync2" "$W/filed"
}
trap cleanup EXIT

# ---------------------------------------------------------------- wire counters
nft_setup() {
    nft delete table inet "$NFT_TABLE" 2>/dev/null || true
    nft -f - <<EOF
table inet $NFT_TABLE {
    chain out {
        type filter hook output priority 0; policy accept;
        ip daddr $CS_A-$CS_B tcp dport $PORT counter comment "csync2"
        ip saddr $CS_A-$CS_B tcp sport $PORT counter comment "csync2"
        ip daddr $FD_A-$FD_B tcp dport $PORT counter comment "filed"
        ip saddr $FD_A-$FD_B tcp sport $PORT counter comment "filed"
    }
}
EOF
}

# Bytes counted so far for a tool (both directions); "NA" if the table vanished (another process
# flushed the ruleset), in which case it is put back and the current figure is lost.
wire_bytes() {
    local listing
    if ! listing=$(nft list table inet "$NFT_TABLE" 2>/dev/null); then
        log "  warning: nftables table $NFT_TABLE vanished (ruleset flushed?); recreating it"
        nft_setup
        echo NA
        return
    fi
    awk -v tool="\"$1\"" '
        $0 ~ tool { for (i = 1; i < NF; i++) if ($i == "bytes") sum += $(i + 1) }
        END { print sum + 0 }' <<<"$listing"
}

# measure TOOL CASE COMMAND...: runs the command, appends "case tool seconds bytes" to RESULTS.
measure() {
    local tool=$1 case=$2
    shift 2
    local b0 t0 t1 b1
    b0=$(wire_bytes "$tool")
    t0=$EPOCHREALTIME
    "$@" >>"$W/$tool.log" 2>&1 || die "$tool $case: '$*' failed (see $W/$tool.log)"
    t1=$EPOCHREALTIME
    sleep 0.2 # let closing segments (FIN/ACK) pass the counter
    b1=$(wire_bytes "$tool")
    local secs wire=NA
    secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')
    [[ $b0 == NA || $b1 == NA ]] || wire=$((b1 - b0))
    printf '%s\t%s\t%s\t%s\n' "$case" "$tool" "$secs" "$wire" >>"$RESULTS"
    log "  $tool $case: ${secs}s, $wire wire bytes"
}

# The peer tree must equal the source tree (content, and the set of names).
verify_same() {
    local tool=$1 case=$2 a=$3 b=$4
    diff -r "$a" "$b" >/dev/null 2>&1 || die "$tool $case: peer tree differs from the source ($a vs $b)"
}

# Waits up to 10 s until something listens on IP:PORT.
wait_listening() {
    local _
    for _ in $(seq 100); do
        ss -Hltn "src $1 and sport = :$PORT" | grep -q . && return 0
        sleep 0.1
    done
    return 1
}

# ---------------------------------------------------------------- seed data (same for both tools)
seed() {
    local s=$W/seed
    [[ -f $s/.done ]] && return
    rm -rf "$s"
    mkdir -p "$s"
    log "seeding files in $s ..."
    python3 - "$s" <<'EOF'
import os, random, sys
root = sys.argv[1]
rnd = random.Random(6)
def tree(name, count, per_dir, lo, hi):
    for i in range(count):
        d = os.path.join(root, name, "d%03d" % (i // per_dir))
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "f%06d.txt" % i), "wb") as f:
            f.write(rnd.randbytes(rnd.randint(lo, hi)))
tree("small", 10_000, 100, 1024, 8192)
tree("tree", 100_000, 1000, 50, 200)
for name, size in (("big64", 64 << 20), ("big16", 16 << 20)):
    with open(os.path.join(root, name), "wb") as f:
        f.write(rnd.randbytes(size))
EOF
    # One mtime for everything, so both tools start from identical metadata.
    find "$s" -exec touch -h -d '2024-01-01 00:00:00' {} +
    touch "$s/.done"
}

# Puts seeded item NAME into DIR (preserving mtimes).
place() { cp -a "$W/seed/$1" "$2/"; }

# Changes one byte in the middle of a file (same byte, same position for both tools).
poke_byte() { printf 'X' | dd of="$1" bs=1 seek=$((32 << 20)) conv=notrunc status=none; }

# ---------------------------------------------------------------- csync2
C=$W/csync2
cs() { # cs NODE(a|b) ARGS...
    local node=$1 ip
    shift
    [[ $node == a ]] && ip=$CS_A || ip=$CS_B
    CSYNC2_SYSTEM_DIR=$C/$node/etc csync2 -N "$ip" -D "$C/$node/db" "$@"
}

csync2_setup() {
    rm -rf "$C"
    mkdir -p "$C"/{a,b}/{etc,db,data}
    openssl req -x509 -newkey rsa:2048 -nodes -keyout "$C/key.pem" -out "$C/cert.pem" -days 30 \
        -subj /CN=csync2-bench 2>/dev/null
    csync2 -k "$C/group.key"
    for n in a b; do
        cp "$C/key.pem" "$C/$n/etc/csync2_ssl_key.pem"
        cp "$C/cert.pem" "$C/$n/etc/csync2_ssl_cert.pem"
        cat >"$C/$n/etc/csync2.cfg" <<EOF
group bench
{
    host $CS_A $CS_B;
    key $C/group.key;
    include %data%;
    auto younger;
}
prefix data
{
    on $CS_A: $C/a/data;
    on $CS_B: $C/b/data;
}
EOF
    done
    for n in a b; do
        setsid bash -c "exec env CSYNC2_SYSTEM_DIR=$C/$n/etc csync2 -ii -v -N $([[ $n == a ]] && echo $CS_A || echo $CS_B) -D $C/$n/db" \
            >"$C/$n/server.log" 2>&1 &
        PIDS+=($!)
    done
    wait_listening $CS_A && wait_listening $CS_B && return
    die "csync2 servers did not start (see $C/*/server.log)"
}

csync2_sync() { cs a -x -v; }

csync2_case() {
    local case=$1 A=$C/a/data B=$C/b/data
    case $case in
    push10k)
        place small "$A"
        measure csync2 "$case" csync2_sync
        verify_same csync2 "$case" "$A/small" "$B/small"
        ;;
    full64m)
        place big64 "$A"
        measure csync2 "$case" csync2_sync
        verify_same csync2 "$case" "$A" "$B"
        ;;
    delta64m)
        [[ -f $B/big64 ]] || { place big64 "$A"; csync2_sync >>"$W/csync2.log" 2>&1; }
        poke_byte "$A/big64"
        measure csync2 "$case" csync2_sync
        verify_same csync2 "$case" "$A" "$B"
        ;;
    rename16m)
        place big16 "$A"
        csync2_sync >>"$W/csync2.log" 2>&1
        verify_same csync2 "$case" "$A" "$B"
        mv "$A/big16" "$A/big16-renamed"
        measure csync2 "$case" csync2_sync
        verify_same csync2 "$case" "$A" "$B"
        ;;
    check100k)
        place tree "$A"
        cs a -cr "$A" >>"$W/csync2.log" 2>&1
        measure csync2 "$case" cs a -cr "$A"
        ;;
    esac
}

# ---------------------------------------------------------------- filed
F=$W/filed
fd() { # fd NODE(alpha|beta) ARGS...
    local node=$1
    shift
    "$FILED" --config "$F/cluster.toml" --node "$node" "$@"
}

filed_setup() {
    [[ -x $FILED ]] || die "no filed binary at $FILED (cargo build --release -p filed)"
    rm -rf "$F"
    mkdir -p "$F"/{alpha,beta}/data
    cat >"$F/cluster.toml" <<EOF
ca = "pki/ca.pem"
ca-key = "pki/ca.key"

[hosts.alpha]
address = "$FD_A:$PORT"
state = "alpha/state.redb"
cert = "pki/alpha.pem"
key = "pki/alpha.key"
prefix = { data = "alpha/data" }

[hosts.beta]
address = "$FD_B:$PORT"
state = "beta/state.redb"
cert = "pki/beta.pem"
key = "pki/beta.key"
prefix = { data = "beta/data" }

[groups.bench]
hosts = ["alpha", "beta"]
key = "pki/bench.key"
include = ["%data%"]
auto = "younger"
EOF
    fd alpha keygen >>"$W/filed.log" 2>&1 || die "filed keygen failed (see $W/filed.log)"
    for n in alpha beta; do
        setsid "$FILED" --config "$F/cluster.toml" --node "$n" serve >"$F/$n/server.log" 2>&1 &
        PIDS+=($!)
    done
    wait_listening $FD_A && wait_listening $FD_B ||
        die "filed servers did not start (see $F/*/server.log)"
}

filed_sync() { fd alpha sync; }

filed_case() {
    local case=$1 A=$F/alpha/data B=$F/beta/data
    case $case in
    push10k)
        place small "$A"
        measure filed "$case" filed_sync
        verify_same filed "$case" "$A/small" "$B/small"
        ;;
    full64m)
        place big64 "$A"
        measure filed "$case" filed_sync
        verify_same filed "$case" "$A" "$B"
        ;;
    delta64m)
        [[ -f $B/big64 ]] || { place big64 "$A"; filed_sync >>"$W/filed.log" 2>&1; }
        poke_byte "$A/big64"
        measure filed "$case" filed_sync
        verify_same filed "$case" "$A" "$B"
        ;;
    rename16m)
        place big16 "$A"
        filed_sync >>"$W/filed.log" 2>&1
        verify_same filed "$case" "$A" "$B"
        mv "$A/big16" "$A/big16-renamed"
        measure filed "$case" filed_sync
        verify_same filed "$case" "$A" "$B"
        ;;
    check100k)
        place tree "$A"
        fd alpha check >>"$W/filed.log" 2>&1
        measure filed "$case" fd alpha check
        ;;
    esac
}

# ---------------------------------------------------------------- report
report() {
    python3 - "$RESULTS" <<'EOF'
import sys
rows = {}
for line in open(sys.argv[1]):
    case, tool, secs, wire = line.split("\t")
    wire = wire.strip()
    rows.setdefault(case, {})[tool] = (float(secs), int(wire) if wire != "NA" else None)
order = ["push10k", "full64m", "delta64m", "rename16m", "check100k"]
what = {
    "push10k": "push 10,000 small files",
    "full64m": "first push of a 64 MiB file",
    "delta64m": "1-byte overwrite in 64 MiB",
    "rename16m": "rename of a 16 MiB file",
    "check100k": "check, unchanged 100,000 files",
}
def fmt_b(b):
    return f"{b:,}"
print("| case | csync2 s | filed s | speed-up | csync2 wire B | filed wire B | wire ratio filed/csync2 |")
print("|---|---:|---:|---:|---:|---:|---:|")
for case in order:
    r = rows.get(case)
    if not r:
        continue
    c = r.get("csync2"); f = r.get("filed")
    cs = f"{c[0]:.3f}" if c else "-"; fs = f"{f[0]:.3f}" if f else "-"
    cb = fmt_b(c[1]) if c and c[1] is not None else "-"; fb = fmt_b(f[1]) if f and f[1] is not None else "-"
    sp = f"{c[0] / f[0]:.1f}x" if c and f and f[0] > 0 else "-"
    wr = f"{f[1] / c[1]:.4f}" if c and f and c[1] and f[1] is not None else "-"
    print(f"| {what[case]} | {cs} | {fs} | {sp} | {cb} | {fb} | {wr} |")
EOF
}

# ---------------------------------------------------------------- main
[[ $(id -u) == 0 ]] || die "run as root (nftables counters)"
command -v nft >/dev/null || die "nft not found (apt-get install nftables)"
mkdir -p "$W"
: >"$RESULTS"
: >"$W/csync2.log"
: >"$W/filed.log"
seed
nft_setup
for ip in $CS_A $CS_B $FD_A $FD_B; do
    ! ss -Hltn "src $ip and sport = :$PORT" | grep -q . || die "$ip:$PORT is already in use: $(ss -Hltnp "src $ip and sport = :$PORT")"
done
for tool in $TOOLS; do
    log "== $tool"
    "${tool}_setup"
    for case in $CASES; do
        "${tool}_case" "$case"
    done
done
log ""
log "date: $(date -u '+%Y-%m-%d %H:%M UTC'); host: $(nproc) cores, $(uname -r); csync2 $(dpkg-query -W -f '${Version}' csync2 2>/dev/null || echo '?')"
report
