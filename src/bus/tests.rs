use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use super::*;
use crate::addr::RangeError;
use crate::addr::{Mmio, Pio, SysReg, Width};
use crate::device::{Access, DeviceError, DeviceMut, Locked};

/// Answers `tag` in the high bits and the offset in the low bits, and
/// remembers the last write.
struct Probe {
    tag: u64,
    last_write: AtomicU64,
    calls: AtomicUsize,
}

impl Probe {
    fn new(tag: u64) -> Arc<Self> {
        Arc::new(Probe { tag, last_write: AtomicU64::new(0), calls: AtomicUsize::new(0) })
    }
}

impl Device for Probe {
    fn read(&self, a: Access) -> Result<u64, DeviceError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        Ok(self.tag << 32 | a.offset)
    }
    fn write(&self, a: Access, v: u64) -> Result<(), DeviceError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if a.offset == 0xdead {
            return Err(DeviceError::ReadOnly);
        }
        self.last_write.store(v, Ordering::Relaxed);
        Ok(())
    }
}

/// Without `std` there is no handle-free path: the tests dispatch through a
/// fresh handle instead (vCPU `u32::MAX`), so they run in the no_std build too.
#[cfg(not(feature = "std"))]
trait HandleFree {
    fn read(&self, addr: u64, width: Width) -> Result<u64, AccessError>;
    fn write(&self, addr: u64, width: Width, value: u64) -> Result<(), AccessError>;
}

#[cfg(not(feature = "std"))]
impl<S: AddressSpace> HandleFree for IoBus<S> {
    fn read(&self, addr: u64, width: Width) -> Result<u64, AccessError> {
        self.handle(u32::MAX).read(addr, width)
    }
    fn write(&self, addr: u64, width: Width, value: u64) -> Result<(), AccessError> {
        self.handle(u32::MAX).write(addr, width, value)
    }
}

fn r<S: AddressSpace>(start: u64, len: u64) -> IoRange<S> {
    IoRange::new(start, len).unwrap()
}

#[test]
fn dispatch_routes_by_offset_and_masks_width() {
    let bus = IoBus::<Mmio>::new();
    let a = Probe::new(1);
    let b = Probe::new(2);
    let ida = bus.register(r(0x1000, 0x100), a.clone()).unwrap();
    bus.register(r(0x2000, 0x100), b.clone()).unwrap();
    let mut h = bus.handle(3);
    assert_eq!(h.read(0x1010, Width::U64).unwrap(), 1 << 32 | 0x10);
    assert_eq!(h.read(0x20ff, Width::U8).unwrap(), 0xff, "masked to one byte");
    assert_eq!(h.read(0x20fe, Width::U16).unwrap(), 0xfe);
    h.write(0x1000, Width::U16, 0x1234_5678).unwrap();
    assert_eq!(a.last_write.load(Ordering::Relaxed), 0x5678, "value truncated to width");
    assert_eq!(b.calls.load(Ordering::Relaxed), 2);
    assert_eq!(bus.lookup(0x10ff), Some((ida, r(0x1000, 0x100))));
    assert_eq!(bus.lookup(0x1100), None);
}

#[test]
fn access_carries_vcpu_and_absolute_address() {
    struct Echo;
    impl Device for Echo {
        fn read(&self, a: Access) -> Result<u64, DeviceError> {
            assert_eq!(a.addr - a.offset, 0x40);
            Ok(u64::from(a.vcpu.unwrap_or(999)))
        }
        fn write(&self, _: Access, _: u64) -> Result<(), DeviceError> {
            Ok(())
        }
    }
    let bus = IoBus::<Pio>::new();
    bus.register(r(0x40, 4), Arc::new(Echo)).unwrap();
    assert_eq!(bus.handle(7).read(0x40, Width::U32).unwrap(), 7);
    #[cfg(feature = "std")]
    assert_eq!(bus.read(0x40, Width::U32).unwrap(), 999, "handle-free path has no vCPU");
}

#[test]
fn misses_are_errors_at_every_edge() {
    let bus = IoBus::<Mmio>::new();
    let mut h = bus.handle(0);
    assert_eq!(h.read(0, Width::U8), Err(AccessError::Unmapped { addr: 0 }));
    assert_eq!(h.read(u64::MAX, Width::U8), Err(AccessError::Unmapped { addr: u64::MAX }));
    let id = bus.register(r(0x10, 0x10), Probe::new(0)).unwrap();
    assert_eq!(h.read(0xf, Width::U8), Err(AccessError::Unmapped { addr: 0xf }));
    assert_eq!(h.read(0x20, Width::U8), Err(AccessError::Unmapped { addr: 0x20 }));
    // Starts before the range: a miss, even though its tail would hit.
    assert_eq!(h.read(0xe, Width::U32), Err(AccessError::Unmapped { addr: 0xe }));
    // Starts inside, ends past the end.
    assert_eq!(
        h.write(0x1d, Width::U32, 0),
        Err(AccessError::Straddles { addr: 0x1d, width: 4, device: id })
    );
    assert!(h.read(0x1c, Width::U32).is_ok(), "ends exactly on the last byte");
}

#[test]
fn straddling_into_a_neighbour_is_refused() {
    let bus = IoBus::<Pio>::new();
    let a = bus.register(r(0x60, 2), Probe::new(1)).unwrap();
    bus.register(r(0x62, 2), Probe::new(2)).unwrap();
    assert_eq!(
        bus.read(0x61, Width::U16),
        Err(AccessError::Straddles { addr: 0x61, width: 2, device: a })
    );
}

#[test]
fn ranges_ending_at_the_top_of_each_space() {
    let mmio = IoBus::<Mmio>::new();
    let id = mmio.register(r(u64::MAX - 7, 8), Probe::new(1)).unwrap();
    assert_eq!(mmio.read(u64::MAX - 7, Width::U64).unwrap(), 1 << 32);
    assert_eq!(mmio.read(u64::MAX, Width::U8).unwrap(), 7, "offset 7, masked to a byte");
    // Would wrap past 2^64: refused, not overflowed.
    assert_eq!(
        mmio.read(u64::MAX, Width::U16),
        Err(AccessError::Straddles { addr: u64::MAX, width: 2, device: id })
    );
    let whole = IoBus::<Mmio>::new();
    whole.register(IoRange::inclusive(0, u64::MAX).unwrap(), Probe::new(9)).unwrap();
    assert_eq!(whole.read(0, Width::U64).unwrap(), 9 << 32);
    assert_eq!(whole.read(u64::MAX - 7, Width::U64).unwrap(), 9 << 32 | (u64::MAX - 7));

    let pio = IoBus::<Pio>::new();
    pio.register(r(0xfffc, 4), Probe::new(2)).unwrap();
    assert_eq!(pio.read(0xfffc, Width::U32).unwrap(), 0, "offset 0");
    assert_eq!(pio.read(0xffff, Width::U8).unwrap(), 3);
    assert_eq!(pio.read(0x1_0000, Width::U8), Err(AccessError::Unmapped { addr: 0x1_0000 }));
    assert!(matches!(IoRange::<Pio>::new(0xfffc, 5), Err(RangeError::Wraps { top: 0xffff, .. })));

    let sys = IoBus::<SysReg>::new();
    sys.register(IoRange::inclusive(0xffff_fff8, 0xffff_ffff).unwrap(), Probe::new(3)).unwrap();
    assert!(sys.read(0xffff_ffff, Width::U8).is_ok());
    assert!(sys.read(0, Width::U8).is_err());
}

#[test]
fn validation_errors_name_what_went_wrong() {
    let bus = IoBus::<Mmio>::new();
    let a = bus.register(r(0x100, 0x100), Probe::new(1)).unwrap();
    for (start, len) in [(0x80, 0x81), (0x100, 1), (0x1ff, 1), (0x150, 0x1000), (0, u64::MAX)] {
        let err = bus.register(r(start, len), Probe::new(2)).unwrap_err();
        assert_eq!(
            err,
            BusError::Overlap {
                start,
                last: start + (len - 1),
                existing: a,
                existing_start: 0x100,
                existing_last: 0x1ff
            }
        );
        assert!(alloc::format!("{err}").contains("#1"), "{err}");
    }
    // Adjacent on both sides is fine.
    bus.register(r(0x80, 0x80), Probe::new(3)).unwrap();
    bus.register(r(0x200, 1), Probe::new(4)).unwrap();
    assert_eq!(bus.len(), 3);

    let ghost = DeviceId(9999);
    assert_eq!(bus.unregister(ghost).unwrap_err(), BusError::UnknownDevice(ghost));
    assert_eq!(bus.remap(ghost, r(0, 1)).unwrap_err(), BusError::UnknownDevice(ghost));
    assert_eq!(
        BusError::from(IoRange::<Mmio>::new(0, 0).unwrap_err()),
        BusError::Range(RangeError::Empty { start: 0 })
    );
}

#[test]
fn refused_edits_change_nothing() {
    let bus = IoBus::<Mmio>::new();
    let a = bus.register(r(0x100, 0x10), Probe::new(1)).unwrap();
    let b = bus.register(r(0x200, 0x10), Probe::new(2)).unwrap();
    let before = (bus.devices(), bus.generation());
    assert!(
        matches!(bus.remap(a, r(0x205, 4)), Err(BusError::Overlap { existing, .. }) if existing == b)
    );
    let tx = bus.transaction([
        Edit::Register { range: r(0x300, 0x10), device: Probe::new(3) },
        Edit::Unregister(b),
        Edit::Register { range: r(0x108, 0x10), device: Probe::new(4) },
    ]);
    assert!(matches!(tx, Err(BusError::Overlap { existing, .. }) if existing == a));
    assert_eq!((bus.devices(), bus.generation()), before);
    assert_eq!(bus.read(0x200, Width::U64).unwrap(), 2 << 32);
}

#[test]
fn remap_moves_and_resizes() {
    let bus = IoBus::<Mmio>::new();
    let a = bus.register(r(0x1000, 0x10), Probe::new(1)).unwrap();
    bus.remap(a, r(0x8000, 0x20)).unwrap();
    assert!(bus.read(0x1000, Width::U8).is_err());
    assert_eq!(bus.read(0x8018, Width::U64).unwrap(), 1 << 32 | 0x18);
    // Shrinking in place overlaps only itself, which is allowed.
    bus.remap(a, r(0x8000, 0x8)).unwrap();
    assert_eq!(bus.range(a), Some(r(0x8000, 8)));
}

#[test]
fn transaction_swaps_two_devices_in_one_publish() {
    let bus = IoBus::<Mmio>::new();
    let a = bus.register(r(0x1000, 0x100), Probe::new(1)).unwrap();
    let b = bus.register(r(0x2000, 0x100), Probe::new(2)).unwrap();
    let g = bus.generation();
    let c = bus
        .transaction([
            Edit::Remap { id: a, range: r(0x3000, 0x100) },
            Edit::Remap { id: b, range: r(0x1000, 0x100) },
            Edit::Remap { id: a, range: r(0x2000, 0x100) },
            Edit::Register { range: r(0x4000, 1), device: Probe::new(3) },
        ])
        .unwrap();
    assert_eq!(bus.generation(), g + 1, "one publish for the whole transaction");
    assert_eq!(bus.read(0x1000, Width::U64).unwrap() >> 32, 2);
    assert_eq!(bus.read(0x2000, Width::U64).unwrap() >> 32, 1);
    assert_eq!(c.registered.len(), 1);
    assert_eq!(bus.lookup(0x4000).map(|(id, _)| id), Some(c.registered[0]));
}

#[test]
fn hundred_edit_transaction_publishes_once() {
    let bus = IoBus::<Mmio>::new();
    let g = bus.generation();
    let edits: Vec<_> = (0..100u64)
        .map(|i| Edit::Register { range: r(i * 0x1000, 0x1000), device: Probe::new(i) as _ })
        .collect();
    let c = bus.transaction(edits).unwrap();
    assert_eq!(bus.generation(), g + 1);
    assert_eq!(c.registered.len(), 100);
    assert_eq!(bus.read(99 * 0x1000 + 5, Width::U64).unwrap(), 99 << 32 | 5);
}

#[test]
fn ids_are_never_reused() {
    let bus = IoBus::<Pio>::new();
    let a = bus.register(r(0, 1), Probe::new(0)).unwrap();
    bus.unregister(a).unwrap().wait().unwrap();
    let b = bus.register(r(0, 1), Probe::new(0)).unwrap();
    assert_ne!(a, b);
    assert_eq!(bus.unregister(a).unwrap_err(), BusError::UnknownDevice(a));
}

#[test]
fn device_errors_are_passed_on() {
    let bus = IoBus::<Mmio>::new();
    let id = bus.register(r(0, 0x10000), Probe::new(0)).unwrap();
    assert_eq!(
        bus.write(0xdead, Width::U8, 1),
        Err(AccessError::Device { device: id, error: DeviceError::ReadOnly })
    );
}

#[test]
fn unplug_waits_for_the_grace_period_and_drops_the_device() {
    let bus = IoBus::<Mmio>::new();
    let probe = Probe::new(1);
    let id = bus.register(r(0, 8), probe.clone()).unwrap();
    let mut h = bus.handle(0);
    h.read(0, Width::U8).unwrap();
    assert_eq!(Arc::strong_count(&probe), 2, "the bus holds one reference");
    let unplug = bus.unregister(id).unwrap();
    assert!(h.read(0, Width::U8).is_err(), "no dispatch after unregister returns");
    unplug.wait().unwrap();
    assert!(unplug.is_complete() && unplug.poll());
    assert_eq!(Arc::strong_count(&probe), 1, "the bus let go after the grace period");
}

// Without `std` a wait from device code cannot be detected (documented on
// `Unplug::wait`): it would spin forever.
#[cfg(feature = "std")]
#[test]
fn device_may_remap_itself_and_refuses_to_wait_on_itself() {
    use std::sync::Mutex as StdMutex;
    /// Moves itself to the address written to offset 0 (a BAR write) and
    /// unplugs itself on a write to offset 8.
    struct Bar {
        bus: IoBus<Mmio>,
        me: StdMutex<Option<DeviceId>>,
        wait_result: StdMutex<Option<Result<(), WaitError>>>,
    }
    impl Device for Bar {
        fn read(&self, a: Access) -> Result<u64, DeviceError> {
            Ok(a.addr)
        }
        fn write(&self, a: Access, v: u64) -> Result<(), DeviceError> {
            let id = self.me.lock().unwrap().expect("registered");
            match a.offset {
                0 => self.bus.remap(id, r(v, 0x10)).map_err(|_| DeviceError::Failed("bar")),
                8 => {
                    let unplug =
                        self.bus.unregister(id).map_err(|_| DeviceError::Failed("eject"))?;
                    *self.wait_result.lock().unwrap() = Some(unplug.wait());
                    Ok(())
                }
                _ => Err(DeviceError::InvalidOffset(a.offset)),
            }
        }
    }
    let bus = IoBus::<Mmio>::new();
    let bar = Arc::new(Bar {
        bus: bus.clone(),
        me: StdMutex::new(None),
        wait_result: StdMutex::new(None),
    });
    let id = bus.register(r(0x1000, 0x10), bar.clone()).unwrap();
    *bar.me.lock().unwrap() = Some(id);
    let mut h = bus.handle(0);
    h.write(0x1000, Width::U64, 0x5000).unwrap();
    assert_eq!(h.read(0x5008, Width::U64).unwrap(), 0x5008);
    assert!(h.read(0x1000, Width::U8).is_err());
    // Eject from inside the call: the wait must fail fast, not hang.
    h.write(0x5008, Width::U64, 1).unwrap();
    assert_eq!(*bar.wait_result.lock().unwrap(), Some(Err(WaitError::InsideDispatch)));
    assert!(bus.is_empty());
    // The bus still holds a reference through the bus clone inside `Bar`;
    // break the cycle so the test does not leak.
    drop(h);
}

#[test]
fn locked_adapter_serializes_a_mut_device() {
    struct Counter(u64);
    impl DeviceMut for Counter {
        fn read(&mut self, _: Access) -> Result<u64, DeviceError> {
            Ok(self.0)
        }
        fn write(&mut self, _: Access, v: u64) -> Result<(), DeviceError> {
            self.0 += v;
            Ok(())
        }
    }
    let dev = Arc::new(Locked::new(Counter(0)));
    let bus = IoBus::<Pio>::new();
    bus.register(r(0x70, 1), dev.clone()).unwrap();
    std::thread::scope(|s| {
        for _ in 0..4 {
            let bus = &bus;
            s.spawn(move || {
                let mut h = bus.handle(0);
                for _ in 0..1000 {
                    h.write(0x70, Width::U8, 1).unwrap();
                }
            });
        }
    });
    assert_eq!(bus.read(0x70, Width::U8).unwrap(), 4000 & 0xff, "read masked to a byte");
    assert_eq!(dev.with(|c| c.0), 4000);
}
