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

cargo build --workspace --bins || exit 1

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
  env BLOCKD_TEST_IO_ENGINE=sync cargo test -p integration-tests --no-fail-fast \
  --test nbd_clients --test nbd_tls --test nbd_malformed --test nbd_fs
stage "all unit and integration tests (blockd io engine: io_uring)" \
  env BLOCKD_TEST_IO_ENGINE=uring cargo test --workspace --no-fail-fast

if ((${#failed[@]})); then
  printf 'FAILED stage: %s\n' "${failed[@]}"
  exit 1
fi
echo "all test stages passed"
