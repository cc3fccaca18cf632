#!/usr/bin/env bash
# ocf-tester against ops/ocf/filed with a real `filed daemon` (host alpha of a two-host config
# on 127.0.0.x; the peer is not running, which filed reports as "peer unreachable" while
# running normally).
#
#   ops/tests/ocf-filed.sh FILED PORT
# 127.0.0.1:PORT must be free. Exit 0 when every check passes.
set -euo pipefail
FILED=$(realpath "$1") P=$2
AGENT=$(realpath "$(dirname "$0")/../ocf/filed")
command -v ocf-tester >/dev/null || { echo "ocf-tester missing (apt-get install resource-agents libxml2-utils)" >&2; exit 2; }

WORK=$(mktemp -d /tmp/ocf-filed.XXXXXX)
chmod 755 "$WORK"
cleanup() {
  if [ -f "$WORK/rsctmp/filed-filed.pid" ]; then kill -TERM "$(cat "$WORK/rsctmp/filed-filed.pid")" 2>/dev/null || true; sleep 0.5; fi
  [ "${KEEP:-0}" = 1 ] && echo "kept $WORK" || rm -rf "$WORK"
}
trap cleanup EXIT

mkdir -p "$WORK/alpha/data" "$WORK/beta/data" "$WORK/rsctmp"
cat >"$WORK/filed.toml" <<TOML
ca = "pki/ca.pem"
ca-key = "pki/ca.key"

[hosts.alpha]
address = "127.0.0.1:$P"
state = "alpha/state.redb"
cert = "pki/alpha.pem"
key = "pki/alpha.key"
prefix = { data = "alpha/data" }

[hosts.beta]
address = "127.0.0.1:$((P + 1))"
state = "beta/state.redb"
cert = "pki/beta.pem"
key = "pki/beta.key"
prefix = { data = "beta/data" }

[groups.data]
hosts = ["alpha", "beta"]
key = "pki/data.key"
include = ["%data%"]
TOML
"$FILED" --config "$WORK/filed.toml" keygen >/dev/null
echo hello >"$WORK/alpha/data/file.txt"

export HA_RSCTMP="$WORK/rsctmp"
echo "=== ocf-tester ops/ocf/filed"
ocf-tester -v -n filed -o config="$WORK/filed.toml" -o node=alpha -o filed="$FILED" "$AGENT" \
  >"$WORK/ocf-tester.log" 2>&1 || {
  cat "$WORK/ocf-tester.log"; echo "--- daemon log"; cat "$WORK/rsctmp/filed-filed.log" || true; exit 1; }
grep -E "^(Beginning|\* |Tests failed|.*passed all tests)" "$WORK/ocf-tester.log"
grep -q "passed all tests" "$WORK/ocf-tester.log"

# A config that does not exist fails validation with OCF_ERR_INSTALLED (5).
export OCF_ROOT=/usr/lib/ocf OCF_RESOURCE_INSTANCE=filed OCF_RESKEY_filed="$FILED"
rc=0; OCF_RESKEY_config="$WORK/missing.toml" "$AGENT" validate-all 2>/dev/null || rc=$?
[ $rc -eq 5 ] || { echo "validate-all with a missing config returned $rc"; exit 1; }
echo "OCF filed: all checks passed"
