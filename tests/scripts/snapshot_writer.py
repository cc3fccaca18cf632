#!/usr/bin/python3
"""Self-describing 4 KiB writes (16 in flight) to the first BLOCKS blocks of an NBD export, until SIGTERM.

Usage: /usr/bin/python3 snapshot_writer.py URI BLOCKS LOG
Block idx written as version v holds 128 copies of <QQQQ (MAGIC, idx, v, MAGIC ^ idx ^ v); versions count up
from 1 across all blocks, so each (idx, v) is written once. Prints "WRITING" once writes are acknowledged.
SIGUSR1 marks a moment (the test sends it right before taking a snapshot). On SIGTERM, writes LOG as JSON:
{"issued": [[idx, v], ...], "before": {"idx": highest v acknowledged before the mark}, "acked": N}.
"""

import json
import random
import signal
import struct
import sys

import nbd

BS = 4096
MAGIC = 0x534E4150424C4B44
DEPTH = 16

uri, blocks, log = sys.argv[1], int(sys.argv[2]), sys.argv[3]
h = nbd.NBD()
h.connect_uri(uri)

issued = []
acked_latest = {}
before = None
stop = False
in_flight = {}
version = 0
acked = 0


def on_usr1(*_):
    global before
    before = dict(acked_latest)


def on_term(*_):
    global stop
    stop = True


signal.signal(signal.SIGUSR1, on_usr1)
signal.signal(signal.SIGTERM, on_term)


def completion(idx, v):
    def cb(err):
        global acked
        e = err.value if hasattr(err, "value") else err
        in_flight.pop((idx, v), None)
        if e == 0:
            acked += 1
            if acked_latest.get(idx, 0) < v:
                acked_latest[idx] = v
        return 1
    return cb


announced = False
rng = random.Random(7)
while not stop:
    while len(in_flight) < DEPTH and not stop:
        idx = rng.randrange(blocks)
        if any(k[0] == idx for k in in_flight):
            continue  # one write per block in flight: every acked version is ordered
        version += 1
        rec = struct.pack("<QQQQ", MAGIC, idx, version, MAGIC ^ idx ^ version)
        buf = nbd.Buffer.from_bytearray(bytearray(rec * (BS // 32)))
        in_flight[(idx, version)] = buf
        issued.append([idx, version])
        h.aio_pwrite(buf, idx * BS, completion=completion(idx, version))
    if not announced and acked >= 64:
        print("WRITING", flush=True)
        announced = True
    try:
        h.poll(100)
    except nbd.Error:
        break
while in_flight:
    try:
        h.poll(1000)
    except nbd.Error:
        break
with open(log, "w") as f:
    json.dump({"issued": issued, "before": before or {}, "acked": acked}, f)
print("DONE", flush=True)
