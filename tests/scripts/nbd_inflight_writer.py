#!/usr/bin/python3
"""Keep up to 32 writes in flight against an NBD export until the server goes away.

Usage: /usr/bin/python3 nbd_inflight_writer.py URI
Slot i (SLOT bytes at i * SLOT) gets the 8-byte little-endian index i, repeated. Prints "WRITING" once writes are
in flight, then, after the connection ends (the test sends SIGTERM to the server), one JSON line:
{"slot": SLOT, "acked": [indexes whose write completed without error], "unacked": N}.
"""

import json
import struct
import sys
import time

import nbd

SLOT = 65536
DEPTH = 32

h = nbd.NBD()
h.connect_uri(sys.argv[1])
nslots = h.get_size() // SLOT

acked = []
failed = []
bufs = {}


def completion(idx):
    def cb(err):
        e = err.value if hasattr(err, "value") else err
        (acked if e == 0 else failed).append(idx)
        bufs.pop(idx, None)
        return 1
    return cb


next_idx = 0
announced = False
deadline = time.time() + 60
try:
    while time.time() < deadline:
        while h.aio_in_flight() < DEPTH and next_idx < nslots:
            data = bytearray(struct.pack("<Q", next_idx) * (SLOT // 8))
            buf = nbd.Buffer.from_bytearray(data)
            bufs[next_idx] = buf
            h.aio_pwrite(buf, next_idx * SLOT, completion=completion(next_idx))
            next_idx += 1
        if next_idx >= nslots:
            next_idx = 0  # wrap: rewrite the same pattern again
        if not announced and len(acked) >= 64:
            print("WRITING", flush=True)
            announced = True
        h.poll(1000)
except nbd.Error:
    pass  # the server closed the connection
if not announced:
    print("WRITING", flush=True)
print(json.dumps({"slot": SLOT, "acked": sorted(set(acked)), "unacked": len(failed) + len(bufs)}), flush=True)
