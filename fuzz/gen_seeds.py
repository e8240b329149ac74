#!/usr/bin/env python3
"""Writes the seed corpus for the virtio_mmio target (format: src/testing/fuzz.rs)."""
import os, struct

out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", "virtio_mmio")
os.makedirs(out, exist_ok=True)

def reg_w(off, val, w=2): return bytes([0]) + struct.pack("<HBI", off, w, val)
def reg_r(off, w=2): return bytes([1]) + struct.pack("<HB", off, w)
def mem_w(addr, data): return bytes([2]) + struct.pack("<HB", addr, len(data)) + data
def notify(q): return bytes([3, q])
def bringup(f, size_log2, base): return bytes([4]) + struct.pack("<BBH", f, size_log2, base)
def chain(bufs, indirect=0):
    b = bytes([5, len(bufs) - 1, indirect])
    for addr, ln, wr in bufs: b += struct.pack("<HHB", addr, ln, wr)
    return b
ACK, REAP, RESET = bytes([6]), bytes([7]), bytes([9])
def hostile(i): return bytes([8, i])

good = [(0x8000, 16, 0), (0x9000, 16, 1)]
seeds = {
    "identity": bytes([0]) + b"".join(reg_r(o) for o in range(0, 0x100, 4)) + reg_r(0x100, 0) + reg_r(0x104, 3),
    "linux_bringup_echo": bytes([0]) + bringup(3, 4, 0x1000) + chain(good) + ACK + REAP,
    "ack_driver_together_indirect": bytes([1]) + bringup(7, 3, 0x2000) + chain(good + [(0xa000, 8, 1)], 1) + ACK + REAP,
    "level_irq": bytes([2]) + bringup(2, 5, 0x1000) + chain(good) + chain(good) + ACK + REAP + ACK,
    "manual_registers": bytes([0]) + reg_w(0x70, 3) + reg_w(0x24, 1) + reg_w(0x20, 1) + reg_w(0x24, 0)
        + reg_w(0x20, 0x30000000) + reg_w(0x70, 11) + reg_r(0x70) + reg_w(0x30, 0) + reg_w(0x38, 8)
        + reg_w(0x80, 0x1000) + reg_w(0x90, 0x1080) + reg_w(0xa0, 0x1100) + reg_w(0x44, 1)
        + reg_w(0x70, 15) + reg_w(0x50, 0) + reg_r(0x60) + reg_w(0x64, 3) + reg_w(0x70, 0),
    "raw_ring_garbage": bytes([0]) + bringup(3, 3, 0x1000) + mem_w(0x1000, bytes(range(128)))
        + mem_w(0x1080, struct.pack("<HH", 0, 5) + bytes([1, 0, 7, 0, 3, 0, 9, 0])) + notify(0) + REAP,
    "reset_cycle": bytes([0]) + bringup(3, 4, 0x1000) + chain(good) + RESET + bringup(1, 2, 0x3000) + chain(good) + REAP,
    "bad_notify_and_config": bytes([1]) + bringup(3, 4, 0x1000) + notify(1) + notify(255) + reg_w(0x50, 0xffffffff)
        + reg_w(0x108, 0xdeadbeef) + reg_r(0x108) + reg_r(0x1fc) + reg_w(0x101, 1, 1) + reg_r(0x100, 3),
}
for i in range(21):
    seeds[f"hostile_{i:02}"] = bytes([0]) + bringup(3, 4, 0x1000) + chain(good) + REAP + hostile(i) + ACK + REAP + chain(good) + REAP
for name, data in seeds.items():
    with open(os.path.join(out, name), "wb") as f: f.write(data)
print(len(seeds), "seeds in", out)
