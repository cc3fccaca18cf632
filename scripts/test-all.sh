#!/usr/bin/env bash
# Runs every test of the workspace: unit tests, property tests, the integration tests that drive
# the real binaries with real clients (once per blockd I/O engine), and the VM tests with the real
# kernel nbd-client. Installs the Debian tools it needs. Every stage runs; the exit status is
# non-zero if any stage failed.
set -uo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-test-deps.sh || exit 1
export PATH="$HOME/.cargo/bin:$PATH"
export NO_COLOR=1

# Every cargo command here and in the test harnesses selects the whole workspace (`--workspace`),
# so the dependencies are built once with one set of features; `-p CRATE` alone would unify
# them differently and rebuild tokio, the crates and the test binaries for each selection.
cargo build --workspace --bins || exit 1
cargo test --workspace --no-run || exit 1

failed=()
stage() {
  local name=$1
  shift
  echo "=== $name ==="
  if ! "$@"; then
    failed+=("$name")
  fi
}

stage "the main job: a primary + secondary demo, data checked on both" \
  env PROFILE=debug BASE_PORT=17900 bash scripts/demo.sh --check
stage "vm-tests: the real kernel nbd-client in QEMU" \
  bash vm-tests/run.sh --strict 1 2 3 4 crash
stage "blockd integration tests with the sync engine" \
  env BLOCKD_TEST_IO_ENGINE=sync cargo test --workspace --no-fail-fast \
  --test nbd_clients --test nbd_tls --test nbd_malformed --test nbd_fs
# The snapshot test spends most of its time waiting (two reads of a snapshot minutes apart while a
# writer runs), so it runs beside the rest of the suite instead of after it.
export BLOCKD_TEST_IO_ENGINE=uring
slow_tests=(repl_snapshot)
other_tests=()
for name in $(sed -n 's/^name = "\(.*\)"$/\1/p' tests/Cargo.toml); do
  [ "$name" = integration-tests ] && continue
  [[ " ${slow_tests[*]} " == *" $name "* ]] || other_tests+=(--test "$name")
done
slow_log=$(mktemp)
(
  cargo test --workspace --no-fail-fast $(printf -- '--test %s ' "${slow_tests[@]}") >"$slow_log" 2>&1
) &
slow_pid=$!
# Unit tests: every crate's library and binaries (the test harness's own tests included) and the
# test files of the crates themselves (the integration tests of `tests/` run below).
crate_tests=()
for f in blockd/tests/*.rs filed/tests/*.rs common/tests/*.rs; do
  [ -e "$f" ] && crate_tests+=(--test "$(basename "$f" .rs)")
done
stage "unit tests of every crate" \
  cargo test --workspace --no-fail-fast --lib --bins "${crate_tests[@]}"
stage "integration tests (blockd io engine: io_uring)" \
  cargo test --workspace --no-fail-fast "${other_tests[@]}"
echo "=== integration tests run alongside: ${slow_tests[*]} ==="
wait "$slow_pid"
slow_rc=$?
cat "$slow_log"
rm -f "$slow_log"
((slow_rc == 0)) || failed+=("integration tests run alongside: ${slow_tests[*]}")

if ((${#failed[@]})); then
  printf 'FAILED stage: %s\n' "${failed[@]}"
  exit 1
fi
echo "all test stages passed"
