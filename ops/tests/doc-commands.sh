#!/usr/bin/env bash
# Runs the shell blocks of a Markdown file whose fence is "```sh doc-test", in order, as one
# bash script (set -euo pipefail) in a fresh temp dir, with BIN_DIR first on PATH. Background
# processes the blocks leave running are killed at the end.
#
#   ops/tests/doc-commands.sh DOC.md BIN_DIR PORT_BASE
# The blocks read the port base from $P. Prints each block before running it; exit status is
# the script's.
set -euo pipefail
DOC=$(realpath "$1") BIN_DIR=$(realpath "$2") PORT=$3
WORK=$(mktemp -d /tmp/doc-commands.XXXXXX)
SCRIPT="$WORK/doc-script.sh"
{
  echo 'set -euo pipefail'
  echo 'cleanup_doc() { for j in $(jobs -p); do kill -TERM "$j" 2>/dev/null || true; done; wait 2>/dev/null || true; }'
  echo 'trap cleanup_doc EXIT'
  awk '
    /^```sh doc-test[[:space:]]*$/ { inblock = 1; n++; printf("echo \"--- doc block %d (line %d)\"\n", n, NR); next }
    /^```/ && inblock { inblock = 0; next }
    inblock { print }
  ' "$DOC"
} >"$SCRIPT"
blocks=$(grep -c '^```sh doc-test' "$DOC")
[ "$blocks" -gt 0 ] || { echo "no doc-test blocks in $DOC" >&2; exit 2; }
echo "running $blocks doc-test blocks of $DOC in $WORK"
rc=0
(cd "$WORK" && PATH="$BIN_DIR:$PATH" P="$PORT" RUST_BACKTRACE=0 bash -x "$SCRIPT") >"$WORK/out.log" 2>&1 || rc=$?
cat "$WORK/out.log"
if [ $rc -ne 0 ]; then
  for f in "$WORK"/guide/*.log; do [ -f "$f" ] && { echo "=== $f"; tail -n 20 "$f"; }; done
  echo "doc-test blocks FAILED (exit $rc)"
else
  echo "doc-test blocks passed"
fi
[ "${KEEP:-0}" = 1 ] && echo "kept $WORK" || rm -rf "$WORK"
exit $rc
