//! The body of the virtio-mmio fuzz target, shared by `fuzz/` (libFuzzer,
//! nightly) and by the corpus replay in the ordinary test suite (stable).
//!
//! The input is a byte stream of operations on an [`EchoDevice`] behind a
//! [`MmioTransport`] over 64 KiB of guest RAM: raw register reads and writes
//! at any offset and width, raw guest-memory writes, notifies, a well-formed
//! bring-up and well-formed chains (so the fuzzer reaches live queues
//! quickly), hostile rings, interrupt acks. After every operation the
//! transport's visible state is checked for consistency; any panic is a bug.
//!
//! Encoding (little-endian; a truncated operation ends the input):
//!
//! | first byte | bit 0: two queues, bit 1: level-triggered interrupt |
//! |---|---|
//! | `op % 10 == 0` register write | `off: u16, width: u8, value: u32` |
//! | `1` register read | `off: u16, width: u8` |
//! | `2` memory write | `addr: u16, len: u8, bytes[len]` |
//! | `3` notify | `queue: u8` |
//! | `4` bring-up | `features: u8, size_log2: u8, base: u16` |
//! | `5` add chain | `n: u8, indirect: u8, n × (addr: u16, len: u16, writable: u8)` |
//! | `6` ack interrupt | — |
//! | `7` reap used ring | — |
//! | `8` hostile ring | `case: u8` |
//! | `9` reset | — |

use alloc::sync::Arc;
use alloc::vec::Vec;

use super::echo::EchoDevice;
use super::hostile::{Hostile, HostileEnv};
use super::irq::RecordingIrq;
use super::mmio::{DirectIo, InitOptions, MmioDriver};
use super::queue::Buf;
use crate::addr::Width;
use crate::device::{Access, Device};
use crate::memory::{GuestMemory, GuestRam};
use crate::virtio::spec::features::{
    VIRTIO_F_INDIRECT_DESC, VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1,
};
use crate::virtio::spec::mmio as regs;
use crate::virtio::spec::status::DEVICE_NEEDS_RESET;
use crate::virtio::{MmioTransport, Trigger};

/// Size of the fuzzed guest's RAM, at guest-physical 0.
pub const FUZZ_RAM: u64 = 0x1_0000;

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

fn width(b: u8) -> Width {
    match b & 3 {
        0 => Width::U8,
        1 => Width::U16,
        2 => Width::U32,
        _ => Width::U64,
    }
}

/// Runs one fuzz input. Panics only on a bug in the code under test.
pub fn fuzz_mmio(data: &[u8]) {
    let mut input = Input(data);
    let Some(setup) = input.u8() else { return };
    let ram = Arc::new(GuestRam::new(0, FUZZ_RAM).expect("64 KiB of RAM"));
    let trigger = if setup & 2 != 0 { Trigger::Level } else { Trigger::Edge };
    let device = EchoDevice::with_features(
        1 + u16::from(setup & 1),
        128,
        VIRTIO_F_VERSION_1 | VIRTIO_F_INDIRECT_DESC | VIRTIO_F_RING_EVENT_IDX,
    );
    let dev = MmioTransport::new(device, ram.clone(), Arc::new(RecordingIrq::new()), trigger);
    let mut drv = MmioDriver::new(DirectIo(&dev));
    let mut queue_up = false;
    let mem = &*ram;
    while let Some(op) = input.u8() {
        let done = match op % 10 {
            0 => (|| {
                let (off, w, v) = (input.u16()?, input.u8()?, input.u32()?);
                let w = width(w);
                let a = Access { offset: u64::from(off & 0x1ff), addr: 0, width: w, vcpu: None };
                let _ = dev.write(a, u64::from(v) & w.mask());
                Some(())
            })(),
            1 => (|| {
                let (off, w) = (input.u16()?, input.u8()?);
                let w = width(w);
                let a = Access { offset: u64::from(off & 0x1ff), addr: 0, width: w, vcpu: None };
                if let Ok(v) = dev.read(a) {
                    assert_eq!(v & !w.mask(), 0, "read wider than its access");
                }
                Some(())
            })(),
            2 => (|| {
                let (addr, len) = (input.u16()?, input.u8()?);
                let bytes = input.take(usize::from(len));
                let _ = mem.write(u64::from(addr), bytes);
                Some(())
            })(),
            3 => (|| {
                let q = input.u8()?;
                let _ = drv.notify(u16::from(q));
                Some(())
            })(),
            4 => (|| {
                let (f, size_log2, base) = (input.u8()?, input.u8()?, input.u16()?);
                let mut features = VIRTIO_F_VERSION_1;
                if f & 1 != 0 {
                    features |= VIRTIO_F_INDIRECT_DESC;
                }
                if f & 2 != 0 {
                    features |= VIRTIO_F_RING_EVENT_IDX;
                }
                let size = 1u16 << (size_log2 % 8);
                let base = u64::from(base & !0xf).min(FUZZ_RAM - 0x1000);
                let opts = InitOptions { features, ack_and_driver_together: f & 4 != 0 };
                queue_up = drv.init(mem, opts, &[(0, size, base)]).is_ok();
                Some(())
            })(),
            5 => (|| {
                let (n, indirect) = (input.u8()? % 8 + 1, input.u8()?);
                let mut bufs = Vec::new();
                for _ in 0..n {
                    let (addr, len, w) = (input.u16()?, input.u16()?, input.u8()?);
                    bufs.push(Buf {
                        addr: u64::from(addr),
                        len: u32::from(len),
                        writable: w & 1 != 0,
                    });
                }
                // Readable before writable, as a well-behaved driver does.
                bufs.sort_by_key(|b| b.writable);
                if queue_up {
                    let q = drv.queue(0);
                    let _ = if indirect & 1 != 0 {
                        q.add_indirect(mem, FUZZ_RAM - 0x800, &bufs)
                    } else {
                        q.add(mem, &bufs)
                    };
                    let _ = drv.notify(0);
                }
                Some(())
            })(),
            6 => drv.ack_interrupt().ok().map(drop),
            7 => {
                if queue_up {
                    let q = drv.queue(0);
                    while let Ok(Some(_)) = q.pop_used(mem) {}
                }
                Some(())
            }
            8 => (|| {
                let case = Hostile::ALL[usize::from(input.u8()?) % Hostile::ALL.len()];
                if queue_up && drv.queue(0).config().size >= 4 {
                    let env = HostileEnv { scratch: FUZZ_RAM - 0x4000, ram_end: FUZZ_RAM };
                    let _ = case.build(mem, drv.queue(0), env);
                    let _ = drv.notify(0);
                }
                Some(())
            })(),
            _ => {
                queue_up = false;
                let _ = drv.reset();
                Some(())
            }
        };
        check(&dev);
        if done.is_none() {
            break;
        }
    }
}

/// What must hold after any sequence of guest actions.
fn check(dev: &MmioTransport<EchoDevice>) {
    let status = dev.status();
    assert_eq!(status & !(0xff | DEVICE_NEEDS_RESET), 0, "status {status:#x}");
    let isr = dev.interrupt().status();
    assert_eq!(isr & !3, 0, "interrupt status {isr:#x}");
    let a = Access { offset: regs::MAGIC_VALUE, addr: 0, width: Width::U32, vcpu: None };
    assert_eq!(dev.read(a), Ok(u64::from(crate::virtio::spec::MMIO_MAGIC_VALUE)));
    if dev.is_active() {
        assert_ne!(status & crate::virtio::spec::status::DRIVER_OK, 0, "active without DRIVER_OK");
    }
}
