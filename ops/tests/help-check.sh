#!/usr/bin/env bash
# Every argument and option of every (sub)command of the given binaries has help text.
#   ops/tests/help-check.sh BIN...
# Prints each command checked; lists every undocumented entry and exits 1 if there is any.
set -uo pipefail
missing=0
check() { # BIN [SUBCOMMAND]
  local out
  out=$("$@" -h 2>&1) || { echo "FAIL: $* -h exited non-zero"; missing=$((missing + 1)); return; }
  echo "checked: $(basename "$1") ${*:2}"
  # Entries of the Arguments/Options sections: "  -x, --flag <V>  text", "  <NAME>  text", or
  # the text on the following, deeper-indented line.
  local bad
  bad=$(printf '%s\n' "$out" | awk '
    { sub(/[ \t]+$/, "") }
    /^(Arguments|Options):/ { sec = 1; next }
    /^[A-Z][a-z]+:/ { sec = 0 }
    sec && /^ {2,6}[-<\[]/ {
      if (pending != "") print pending
      pending = ($0 ~ /^ +[^ ].*[^ ]  +[^ ]/) ? "" : $0
      next
    }
    sec && pending != "" && /^ {8,}[^ ]/ { pending = ""; next }
    END { if (pending != "") print pending }')
  if [ -n "$bad" ]; then
    printf 'UNDOCUMENTED in %s %s:\n%s\n' "$(basename "$1")" "${*:2}" "$bad"
    missing=$((missing + 1))
  fi
}
for bin in "$@"; do
  check "$bin"
  subs=$("$bin" -h 2>/dev/null | awk '/^Commands:/ { c = 1; next } /^[A-Z][a-z]+:/ { c = 0 } c && /^  [a-z]/ { print $1 }' | grep -v '^help$')
  for s in $subs; do check "$bin" "$s"; done
done
[ $missing -eq 0 ] && echo "help complete" || { echo "$missing command(s) with undocumented arguments"; exit 1; }
