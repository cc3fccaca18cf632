#!/usr/bin/env bash
# filed daemon vs csync2 + incron vs lsyncd, side by side in one run (issue 7):
#   latency  change-to-remote latency over EDITS (100) edits: each edit overwrites one of 10 small
#            files (200 bytes, new random content) on node A; latency = from the close() of the
#            write until node B's copy has exactly that content, polled every POLL_MS (2) ms.
#            Edits are sequential, 50-100 ms apart (random) after the previous one arrived.
#            Median and p99 (nearest rank) per tool.
#              filed       two `filed daemon`s (release build) on 127.0.0.34/.35, default batch delay
#              filed-0ms   the same daemons restarted with --batch-delay-ms 0 (shortest delay)
#              csync2      two csync2 -ii servers on 127.0.0.32/.33, triggered by Debian's real
#                          incrond (foreground, private incron.conf) on both nodes with
#                          `DIR IN_CLOSE_WRITE,IN_CREATE,IN_DELETE,IN_MOVED_TO,IN_MOVED_FROM csync2 -x`
#              lsyncd      Debian's lsyncd, default.rsync, delay = 0, target a local directory
#              lsyncd-net  the same lsyncd, default.rsync, delay = 0, target node B's rsync daemon
#                          (`rsync --daemon`, private rsyncd.conf, on 127.0.0.37:873, module
#                          `bench`): rsync://127.0.0.37/bench/, as lsyncd is deployed without ssh
#   idle     CPU time (utime+stime from /proc/PID/stat) of each converged filed daemon over
#            IDLE_SECS (60) s, and transfers/sessions in that window (`filed status --json`);
#            the csync2 and lsyncd runs happen during this window, in other directories.
#   storm    STORM (100,000) files of 100 bytes created on A in 100 new directories, while both
#            filed daemons run (default batch delay): time until all are on B, batches and sessions
#            used, then transfers during 5 quiet seconds after convergence.
#
# Usage: bench/filed-daemon-bench.sh            (as root; about 4-5 minutes)
#        bench/filed-daemon-bench.sh --only-latency   (latency rows only: no idle window, no storm;
#                   TOOLS defaults to "filed-0ms filed lsyncd lsyncd-net"; about 2 minutes)
# Env:   FILED_BIN (default target/release/filed: `cargo build --release -p filed`)
#        BENCH_DIR (default /var/tmp/filed-daemon-bench; wiped), KEEP=1 keeps it
#        EDITS (100), POLL_MS (2), IDLE_SECS (60), STORM (100000),
#        TOOLS ("filed-0ms filed csync2 lsyncd lsyncd-net"),
#        INCRON_NODES ("a b"; "a" = incron on the editing node only), EDIT_TIMEOUT (5 s),
#        BUDGET_SECS (120: a tool's edits stop after this long; the table shows how many were made)
# Needs: csync2, incron, lsyncd, rsync, openssl, python3 (installed with apt-get when missing).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
ONLY_LATENCY=""
for arg in "$@"; do
    case $arg in
    --only-latency) ONLY_LATENCY=1 ;;
    *) echo "usage: $0 [--only-latency]" >&2; exit 2 ;;
    esac
done
W=${BENCH_DIR:-/var/tmp/filed-daemon-bench}
FILED=${FILED_BIN:-$ROOT/target/release/filed}
EDITS=${EDITS:-100}
POLL_MS=${POLL_MS:-2}
IDLE_SECS=${IDLE_SECS:-60}
STORM=${STORM:-100000}
if [[ $ONLY_LATENCY ]]; then
    TOOLS=${TOOLS:-"filed-0ms filed lsyncd lsyncd-net"}
    IDLE_SECS=0
    STORM=0
else
    TOOLS=${TOOLS:-"filed-0ms filed csync2 lsyncd lsyncd-net"}
fi
INCRON_NODES=${INCRON_NODES:-"a b"} # nodes whose incrond table runs csync2 -x ("a": sender only)
PORT=30866            # filed (csync2 always uses 30865)
CS_A=127.0.0.32 CS_B=127.0.0.33
FD_A=127.0.0.34 FD_B=127.0.0.35
RS_B=127.0.0.37 # node B's rsync daemon (lsyncd-net), port 873
RESULTS=$W/results.jsonl
PIDS=()

log() { printf '[%3ds] %s\n' "$SECONDS" "$*" >&2; }
die() { log "error: $*"; exit 1; }

stop_pid() { # stop_pid PID: SIGTERM, wait up to 10 s, then SIGKILL
    local pid=$1 _
    kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
}

cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
    [[ ${KEEP:-} ]] || rm -rf "$W"
}
trap cleanup EXIT

wait_listening() { # IP PORT: up to 10 s
    local _
    for _ in $(seq 100); do
        ss -Hltn "src $1 and sport = :$2" | grep -q . && return 0
        sleep 0.1
    done
    return 1
}

# ---------------------------------------------------------------- measuring helpers (python)
# seed DIR: the 10 files the edits overwrite (identical initial content on every tool).
seed() {
    mkdir -p "$1"
    local i
    for i in $(seq 10 29); do printf 'initial %s\n' "$i" >"$1/f$i.txt"; done
}

# wait_same A B SECS: until the 20 seed files of A are on B with the same content.
wait_same() {
    python3 - "$@" <<'EOF' || die "initial sync $1 -> $2 did not happen within $3 s"
import os, sys, time
a, b, limit = sys.argv[1], sys.argv[2], float(sys.argv[3])
names = [f"f{i}.txt" for i in range(10, 30)]
want = {n: open(os.path.join(a, n), "rb").read() for n in names}
end = time.monotonic() + limit
while time.monotonic() < end:
    try:
        if all(open(os.path.join(b, n), "rb").read() == want[n] for n in names):
            sys.exit(0)
    except OSError:
        pass
    time.sleep(0.05)
sys.exit(1)
EOF
}

# latency TOOL A B: EDITS edits on A, each timed until visible on B (a "missed" edit is one not
# there after EDIT_TIMEOUT s, counted as that long); one JSON line to RESULTS; the last content
# of every file to $W/expected-TOOL.json (for final_state).
latency() {
    EXPECTED=$W/expected-$1.json python3 - "$1" "$2" "$3" "$EDITS" "$POLL_MS" >>"$RESULTS" <<'EOF'
import json, os, random, sys, time
tool, a, b, n, poll = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]) / 1000
rnd = random.Random()
def content(i):  # always 200 bytes
    return (f"{tool} edit {i} ".encode() + rnd.randbytes(100).hex().encode())[:199] + b"\n"
last = {}  # what A should finally hold: the last content written to each file
def edit(name, data):
    last[name] = data.decode()
    with open(os.path.join(a, name), "wb") as f:  # in place: O_TRUNC, write, close
        f.write(data)
def arrival(name, data, timeout):  # seconds until B has exactly data, None if it never did
    t0 = time.monotonic()
    target = os.path.join(b, name)
    while True:
        try:
            with open(target, "rb") as f:
                if f.read() == data:
                    return time.monotonic() - t0
        except OSError:
            pass
        if time.monotonic() - t0 > timeout:
            return None
        time.sleep(poll)
lat, missed = [], 0
timeout = float(os.environ.get("EDIT_TIMEOUT", "5"))
budget = time.monotonic() + float(os.environ.get("BUDGET_SECS", "120"))
for i in range(n):
    if time.monotonic() > budget:
        print(f"  {tool}: time budget used up after {i} edits", file=sys.stderr)
        break
    # 20 files, 50-100 ms between edits: a file is rewritten more than a second after its
    # previous version, so mtime-second-based quick checks (rsync) see every edit.
    name = f"f{10 + i % 20}.txt"
    data = content(i)
    edit(name, data)
    t = arrival(name, data, timeout)
    if t is None:
        missed += 1
        print(f"  {tool}: edit {i} of {name} did not arrive within {timeout:.0f} s", file=sys.stderr)
        t = timeout
    lat.append(t)
    time.sleep(0.05 + rnd.random() * 0.05)
# A same-size rewrite within the same second as the version the peer already has (the case a
# size + whole-second mtime check misses): delivered within 5 s or not.
same_second, writes = None, len(lat)
for attempt in range(5):
    while time.time() % 1 > 0.05:
        time.sleep(0.01)
    sec = int(time.time())
    first = content(1000 + attempt)
    edit("f10.txt", first)
    writes += 1
    if arrival("f10.txt", first, timeout) is None or int(time.time()) != sec:
        continue
    second = content(2000 + attempt)
    edit("f10.txt", second)
    writes += 1
    if int(os.stat(os.path.join(a, "f10.txt")).st_mtime) != sec:
        continue
    t = arrival("f10.txt", second, 5.0)
    same_second = "missed" if t is None else f"{t * 1000:.0f} ms"
    break
with open(os.environ["EXPECTED"], "w") as f:
    json.dump(last, f)
print(json.dumps({"kind": "latency", "tool": tool, "lat": lat, "missed": missed, "same_second": same_second, "writes": writes}))
EOF
}

# final_state TOOL A B: once the tool has settled, do A and B hold the last edit of every file?
# (A can lose an edit when a sync echoes an older version back.)
final_state() {
    python3 - "$1" "$2" "$3" "$W/expected-$1.json" >>"$RESULTS" <<'EOF'
import json, os, sys
tool, a, b, exp = sys.argv[1], sys.argv[2], sys.argv[3], json.load(open(sys.argv[4]))
def differs(d):
    n = 0
    for name, data in exp.items():
        try:
            n += open(os.path.join(d, name)).read() != data
        except OSError:
            n += 1
    return n
print(json.dumps({"kind": "final", "tool": tool, "a_lost": differs(a), "b_stale": differs(b)}))
EOF
}

# ---------------------------------------------------------------- filed
F=$W/filed
FD_PIDS=()

filed_setup() {
    [[ -x $FILED ]] || die "no filed binary at $FILED (cargo build --release -p filed)"
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
    "$FILED" --config "$F/cluster.toml" --node alpha keygen >"$F/keygen.log" 2>&1 ||
        die "filed keygen failed (see $F/keygen.log)"
    seed "$F/alpha/data"
}

# filed_start [DAEMON ARGS...]: both daemons; waits for the listeners and the initial sync.
filed_start() {
    local n
    FD_PIDS=()
    for n in alpha beta; do
        setsid "$FILED" --config "$F/cluster.toml" --node "$n" daemon "$@" >>"$F/$n/daemon.log" 2>&1 &
        FD_PIDS+=($!)
        PIDS+=($!)
    done
    wait_listening $FD_A $PORT && wait_listening $FD_B $PORT || die "filed daemons did not start (see $F/*/daemon.log)"
    wait_same "$F/alpha/data" "$F/beta/data" 60
    filed_quiet
}

filed_stop() {
    local pid
    for pid in "${FD_PIDS[@]}"; do stop_pid "$pid"; done
    FD_PIDS=()
}

# filed_runs TOOL BEFORE AFTER: sessions between two filed_counters snapshots.
filed_runs() {
    python3 -c 'import json,sys; a,b=json.loads(sys.argv[2]),json.loads(sys.argv[3]); print(json.dumps({"kind":"runs","tool":sys.argv[1],"count":b["sessions"]-a["sessions"]}))' "$@" >>"$RESULTS"
}

fstatus() { "$FILED" --config "$F/cluster.toml" --node "$1" status --json 2>/dev/null || true; }

# filed_counters: one JSON object {queued, transfers, sessions, batches, ticks} summed over both
# daemons (ticks: utime+stime from /proc/PID/stat, in clock ticks).
filed_counters() {
    local sa sb ta tb
    sa=$(fstatus alpha)
    sb=$(fstatus beta)
    ta=$(awk '{ print $14 + $15 }' "/proc/${FD_PIDS[0]}/stat")
    tb=$(awk '{ print $14 + $15 }' "/proc/${FD_PIDS[1]}/stat")
    python3 - "$sa" "$sb" "$ta" "$tb" <<'EOF'
import json, sys
# Every session is counted by both daemons (sync_runs counts sessions started by either side):
# "sessions" is half the sum. "batches" per daemon.
out = {"queued": 0, "transfers": 0, "sessions": 0, "batches": [], "ticks": [int(sys.argv[3]), int(sys.argv[4])], "ok": True}
for text in sys.argv[1:3]:
    try:
        s = json.loads(text)
    except ValueError:
        out["ok"] = False
        continue
    out["batches"].append(sum(g["watch"]["batches"] for g in s["groups"]))
    for g in s["groups"]:
        for p in g["peers"]:
            c = p["counters"]
            out["queued"] += p["queued"]
            out["transfers"] += c["transfers_sent"] + c["transfers_received"]
            out["sessions"] += c["sync_runs"] / 2
print(json.dumps(out))
EOF
}

# filed_quiet: until nothing is queued on either daemon and the transfer count stayed put for 1 s
# (at most 120 s).
filed_quiet() {
    local prev="" cur _
    for _ in $(seq 240); do
        cur=$(filed_counters | python3 -c 'import json,sys; c=json.load(sys.stdin); print(c["ok"] and c["queued"] == 0, c["transfers"], c["sessions"])')
        if [[ $cur == True* && $cur == "$prev" ]]; then return 0; fi
        prev=$cur
        sleep 0.5
    done
    die "filed daemons did not go quiet (see $F/*/daemon.log)"
}

# ---------------------------------------------------------------- csync2 + incron
C=$W/csync2
CS_PIDS=()

csync2_setup() {
    mkdir -p "$C"/{a,b}/{etc,db,data} "$C"/incron/{sys,user,lock}
    openssl req -x509 -newkey rsa:2048 -nodes -keyout "$C/key.pem" -out "$C/cert.pem" -days 30 \
        -subj /CN=csync2-bench 2>/dev/null
    csync2 -k "$C/group.key"
    local n ip
    for n in a b; do
        [[ $n == a ]] && ip=$CS_A || ip=$CS_B
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
        # What incron runs on this node: csync2 -x with this node's identity (the wrapper only
        # adds the per-node environment a second node on the same machine needs, and counts runs).
        cat >"$C/$n/csync2-x" <<EOF
#!/bin/sh
date +%s.%N >>$C/$n/runs
exec env CSYNC2_SYSTEM_DIR=$C/$n/etc csync2 -N $ip -D $C/$n/db -x
EOF
        chmod +x "$C/$n/csync2-x"
        setsid env CSYNC2_SYSTEM_DIR="$C/$n/etc" csync2 -ii -v -N "$ip" -D "$C/$n/db" >"$C/$n/server.log" 2>&1 &
        CS_PIDS+=($!)
        PIDS+=($!)
    done
    wait_listening $CS_A 30865 && wait_listening $CS_B 30865 || die "csync2 servers did not start (see $C/*/server.log)"
    seed "$C/a/data"
    "$C/a/csync2-x" >>"$C/initial.log" 2>&1 || die "initial csync2 -x failed (see $C/initial.log)"
    wait_same "$C/a/data" "$C/b/data" 30
    # incrond with a private configuration (tables, lock file), one system table per node: the
    # usual incrontab line, on both nodes, as a two-node csync2 + incron setup has it.
    cat >"$C/incron/incron.conf" <<EOF
system_table_dir = $C/incron/sys
user_table_dir = $C/incron/user
lockfile_dir = $C/incron/lock
lockfile_name = incrond-bench
allowed_users = $C/incron/allow
denied_users = $C/incron/deny
EOF
    for n in $INCRON_NODES; do
        echo "$C/$n/data IN_CLOSE_WRITE,IN_CREATE,IN_DELETE,IN_MOVED_TO,IN_MOVED_FROM $C/$n/csync2-x" >"$C/incron/sys/node-$n"
    done
    : >"$C/a/runs"
    : >"$C/b/runs"
    setsid incrond -n -f "$C/incron/incron.conf" >"$C/incron/incrond.log" 2>&1 &
    CS_PIDS+=($!)
    PIDS+=($!)
    disown $! # incrond may need SIGKILL; no job notice for it
    # incrond has no readiness signal: touch a file until its csync2 run shows up.
    local _
    for _ in $(seq 50); do
        touch "$C/a/data/probe"
        sleep 0.2
        [[ -s $C/a/runs ]] && break
    done
    [[ -s $C/a/runs ]] || die "incrond does not run the table (see $C/incron/incrond.log)"
    rm -f "$C/a/data/probe"
    csync2_settle
    : >"$C/a/runs"
    : >"$C/b/runs"
}

# Waits until no csync2 -x has run for 1 s (at most 30 s).
csync2_settle() {
    local idle=0 _
    for _ in $(seq 300); do
        if pgrep -f "$C/./db -x" >/dev/null; then idle=0; else idle=$((idle + 1)); fi
        ((idle < 10)) || return 0
        sleep 0.1
    done
}

# Stops incrond first, waits (at most 30 s) for the csync2 -x runs it started to end, then the
# servers: nothing of csync2 is left running during the next measurement.
csync2_stop() {
    local pid _
    stop_pid "${CS_PIDS[2]}"
    for _ in $(seq 300); do
        pgrep -f "$C/./db -x" >/dev/null || break
        sleep 0.1
    done
    for pid in "${CS_PIDS[@]:0:2}"; do stop_pid "$pid"; done
    CS_PIDS=()
}

# ---------------------------------------------------------------- lsyncd
L=$W/lsyncd
LS_PID=""

RS_PID=""

# lsyncd_setup DIR TARGET: lsyncd (default.rsync, delay = 0) from DIR/a to TARGET.
lsyncd_setup() {
    local d=$1 target=$2
    mkdir -p "$d"/{a,b}
    seed "$d/a"
    cat >"$d/lsyncd.lua" <<EOF
settings { nodaemon = true, logfile = "$d/lsyncd.log", statusFile = "$d/status", insist = true }
sync { default.rsync, source = "$d/a", target = "$target", delay = 0 }
EOF
    setsid lsyncd "$d/lsyncd.lua" >"$d/stdout.log" 2>&1 &
    LS_PID=$!
    PIDS+=($!)
    wait_same "$d/a" "$d/b" 30
    local _
    for _ in $(seq 100); do
        grep -q "Startup of .* finished" "$d/lsyncd.log" 2>/dev/null && return 0
        sleep 0.1
    done
    die "lsyncd did not finish its startup sync (see $d/lsyncd.log)"
}

# rsyncd_start DIR: node B's rsync daemon on $RS_B:873 serving DIR/b as module `bench`
# (private config, foreground, no chroot; files keep root ownership as lsyncd's -a asks).
rsyncd_start() {
    local d=$1
    mkdir -p "$d/b"
    cat >"$d/rsyncd.conf" <<EOF
pid file = $d/rsyncd.pid
lock file = $d/rsyncd.lock
log file = $d/rsyncd.log
use chroot = no
[bench]
    path = $d/b
    read only = no
    uid = root
    gid = root
EOF
    setsid rsync --daemon --no-detach --config="$d/rsyncd.conf" --address=$RS_B --port=873 >"$d/rsyncd.out" 2>&1 &
    RS_PID=$!
    PIDS+=($!)
    wait_listening $RS_B 873 || die "rsync daemon did not start (see $d/rsyncd.*)"
}

# ---------------------------------------------------------------- storm
storm() {
    local c0 c1
    c0=$(filed_counters)
    python3 - "$F/alpha/data/storm" "$F/beta/data/storm" "$STORM" "$c0" >>"$RESULTS" <<'EOF'
import json, os, sys, time
a, b, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
per_dir = 1000
t0 = time.monotonic()
for i in range(n):
    d = os.path.join(a, "d%03d" % (i // per_dir))
    if i % per_dir == 0:
        os.makedirs(d)
    with open(os.path.join(d, "f%06d" % i), "wb") as f:
        f.write(b"%06d" % i + b"x" * 94)
created = time.monotonic() - t0
def count():
    total = 0
    try:
        for e in os.scandir(b):
            if e.is_dir():
                total += sum(1 for x in os.scandir(e.path) if not x.name.startswith(".filed.tmp"))
    except OSError:
        pass
    return total
got = 0
while time.monotonic() - t0 < 600:
    got = count()
    if got >= n:
        break
    time.sleep(0.2)
print(json.dumps({"kind": "storm", "files": n, "created_s": created, "converged_s": time.monotonic() - t0, "arrived": got}))
EOF
    [[ $(tail -1 "$RESULTS") == *'"kind": "storm"'* ]] || die "storm measurement failed"
    filed_quiet
    c1=$(filed_counters)
    sleep 5
    local c2
    c2=$(filed_counters)
    diff -r "$F/alpha/data" "$F/beta/data" >/dev/null || die "storm: beta's tree differs from alpha's"
    printf '{"kind": "storm-counters", "before": %s, "converged": %s, "quiet5": %s}\n' "$c0" "$c1" "$c2" >>"$RESULTS"
}

# ---------------------------------------------------------------- report
report() {
    python3 - "$RESULTS" "$IDLE_SECS" "$(getconf CLK_TCK)" "$([[ $INCRON_NODES == a ]] && echo "on A only" || echo "on both nodes")" <<'EOF'
import json, math, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
idle_secs, hz = float(sys.argv[2]), int(sys.argv[3])
lat = {r["tool"]: r for r in rows if r["kind"] == "latency"}
runs = {r["tool"]: r for r in rows if r["kind"] == "runs"}
finals = {r["tool"]: r for r in rows if r["kind"] == "final"}
what = {
    "filed-0ms": "filed daemon, --batch-delay-ms 0",
    "filed": "filed daemon, default batch delay (200 ms)",
    "csync2": "csync2 -x run by incrond (" + sys.argv[4] + ")",
    "lsyncd": "lsyncd default.rsync, delay = 0 (local target)",
    "lsyncd-net": "lsyncd default.rsync, delay = 0, to B's rsync daemon",
}
def p99(xs):
    s = sorted(xs)
    return s[max(0, math.ceil(0.99 * len(s)) - 1)]
med = {}
print("| change-to-remote latency | median ms | p99 ms | max ms | edits | missed | syncs per write | same-second rewrite | files wrong at the end A / B |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for tool in ["filed-0ms", "filed", "csync2", "lsyncd", "lsyncd-net"]:
    r = lat.get(tool)
    if not r:
        continue
    xs = r["lat"]
    med[tool] = statistics.median(xs)
    per = runs.get(tool)
    per = f"{per['count'] / r['writes']:.2f}" if per else "-"
    fin = finals.get(tool)
    fin = f"{fin['a_lost']} / {fin['b_stale']}" if fin else "-"
    print(f"| {what[tool]} | {med[tool] * 1000:.1f} | {p99(xs) * 1000:.1f} | {max(xs) * 1000:.1f} | {len(xs)} | {r['missed']} | {per} | {r['same_second'] or 'n/a'} | {fin} |")
print()
for f in ["filed", "filed-0ms"]:
    for o in ["lsyncd", "lsyncd-net", "csync2"]:
        if f in med and o in med:
            print(f"{o} median / {f} median = {med[o] / med[f]:.2f}x")
for r in rows:
    if r["kind"] == "idle":
        a, b = r["before"], r["after"]
        ticks = [b["ticks"][i] - a["ticks"][i] for i in range(2)]
        print()
        print(f"| idle filed daemons over {r['secs']:.0f} s | alpha | beta |")
        print("|---|---:|---:|")
        print(f"| CPU time (utime+stime) ms | {ticks[0] * 1000 // hz} | {ticks[1] * 1000 // hz} |")
        print(f"| transfers / sessions in the window (both) | {b['transfers'] - a['transfers']} / {b['sessions'] - a['sessions']:.0f} | |")
    if r["kind"] == "storm":
        s = r
    if r["kind"] == "storm-counters":
        c0, c1, c2 = r["before"], r["converged"], r["quiet5"]
        print()
        print(f"| storm of {s['files']:,} creates (100 new directories) | figure |")
        print("|---|---:|")
        print(f"| created on alpha in | {s['created_s']:.1f} s |")
        print(f"| all on beta after (from the first create) | {s['converged_s']:.1f} s |")
        print(f"| batches on alpha / beta, sessions | {c1['batches'][0] - c0['batches'][0]} / {c1['batches'][1] - c0['batches'][1]}, {c1['sessions'] - c0['sessions']:.0f} |")
        print(f"| transfers / sessions / CPU ms in 5 s after convergence | {c2['transfers'] - c1['transfers']} / {c2['sessions'] - c1['sessions']:.0f} / {(sum(c2['ticks']) - sum(c1['ticks'])) * 1000 // hz} |")
EOF
}

# ---------------------------------------------------------------- main
[[ $(id -u) == 0 ]] || die "run as root (binds 127.0.0.x, runs incrond)"
need=()
command -v csync2 >/dev/null || need+=(csync2)
command -v incrond >/dev/null || need+=(incron)
command -v lsyncd >/dev/null || need+=(lsyncd)
command -v rsync >/dev/null || need+=(rsync)
if ((${#need[@]})); then
    log "installing ${need[*]} ..."
    DEBIAN_FRONTEND=noninteractive apt-get install -y "${need[@]}" >/dev/null || die "apt-get install ${need[*]} failed"
fi
for ip in $CS_A $CS_B; do
    ! ss -Hltn "src $ip and sport = :30865" | grep -q . || die "$ip:30865 is already in use"
done
! ss -Hltn "src $RS_B and sport = :873" | grep -q . || die "$RS_B:873 is already in use"
for ip in $FD_A $FD_B; do
    ! ss -Hltn "src $ip and sport = :$PORT" | grep -q . || die "$ip:$PORT is already in use"
done
rm -rf "$W"
mkdir -p "$W"
: >"$RESULTS"
T0=$SECONDS

if [[ " $TOOLS " == *" filed-0ms "* || " $TOOLS " == *" filed "* ]]; then
    log "== filed: setup"
    filed_setup
    if [[ " $TOOLS " == *" filed-0ms "* ]]; then
        filed_start --batch-delay-ms 0
        c0=$(filed_counters)
        log "== filed-0ms: latency"
        latency filed-0ms "$F/alpha/data" "$F/beta/data"
        filed_quiet
        final_state filed-0ms "$F/alpha/data" "$F/beta/data"
        c1=$(filed_counters)
        filed_runs filed-0ms "$c0" "$c1"
        filed_stop
    fi
    filed_start
    if [[ " $TOOLS " == *" filed "* ]]; then
        c0=$(filed_counters)
        log "== filed: latency"
        latency filed "$F/alpha/data" "$F/beta/data"
        filed_quiet
        final_state filed "$F/alpha/data" "$F/beta/data"
        c1=$(filed_counters)
        filed_runs filed "$c0" "$c1"
    fi
    if [[ $ONLY_LATENCY ]]; then
        filed_stop
    else
        log "== filed: idle window of $IDLE_SECS s starts (other tools run meanwhile)"
        IDLE0=$(filed_counters)
        IDLE_T0=$EPOCHREALTIME
    fi
fi

if [[ " $TOOLS " == *" csync2 "* ]]; then
    log "== csync2 + incron: setup"
    csync2_setup
    log "== csync2 + incron: latency"
    latency csync2 "$C/a/data" "$C/b/data"
    csync2_stop # waits for the runs in flight
    final_state csync2 "$C/a/data" "$C/b/data"
    ra=$(wc -l <"$C/a/runs")
    rb=$(wc -l <"$C/b/runs")
    printf '{"kind": "runs", "tool": "csync2", "count": %s, "a": %s, "b": %s}\n' $((ra + rb)) "$ra" "$rb" >>"$RESULTS"
    log "   csync2 -x runs: $ra on A, $rb on B"
fi

if [[ " $TOOLS " == *" lsyncd "* ]]; then
    log "== lsyncd: setup"
    lsyncd_setup "$L" "$L/b"
    log "== lsyncd: latency"
    latency lsyncd "$L/a" "$L/b"
    n=$(grep -c "Calling rsync" "$L/lsyncd.log" || true)
    printf '{"kind": "runs", "tool": "lsyncd", "count": %s}\n' "$n" >>"$RESULTS"
    sleep 1
    final_state lsyncd "$L/a" "$L/b"
    stop_pid "$LS_PID"
fi

if [[ " $TOOLS " == *" lsyncd-net "* ]]; then
    LN=$W/lsyncd-net
    log "== lsyncd-net: setup (rsync daemon on $RS_B:873)"
    rsyncd_start "$LN"
    lsyncd_setup "$LN" "rsync://$RS_B/bench/"
    log "== lsyncd-net: latency"
    latency lsyncd-net "$LN/a" "$LN/b"
    n=$(grep -c "Calling rsync" "$LN/lsyncd.log" || true)
    printf '{"kind": "runs", "tool": "lsyncd-net", "count": %s}\n' "$n" >>"$RESULTS"
    sleep 1
    final_state lsyncd-net "$LN/a" "$LN/b"
    stop_pid "$LS_PID"
    stop_pid "$RS_PID"
fi

if [[ -n ${IDLE0:-} ]]; then
    left=$(awk -v t0="$IDLE_T0" -v now="$EPOCHREALTIME" -v s="$IDLE_SECS" 'BEGIN { d = s - (now - t0); print (d > 0 ? d : 0) }')
    log "== filed: idle window, ${left}s left"
    sleep "$left"
    IDLE1=$(filed_counters)
    secs=$(awk -v t0="$IDLE_T0" -v now="$EPOCHREALTIME" 'BEGIN { print now - t0 }')
    printf '{"kind": "idle", "secs": %s, "before": %s, "after": %s}\n' "$secs" "$IDLE0" "$IDLE1" >>"$RESULTS"
    if ((STORM > 0)); then
        log "== filed: storm of $STORM creates"
        storm
    fi
    filed_stop
fi

log ""
log "took $((SECONDS - T0)) s; date: $(date -u '+%Y-%m-%d %H:%M UTC'); host: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), $(uname -r)"
log "versions: csync2 $(dpkg-query -W -f '${Version}' csync2 2>/dev/null || echo '?'), incron $(dpkg-query -W -f '${Version}' incron 2>/dev/null || echo '?'), lsyncd $(dpkg-query -W -f '${Version}' lsyncd 2>/dev/null || echo '?'), rsync $(dpkg-query -W -f '${Version}' rsync 2>/dev/null || echo '?')"
report
