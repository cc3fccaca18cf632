#!/usr/bin/env bash
# The release build: the workspace release profile uses LTO; `cargo install --path blockd` and
# `--path filed` install blockd, blockctl and filed (into a temp root, reusing the workspace
# target dir); the installed binaries need nothing beyond the libc family (ldd).
#   ops/tests/release-check.sh           the release profile (LTO: about 5 minutes here)
#   ops/tests/release-check.sh --debug   the same install and link check on the dev profile (the
#                                        test suite's run: it skips the LTO build, not the checks)
set -euo pipefail
PROFILE_ARGS=()
case "${1:-}" in
  --debug) PROFILE_ARGS=(--debug) ;;
  "") ;;
  *) echo "usage: $0 [--debug]" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/../.."
export PATH="$HOME/.cargo/bin:$PATH"
grep -A4 '^\[profile.release\]' Cargo.toml | grep -Eq '^lto = ("thin"|"fat"|true)' ||
  { echo "FAIL: [profile.release] has no lto setting"; exit 1; }
echo "release profile: $(grep -A4 '^\[profile.release\]' Cargo.toml | grep '^lto')"
ROOT=$(mktemp -d /tmp/release-check.XXXXXX)
trap 'rm -rf "$ROOT"' EXIT
TARGET=${CARGO_TARGET_DIR:-$PWD/target}
for crate in blockd filed; do
  cargo install --quiet --locked "${PROFILE_ARGS[@]}" --path "$crate" --root "$ROOT" --target-dir "$TARGET"
done
status=0
for bin in blockd blockctl filed; do
  f="$ROOT/bin/$bin"
  [ -x "$f" ] || { echo "FAIL: $bin not installed"; status=1; continue; }
  "$f" --version
  libs=$(ldd "$f" | awk '{print $1}' | sed 's#.*/##')
  extra=$(printf '%s\n' $libs | grep -Ev '^(linux-vdso\.so\.1|libc\.so\.6|libm\.so\.6|libgcc_s\.so\.1|libpthread\.so\.0|libdl\.so\.2|librt\.so\.1|ld-linux-x86-64\.so\.2|ld-linux-aarch64\.so\.1)$' || true)
  echo "$bin links: $(echo $libs)"
  if [ -n "$extra" ]; then echo "FAIL: $bin needs $extra"; status=1; fi
done
[ $status -eq 0 ] && echo "release check passed"
exit $status
