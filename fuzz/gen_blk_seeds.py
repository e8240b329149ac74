#!/usr/bin/env python3
"""Writes the seed corpus for the virtio_blk target (format: src/testing/fuzz_blk.rs)."""
import os, struct

out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", "virtio_blk")
os.makedirs(out, exist_ok=True)

IN, OUT, FLUSH, GET_ID, DISCARD, WZ, LIFETIME, RAW = range(8)
def req(sel, sector, bufs, payload=b""):
    b = bytes([0, sel]) + struct.pack("<HB", sector, len(bufs) - 1)
    for ln, wr in bufs: b += struct.pack("<HB", ln, wr)
    return b + bytes([len(payload)]) + payload
def notify(q): return bytes([1, q])
def cfg(off, w, v): return bytes([2, off, w]) + struct.pack("<I", v)
REAP, RESET = bytes([3]), bytes([4])
def raw(addr, data): return bytes([5]) + struct.pack("<HB", addr, len(data)) + data
def seg(sector, n, flags): return struct.pack("<QII", sector, n, flags)

rw = [(16, 0), (4096, 0), (1, 1)]
rd = [(16, 0), (4096, 1), (1, 1)]
seeds = {
    "write_read": bytes([0]) + req(OUT, 8, rw) + REAP + req(IN, 8, rd) + REAP,
    "split_layout": bytes([4]) + req(OUT | 0x40, 3, [(5, 0), (11, 0), (512, 0), (1, 1)]) + REAP
        + req(IN, 3, [(16, 0), (100, 1), (413, 1)]) + REAP,
    "two_queues": bytes([2 | 8]) + req(OUT, 1, rw) + req(OUT | 8, 2, rw) + REAP + req(IN | 8, 1, rd) + REAP,
    "read_only": bytes([1]) + req(OUT, 0, rw) + req(DISCARD, 0, [(32, 0), (1, 1)], seg(0, 8, 0)) + REAP,
    "discard_wz": bytes([0]) + req(DISCARD, 0, [(32, 0), (1, 1)], seg(0, 8, 0) + seg(64, 8, 0)) + REAP
        + req(WZ, 0, [(32, 0), (1, 1)], seg(16, 8, 1)) + req(DISCARD, 0, [(16, 0), (1, 1)], seg(0, 1, 1)) + REAP,
    "flush_id_unknown": bytes([0]) + req(FLUSH, 0, [(16, 0), (1, 1)]) + req(GET_ID, 0, [(16, 0), (20, 1), (1, 1)])
        + req(LIFETIME, 0, [(16, 0), (8, 1), (1, 1)]) + req(RAW, 7, [(16, 0), (1, 1)]) + REAP,
    "out_of_range": bytes([0]) + req(IN | 0x80, 0, rd) + req(OUT, 127, [(16, 0), (1024, 0), (1, 1)])
        + req(IN, 0, [(16, 0), (100, 1), (1, 1)]) + REAP,
    "no_status": bytes([0]) + req(OUT, 0, [(16, 0), (512, 0)]) + req(IN, 0, [(16, 0)]) + REAP,
    "writethrough": bytes([0]) + cfg(32, 0, 0) + req(OUT, 4, rw) + REAP + cfg(32, 0, 1),
    "reset_midway": bytes([8]) + req(OUT, 1, rw) + RESET + req(IN, 1, rd) + REAP + notify(7),
    "ring_garbage": bytes([12]) + req(OUT, 1, rw) + raw(0x1000, bytes(range(200))) + notify(0) + REAP,
}
for name, data in seeds.items():
    with open(os.path.join(out, name), "wb") as f:
        f.write(data)
print(f"{len(seeds)} seeds in {out}")
