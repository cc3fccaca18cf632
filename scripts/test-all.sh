#!/usr/bin/env bash
# Runs every test of the workspace: unit tests, property tests, and the integration tests that drive
# the real binaries with real clients (once per blockd I/O engine). Installs the Debian tools it needs.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-test-deps.sh
export PATH="$HOME/.cargo/bin:$PATH"

cargo build --workspace --bins

echo "=== unit and integration tests (blockd io engine: io_uring) ==="
BLOCKD_TEST_IO_ENGINE=uring cargo test --workspace --no-fail-fast

echo "=== blockd integration tests again with the sync engine ==="
BLOCKD_TEST_IO_ENGINE=sync cargo test -p integration-tests --no-fail-fast -- nbd
