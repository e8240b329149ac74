//! The body of the virtio-blk fuzz target, shared by `fuzz/` (libFuzzer,
//! nightly) and by the seed replay in the ordinary test suite (stable).
//!
//! The input drives a [`VirtioBlk`] over a 64 KiB [`RamDisk`] behind a
//! [`MmioTransport`], through a driver that builds requests with
//! fuzzer-chosen types, sectors, descriptor layouts and payloads (so the
//! request parser sees well-formed rings with arbitrary contents), plus
//! notifies, config writes, resets and raw guest-memory writes. After every
//! operation the transport's state is checked, and every used element of an
//! uncorrupted ring must not claim more bytes than its chain could take; any
//! panic is a bug.
//!
//! Encoding (little-endian; a truncated operation ends the input):
//!
//! | first byte | bit 0: read-only disk, 1: two queues, 2: INDIRECT_DESC, 3: EVENT_IDX |
//! |---|---|
//! | `op % 6 == 0` request | `sel: u8, sector: u16, n: u8, n × (len: u16, writable: u8), plen: u8, payload[plen]` |
//! | `1` notify | `queue: u8` |
//! | `2` config write | `offset: u8, width: u8, value: u32` |
//! | `3` reap used rings | — |
//! | `4` reset and bring-up | — |
//! | `5` raw memory write | `addr: u16, len: u8, bytes[len]` |
//!
//! `sel % 8` picks IN, OUT, FLUSH, GET_ID, DISCARD, WRITE_ZEROES,
//! GET_LIFETIME or a random type; bit 3 the queue; bit 7 a sector near the
//! top of the 64-bit range.

use alloc::sync::Arc;
use alloc::vec;
use alloc::vec::Vec;

use super::irq::RecordingIrq;
use super::mmio::{DirectIo, InitOptions, MmioDriver};
use super::queue::Buf;
use crate::addr::Width;
use crate::device::{Access, Device};
use crate::memory::{GuestMemory, GuestRam};
use crate::virtio::blk::{BlkConfig, RamDisk, RequestHeader, RequestType, VirtioBlk};
use crate::virtio::spec::features::{
    VIRTIO_F_INDIRECT_DESC, VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1,
};
use crate::virtio::spec::status::DEVICE_NEEDS_RESET;
use crate::virtio::{MmioTransport, Trigger};

/// Size of the fuzzed guest's RAM, at guest-physical 0.
pub const FUZZ_BLK_RAM: u64 = 0x4_0000;
const QSIZE: u16 = 16;
const QUEUE_BASES: [u64; 2] = [0x1000, 0x2000];
const BUF_BASE: u64 = 0x1_0000;
const BUF_END: u64 = 0x3_8000;
/// Where indirect tables go.
const TABLES: u64 = 0x3_8000;

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn bytes<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.bytes::<1>().map(|[b]| b)
    }
    fn u16(&mut self) -> Option<u16> {
        self.bytes().map(u16::from_le_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.bytes().map(u32::from_le_bytes)
    }
    fn take(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head
    }
}

type Blk = MmioTransport<VirtioBlk<RamDisk>>;

/// Runs one fuzz input. Panics only on a bug in the code under test.
pub fn fuzz_blk(data: &[u8]) {
    let mut input = Input(data);
    let Some(setup) = input.u8() else { return };
    let ram = Arc::new(GuestRam::new(0, FUZZ_BLK_RAM).expect("guest RAM"));
    let disk =
        if setup & 1 != 0 { RamDisk::new(0x1_0000).read_only() } else { RamDisk::new(0x1_0000) };
    let queues = 1 + u16::from(setup >> 1 & 1);
    let config = BlkConfig {
        num_queues: queues,
        queue_size: QSIZE,
        seg_max: Some(6),
        size_max: Some(8192),
        max_discard_sectors: 64,
        max_discard_seg: 4,
        max_write_zeroes_sectors: 64,
        max_write_zeroes_seg: 4,
        ..BlkConfig::default()
    };
    let blk = VirtioBlk::new(disk, config).expect("valid config");
    let dev: Blk =
        MmioTransport::new(blk, ram.clone(), Arc::new(RecordingIrq::new()), Trigger::Edge);
    let mut drv = MmioDriver::new(DirectIo(&dev));
    // Every virtio-blk feature bit 1–14: the device keeps what it offers.
    let mut features = VIRTIO_F_VERSION_1 | 0x7ffe;
    if setup & 4 != 0 {
        features |= VIRTIO_F_INDIRECT_DESC;
    }
    if setup & 8 != 0 {
        features |= VIRTIO_F_RING_EVENT_IDX;
    }
    let opts = InitOptions { features, ack_and_driver_together: true };
    let layout: Vec<(u16, u16, u64)> =
        (0..queues).map(|q| (q, QSIZE, QUEUE_BASES[usize::from(q)])).collect();
    let mem = &*ram;
    let mut up = drv.init(mem, opts, &layout).is_ok();
    // Writable bytes of each chain in flight, by (queue, head); cleared
    // when the rings may have been corrupted by a raw write.
    let mut in_flight: Vec<Vec<Option<u32>>> = vec![vec![None; usize::from(QSIZE)]; 2];
    let mut trusted = true;
    while let Some(op) = input.u8() {
        let done = match op % 6 {
            0 => (|| {
                let (sel, sector, n) = (input.u8()?, input.u16()?, input.u8()? % 6 + 1);
                let mut shape = Vec::new();
                for _ in 0..n {
                    shape.push((u32::from(input.u16()?) % 9000, input.u8()? & 1 != 0));
                }
                let plen = input.u8()?;
                let payload = input.take(usize::from(plen)).to_vec();
                let kind = match sel % 8 {
                    0 => 0,
                    1 => 1,
                    2 => 4,
                    3 => 8,
                    4 => 11,
                    5 => 13,
                    6 => 10,
                    _ => u32::from(sector) << 16 | u32::from(sel),
                };
                let sector =
                    if sel & 0x80 != 0 { u64::MAX - u64::from(sector) } else { u64::from(sector) };
                let q = u16::from(sel >> 3 & 1) % queues;
                // Readable first, as a well-behaved driver orders them.
                shape.sort_by_key(|&(_, w)| w);
                let mut stream = Vec::with_capacity(16 + payload.len());
                let header = RequestHeader::new(RequestType::from_raw(kind), sector);
                stream.extend_from_slice(&header.to_bytes());
                stream.extend_from_slice(&payload);
                let (mut at, mut fed, mut writable_total) = (BUF_BASE, 0usize, 0u32);
                let mut bufs = Vec::new();
                for (len, writable) in shape {
                    if at + u64::from(len) > BUF_END {
                        break;
                    }
                    let piece = if writable {
                        vec![0xee; len as usize]
                    } else {
                        let end = (fed + len as usize).min(stream.len());
                        let mut p = stream[fed.min(end)..end].to_vec();
                        p.resize(len as usize, 0);
                        fed += len as usize;
                        p
                    };
                    let _ = mem.write(at, &piece);
                    if writable {
                        writable_total += len;
                    }
                    bufs.push(Buf { addr: at, len, writable });
                    at = (at + u64::from(len) + 15) & !15;
                }
                if up && !bufs.is_empty() {
                    let gq = drv.queue(q);
                    let added = if setup & 4 != 0 && sel & 0x40 != 0 {
                        gq.add_indirect(mem, TABLES + u64::from(q) * 0x100, &bufs)
                    } else {
                        gq.add(mem, &bufs)
                    };
                    if let Ok(head) = added {
                        in_flight[usize::from(q)][usize::from(head)] = Some(writable_total);
                        let _ = drv.notify(q);
                    }
                }
                Some(())
            })(),
            1 => (|| {
                let q = input.u8()?;
                let _ = drv.notify(u16::from(q));
                Some(())
            })(),
            2 => (|| {
                let (off, w, v) = (input.u8()?, input.u8()?, input.u32()?);
                let width = [Width::U8, Width::U16, Width::U32, Width::U64][usize::from(w & 3)];
                let _ = drv.write_config(u64::from(off & 0x3f), width, u64::from(v) & width.mask());
                Some(())
            })(),
            3 => {
                if up {
                    for q in 0..queues {
                        while let Ok(Some((id, len))) = drv.queue(q).pop_used(mem) {
                            let slot = in_flight[usize::from(q)]
                                .get_mut(id as usize)
                                .and_then(Option::take);
                            if trusted && let Some(room) = slot {
                                assert!(len <= room, "used.len {len} > {room} writable bytes");
                            }
                        }
                    }
                }
                Some(())
            }
            4 => {
                let _ = drv.reset();
                up = drv.init(mem, opts, &layout).is_ok();
                in_flight.iter_mut().for_each(|q| q.fill(None));
                trusted = true;
                Some(())
            }
            _ => (|| {
                let (addr, len) = (input.u16()?, input.u8()?);
                let bytes = input.take(usize::from(len));
                let _ = mem.write(u64::from(addr), bytes);
                trusted = false;
                Some(())
            })(),
        };
        check(&dev);
        if done.is_none() {
            break;
        }
    }
}

/// What must hold after any sequence of guest actions.
fn check(dev: &Blk) {
    let status = dev.status();
    assert_eq!(status & !(0xff | DEVICE_NEEDS_RESET), 0, "status {status:#x}");
    let isr = dev.interrupt().status();
    assert_eq!(isr & !3, 0, "interrupt status {isr:#x}");
    // The config space always answers, and capacity never changes.
    let a = Access { offset: 0x100, addr: 0, width: Width::U32, vcpu: None };
    assert_eq!(dev.read(a), Ok(0x1_0000 / 512));
}
