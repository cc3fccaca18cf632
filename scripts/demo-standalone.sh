#!/usr/bin/env bash
# A single-node NBD export (blockd standalone) on default settings, until Ctrl-C.
#
# This runs the single-node server (`blockd standalone`) on a sparse
# 1 GiB file under a temp dir; it prints the NBD URI and the commands to use it.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

cargo build --release -p blockd --bins
BIN=target/release/blockd
WORK=$(mktemp -d /tmp/blockd-demo.XXXXXX)
PORT=${PORT:-10809}

"$BIN" standalone --backing "$WORK/disk.img" --size 1G --listen "127.0.0.1:$PORT" &
PID=$!
cleanup() { kill -TERM "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT INT TERM

for _ in $(seq 50); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then break; fi
  sleep 0.1
done

cat <<MSG

NBD export ready: nbd://127.0.0.1:$PORT/blockd   (backing file $WORK/disk.img, sparse, 1 GiB)

  nbdinfo nbd://127.0.0.1:$PORT/blockd
  qemu-io -f raw nbd://127.0.0.1:$PORT/blockd -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M'
  nbd-client 127.0.0.1 $PORT /dev/nbd0 -N blockd      (on a host with the nbd kernel module)

Press Ctrl-C to stop (blockd finishes in-flight requests, flushes and exits).
MSG
wait "$PID"
