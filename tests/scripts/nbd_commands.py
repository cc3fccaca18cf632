#!/usr/bin/python3
"""Exercise every NBD command and flag of a server through python3-libnbd (nbdsh's library).

Usage: /usr/bin/python3 nbd_commands.py URI READ_ONLY_URI
URI: a writable export of at least 130 MiB, all zeroes. READ_ONLY_URI: a read-only export.
Prints one line per check and "ALL OK" at the end; any failure raises (non-zero exit).
"""

import errno
import sys
import time

import nbd

MIB = 1 << 20
URI, RO_URI = sys.argv[1], sys.argv[2]


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print("ok:", what, flush=True)


def expect_errno(want, fn, what):
    """fn() must fail with one of the errnos in want (an int or a tuple)."""
    wants = want if isinstance(want, tuple) else (want,)
    try:
        fn()
    except nbd.Error as e:
        check(e.errnum in wants, "%s -> %s (got errno %s: %s)" % (
            what, "/".join(errno.errorcode[w] for w in wants), e.errnum, e.string))
        return e.errnum
    raise AssertionError("%s succeeded, expected %s" % (what, wants))


def pattern(seed, n):
    return bytes((seed + i * 7) & 0xFF for i in range(n))


def connect(uri, structured=True, meta=True):
    h = nbd.NBD()
    h.set_request_structured_replies(structured)
    if meta:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    return h


def extents(h, count, offset, flags=0):
    """base:allocation extents as [(offset, length, flags)]."""
    out = []

    def cb(metacontext, off, entries, err):
        assert metacontext == nbd.CONTEXT_BASE_ALLOCATION, metacontext
        pos = off
        for i in range(0, len(entries), 2):
            out.append((pos, entries[i], entries[i + 1]))
            pos += entries[i]
        return 0

    h.block_status(count, offset, cb, flags)
    return out


h = connect(URI)
size = h.get_size()
check(size >= 130 * MIB, "export size %d >= 130 MiB" % size)

# ---- negotiation results and flags
check(h.get_structured_replies_negotiated(), "structured replies negotiated")
check(h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION), "base:allocation negotiated")
check(not h.is_read_only(), "writable export is not read-only")
for name in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_cache", "can_multi_conn",
             "can_df"):
    check(getattr(h, name)(), name)
bmin = h.get_block_size(nbd.SIZE_MINIMUM)
bpref = h.get_block_size(nbd.SIZE_PREFERRED)
bmax = h.get_block_size(nbd.SIZE_MAXIMUM)
check(bmin == 1, "minimum block size 1 (got %d)" % bmin)
check(bpref >= 512 and bpref & (bpref - 1) == 0, "preferred block size %d is a power of two" % bpref)
check(bmax >= 64 * MIB, "maximum block size %d >= 64 MiB" % bmax)

# ---- pread/pwrite at odd offsets, pwrite with FUA, flush
h.pwrite(pattern(1, 1000), 12345)
check(h.pread(1000, 12345) == pattern(1, 1000), "pwrite/pread at an odd offset")
h.pwrite(b"\x42", 99999)
check(h.pread(3, 99998) == b"\x00\x42\x00", "1-byte write")
h.pwrite(pattern(2, 65536), 1 * MIB, nbd.CMD_FLAG_FUA)
check(h.pread(65536, 1 * MIB) == pattern(2, 65536), "pwrite with FUA")
h.flush()
check(True, "flush")

# ---- structured pread: data chunks for data, hole chunks allowed for holes; DF flag
chunks = []


def chunk_cb(subbuf, offset, status, err):
    chunks.append((offset, len(subbuf), status))
    return 0


buf = h.pread_structured(2 * MIB, 1 * MIB, chunk_cb)
check(bytes(buf[:65536]) == pattern(2, 65536) and bytes(buf[65536:]) == bytes(2 * MIB - 65536),
      "pread_structured data + zeroes")
check(sum(c[1] for c in chunks) == 2 * MIB, "chunks cover the request: %s" % chunks[:8])
check(all(c[2] in (nbd.READ_DATA, nbd.READ_HOLE) for c in chunks), "chunk statuses are data/hole")
chunks.clear()
h.pread_structured(4 * MIB, 100 * MIB, chunk_cb)
check(any(c[2] == nbd.READ_HOLE for c in chunks), "reading a sparse region returns hole chunks: %s" % chunks[:8])
chunks.clear()
buf = h.pread_structured(65536, 1 * MIB, chunk_cb, nbd.CMD_FLAG_DF)
check(len(chunks) == 1 and bytes(buf) == pattern(2, 65536), "pread with DF gives one chunk: %s" % chunks)

# ---- structured replies off: simple replies
hs = connect(URI, structured=False, meta=False)
check(not hs.get_structured_replies_negotiated(), "structured replies off when not requested")
check(hs.pread(1000, 12345) == pattern(1, 1000), "pread with simple replies")
check(hs.pread(3, 99998) == b"\x00\x42\x00", "1-byte pread with simple replies")
hs.pwrite(pattern(3, 4097), 2 * MIB + 3)
check(h.pread(4097, 2 * MIB + 3) == pattern(3, 4097), "write via simple-reply connection visible on the other")
hs.shutdown()

# ---- trim: data becomes zeroes and a hole
h.pwrite(pattern(4, 2 * MIB), 8 * MIB)
h.trim(2 * MIB, 8 * MIB)
check(h.pread(2 * MIB, 8 * MIB) == bytes(2 * MIB), "trim then read zeroes")
ext = extents(h, 2 * MIB, 8 * MIB)
check(all(f & nbd.STATE_HOLE for (_, _, f) in ext), "trimmed range is a hole: %s" % ext)
h.trim(1, 8 * MIB + 3, nbd.CMD_FLAG_FUA)
check(True, "trim with FUA, 1 byte")

# ---- write zeroes: plain, NO_HOLE, FAST_ZERO, FUA; unaligned
for (label, flags) in (("plain", 0), ("NO_HOLE", nbd.CMD_FLAG_NO_HOLE), ("FUA", nbd.CMD_FLAG_FUA),
                       ("NO_HOLE|FUA", nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)):
    h.pwrite(pattern(5, 3 * MIB), 12 * MIB)
    h.zero(1 * MIB + 5, 12 * MIB + 7, flags)
    data = h.pread(3 * MIB, 12 * MIB)
    check(data[:7] == pattern(5, 7) and data[7:7 + MIB + 5] == bytes(MIB + 5)
          and data[7 + MIB + 5:] == pattern(5, 3 * MIB)[7 + MIB + 5:],
          "zero %s at an odd offset" % label)
h.pwrite(pattern(6, 1 * MIB), 16 * MIB)
try:
    h.zero(1 * MIB, 16 * MIB, nbd.CMD_FLAG_FAST_ZERO)
    check(h.pread(MIB, 16 * MIB) == bytes(MIB), "zero FAST_ZERO succeeded and reads zeroes")
except nbd.Error as e:
    check(e.errnum == errno.ENOTSUP, "zero FAST_ZERO fails only with ENOTSUP (got %s)" % e.errnum)
    check(h.pread(MIB, 16 * MIB) == pattern(6, MIB), "failed FAST_ZERO left the data alone")

# ---- cache
h.cache(4 * MIB, 0)
h.cache(1, size - 1)
check(True, "cache")

# ---- block status: base:allocation, REQ_ONE
h.pwrite(pattern(7, 1 * MIB), 20 * MIB)
h.flush()
ext = extents(h, 4 * MIB, 19 * MIB)
check(sum(l for (_, l, _) in ext) <= 4 * MIB and len(ext) >= 1, "block_status covers at most the request")
data_ext = [e for e in ext if e[0] < 21 * MIB and e[0] + e[1] > 20 * MIB]
check(all(not (f & nbd.STATE_HOLE) for (_, _, f) in data_ext), "written range is data: %s" % ext)
hole_ext = [e for e in ext if e[0] < 20 * MIB and e[0] + e[1] > 19 * MIB + 4096]
check(all(f & nbd.STATE_HOLE and f & nbd.STATE_ZERO for (_, _, f) in hole_ext),
      "untouched range is hole+zero: %s" % ext)
ext1 = extents(h, 4 * MIB, 19 * MIB, nbd.CMD_FLAG_REQ_ONE)
check(len(ext1) == 1 and ext1[0][0] == 19 * MIB and ext1[0][1] <= 4 * MIB, "REQ_ONE gives one extent: %s" % ext1)
ext_all = extents(h, size, 0)
check(sum(l for (_, l, _) in ext_all) <= size, "block_status over the whole export")
ext_end = extents(h, 1, size - 1)
check(len(ext_end) >= 1 and ext_end[0][1] == 1, "block_status on the last byte")

# ---- aio: 64 commands in flight, replies out of order
big = nbd.Buffer.from_bytearray(bytearray(pattern(8, 32 * MIB)))
order = []
cookies = []


def done(tag):
    def cb(err):
        order.append((tag, err.value if hasattr(err, "value") else err))
        return 1
    return cb


cookies.append(h.aio_pwrite(big, 32 * MIB, completion=done("big"), flags=nbd.CMD_FLAG_FUA))
small_bufs = []
for i in range(63):
    b = nbd.Buffer(4096)
    small_bufs.append(b)
    cookies.append(h.aio_pread(b, 1 * MIB + i * 4096 % 65536, completion=done(i)))
check(h.aio_in_flight() == 64, "64 commands in flight (%d)" % h.aio_in_flight())
deadline = time.time() + 60
while h.aio_in_flight() > 0:
    if time.time() > deadline:
        raise AssertionError("aio commands did not complete")
    h.poll(1000)
check(len(order) == 64, "all 64 completions arrived")
check(all(e == 0 for (_, e) in order), "no aio errors: %s" % [o for o in order if o[1]][:4])
big_pos = [t for (t, _) in order].index("big")
check(big_pos > 0, "replies completed out of order (the 32 MiB FUA write finished at position %d of 64)" % big_pos)
for i, b in enumerate(small_bufs):
    off = i * 4096 % 65536
    assert b.to_bytearray() == pattern(2, 65536)[off:off + 4096], "aio pread %d content" % i
check(h.pread(32 * MIB, 32 * MIB) == pattern(8, 32 * MIB), "aio 32 MiB write landed")

# 64 mixed writes + flush in flight, all completing
bufs = [nbd.Buffer.from_bytearray(bytearray(pattern(i, 8192 + i))) for i in range(64)]
for i, b in enumerate(bufs):
    h.aio_pwrite(b, 70 * MIB + i * 20000, flags=(nbd.CMD_FLAG_FUA if i % 8 == 0 else 0))
while h.aio_in_flight() > 0:
    h.poll(1000)
h.flush()
for i in range(64):
    assert h.pread(8192 + i, 70 * MIB + i * 20000) == pattern(i, 8192 + i), "pipelined write %d" % i
check(True, "64 pipelined writes of mixed sizes at odd offsets")

# ---- multi-conn: write+flush on one connection is visible on another
h2 = connect(URI)
h2.pwrite(pattern(9, 4096), 90 * MIB + 1)
h2.flush()
check(h.pread(4096, 90 * MIB + 1) == pattern(9, 4096), "multi-conn: flushed write visible on another connection")
h2.pwrite(pattern(10, 4096), 90 * MIB + 8193, nbd.CMD_FLAG_FUA)
check(h.pread(4096, 90 * MIB + 8193) == pattern(10, 4096), "multi-conn: FUA write visible on another connection")
h2.shutdown()

# ---- one 64 MiB pwrite and pread
blob = pattern(11, 64 * MIB)
t0 = time.time()
h.pwrite(blob, 64 * MIB + 4096 + 1)
t1 = time.time()
check(h.pread(64 * MIB, 64 * MIB + 4096 + 1) == blob, "64 MiB pwrite + pread in one request each "
      "(%.2fs write, %.2fs read)" % (t1 - t0, time.time() - t1))

# ---- strict mode off: the server's own errors
h.set_strict_mode(0)
expect_errno(errno.EINVAL, lambda: h.pread(4096, size - 100), "pread past the end")
expect_errno(errno.EINVAL, lambda: h.pread(1, size), "pread at the end")
# The spec: ENOSPC (SHOULD) or EINVAL for writes beyond the end; EINVAL for reads, trims and the rest.
expect_errno((errno.EINVAL, errno.ENOSPC), lambda: h.pwrite(bytes(4096), size - 100), "pwrite past the end")
expect_errno(errno.EINVAL, lambda: h.trim(4096, size - 100), "trim past the end")
expect_errno((errno.EINVAL, errno.ENOSPC), lambda: h.zero(4096, size - 100), "zero past the end")
expect_errno(errno.EINVAL, lambda: h.cache(4096, size - 100), "cache past the end")
expect_errno(errno.EINVAL, lambda: h.pread(4096, (1 << 63) + 5), "pread at a huge offset")
expect_errno(errno.EINVAL, lambda: h.pwrite(b"x", 0, 1 << 12), "pwrite with an unknown flag")
check(h.pread(4, 99998)[1:2] == b"\x42", "connection still usable after errors")
# Above the server maximum: libnbd 1.14 caps payloads at 64 MiB on the client side, so this is only reachable
# when the server advertises less; the raw test in nbd_malformed.rs sends max+1 itself.
if bmax < 64 * MIB:
    expect_errno((errno.EINVAL, errno.EOVERFLOW, errno.ENOMEM), lambda: h.pread(bmax + 1, 0), "pread above max")
    check(h.pread(4, 99998)[1:2] == b"\x42", "connection still usable after oversize request")

# ---- read-only export: EPERM from the server
r = connect(RO_URI)
check(r.is_read_only(), "read-only export advertises READ_ONLY")
r.set_strict_mode(0)
rsize = r.get_size()
before = r.pread(4096, 0)
expect_errno(errno.EPERM, lambda: r.pwrite(b"nope", 0), "pwrite on a read-only export")
expect_errno(errno.EPERM, lambda: r.pwrite(b"nope", 0, nbd.CMD_FLAG_FUA), "pwrite FUA on a read-only export")
expect_errno(errno.EPERM, lambda: r.trim(4096, 0), "trim on a read-only export")
expect_errno(errno.EPERM, lambda: r.zero(4096, 0), "zero on a read-only export")
check(r.pread(4096, 0) == before, "read-only export unchanged and still usable")
r.flush()
r.cache(4096, 0)
check(True, "flush and cache allowed on a read-only export")
r.shutdown()

h.shutdown()
print("ALL OK", flush=True)
