#!/usr/bin/env bash
# ocf-tester against ops/ocf/blockd with real daemons: a 2-node cluster (alpha, beta) on
# 127.0.0.1. beta runs as a plain blockd process; alpha is managed by the agent. alpha is
# first synced once (promote --force, wait-sync, demote, stop) so its data is UpToDate and
# the agent's promote succeeds. Pacemaker's score tools are replaced by recording stubs
# (HA_SBIN_DIR), so the promotion scores the agent sets are checked too.
#
#   ops/tests/ocf-blockd.sh BLOCKD BLOCKCTL PORT_BASE
# PORT_BASE..PORT_BASE+3 must be free on 127.0.0.1. Exit 0 when every check passes.
set -euo pipefail
BLOCKD=$(realpath "$1") BLOCKCTL=$(realpath "$2") P=$3
AGENT=$(realpath "$(dirname "$0")/../ocf/blockd")
command -v ocf-tester >/dev/null || { echo "ocf-tester missing (apt-get install resource-agents libxml2-utils)" >&2; exit 2; }

WORK=$(mktemp -d /tmp/ocf-blockd.XXXXXX)
chmod 755 "$WORK"
BETA_PID=
cleanup() {
  [ -n "$BETA_PID" ] && kill -TERM "$BETA_PID" 2>/dev/null && wait "$BETA_PID" 2>/dev/null || true
  if [ -f "$WORK/rsctmp/blockd-blockd_r0.pid" ]; then kill -TERM "$(cat "$WORK/rsctmp/blockd-blockd_r0.pid")" 2>/dev/null || true; fi
  [ "${KEEP:-0}" = 1 ] && echo "kept $WORK" || rm -rf "$WORK"
}
trap cleanup EXIT

cat >"$WORK/cluster.toml" <<TOML
[global]
protocol = "C"
secret-file = "secret"
control-socket = "$WORK/{node}.sock"
[global.tls]
ca = "certs/ca.pem"
cert = "certs/{node}.pem"
key = "certs/{node}.key"

[resource.r0.node.alpha]
id = 0
address = "127.0.0.1:$P"
nbd = "127.0.0.1:$((P + 1))"
backing = "alpha.img"

[resource.r0.node.beta]
id = 1
address = "127.0.0.1:$((P + 2))"
nbd = "127.0.0.1:$((P + 3))"
backing = "beta.img"
TOML
C="$WORK/cluster.toml"
truncate -s 64M "$WORK/alpha.img" "$WORK/beta.img"
"$BLOCKCTL" --config "$C" certs --dir "$WORK/certs" >/dev/null
"$BLOCKCTL" --config "$C" gen-secret "$WORK/secret"
for n in alpha beta; do "$BLOCKCTL" --config "$C" --node $n create-md r0 >/dev/null; done
ctl() { "$BLOCKCTL" --config "$C" --node "$@"; }
wait_up() { for _ in $(seq 200); do ctl "$1" status r0 >/dev/null 2>&1 && return 0; sleep 0.1; done; echo "$1 not up" >&2; return 1; }

"$BLOCKD" --config "$C" --node beta >"$WORK/beta.log" 2>&1 &
BETA_PID=$!
wait_up beta

# The first sync: alpha (as a per-resource process, as the agent runs it) becomes UpToDate.
"$BLOCKD" --config "$C" --node alpha --resource r0 >"$WORK/alpha-init.log" 2>&1 &
A=$!
wait_up alpha
ctl alpha promote r0 --force
ctl alpha wait-sync r0 --timeout 120 2>/dev/null
ctl alpha demote r0
kill -TERM $A; wait $A

# Recording stand-ins for Pacemaker's crm_master / crm_attribute.
mkdir -p "$WORK/sbin" "$WORK/rsctmp"
for t in crm_master crm_attribute; do
  printf '#!/bin/sh\necho "%s $*" >>"%s/scores.log"\n' "$t" "$WORK" >"$WORK/sbin/$t"
  chmod 755 "$WORK/sbin/$t"
done
export HA_SBIN_DIR="$WORK/sbin" HA_RSCTMP="$WORK/rsctmp"
PARAMS=(-o config="$C" -o resource=r0 -o node=alpha -o blockd="$BLOCKD" -o blockctl="$BLOCKCTL")

echo "=== ocf-tester ops/ocf/blockd"
ocf-tester -v -n blockd_r0 "${PARAMS[@]}" "$AGENT" >"$WORK/ocf-tester.log" 2>&1 || {
  cat "$WORK/ocf-tester.log"; echo "--- agent-run blockd log"; cat "$WORK/rsctmp/blockd-blockd_r0.log" || true; exit 1; }
grep -E "^(Beginning|\* |Tests failed|.*passed all tests)" "$WORK/ocf-tester.log"
grep -q "passed all tests" "$WORK/ocf-tester.log"

# Promotion scores: UpToDate with the peer connected = 10000 (set during the run).
grep -q -- "-v 10000" "$WORK/scores.log" || { echo "no score 10000 set:"; cat "$WORK/scores.log"; exit 1; }
grep -q -- "-D" "$WORK/scores.log" || { echo "stop did not remove the score:"; cat "$WORK/scores.log"; exit 1; }

# Agent-run alpha with beta connected: 10000; beta gone while alpha is UpToDate: 1000.
: >"$WORK/scores.log"
export OCF_ROOT=/usr/lib/ocf OCF_RESOURCE_INSTANCE=blockd_r0 OCF_RESKEY_CRM_meta_interval=20000
export OCF_RESKEY_config="$C" OCF_RESKEY_resource=r0 OCF_RESKEY_node=alpha OCF_RESKEY_blockd="$BLOCKD" OCF_RESKEY_blockctl="$BLOCKCTL"
"$AGENT" start
for _ in $(seq 100); do ctl alpha status r0 | grep -q "connection:connected" && break; sleep 0.1; done
rc=0; "$AGENT" monitor || rc=$?
[ $rc -eq 0 ] || { echo "monitor of a running Secondary returned $rc"; exit 1; }
tail -n 1 "$WORK/scores.log" | grep -q -- "-v 10000\$" || { echo "expected 10000 with the peer:"; cat "$WORK/scores.log"; exit 1; }
kill -TERM "$BETA_PID"; wait "$BETA_PID" || true; BETA_PID=
for _ in $(seq 100); do ctl alpha status r0 | grep -q "connection:connected" || break; sleep 0.1; done
"$AGENT" monitor || true
tail -n 1 "$WORK/scores.log" | grep -q -- "-v 1000\$" || { echo "expected 1000 without the peer:"; cat "$WORK/scores.log"; exit 1; }
# Restarted without any peer: Consistent, not promotable by Pacemaker (no score).
"$AGENT" stop
"$AGENT" start
tail -n 1 "$WORK/scores.log" | grep -q -- "-D\$" || { echo "expected no score for Consistent data:"; cat "$WORK/scores.log"; exit 1; }
"$AGENT" stop
rc=0; "$AGENT" monitor || rc=$?
[ $rc -eq 7 ] || { echo "monitor after stop returned $rc"; exit 1; }

# A config naming no such resource fails validation with OCF_ERR_CONFIGURED (6).
rc=0; OCF_RESKEY_resource=nope "$AGENT" validate-all 2>/dev/null || rc=$?
[ $rc -eq 6 ] || { echo "validate-all with an unknown resource returned $rc"; exit 1; }
echo "scores: $(sort -u "$WORK/scores.log" | tr '\n' ';')"
echo "OCF blockd: all checks passed"
