//! The read side: per-vCPU handles and the dispatch hot path.

use alloc::sync::Arc;
use core::sync::atomic::Ordering;

use super::Inner;
use super::grace::{Pinned, Reader};
use super::search::LINEAR_MAX;
use super::table::Table;
use crate::addr::{AddressSpace, Width};
use crate::device::Access;
use crate::error::AccessError;

/// A vCPU thread's view of an [`IoBus`](super::IoBus).
///
/// Dispatching through it enters a read section (a store to this handle's
/// own cache line, no fence), loads the table, searches it and calls the
/// device inside the section. It never locks, retries or allocates.
pub struct VcpuHandle<S> {
    inner: Arc<Inner<S>>,
    reader: Reader,
    vcpu: u32,
    /// Slot index of this vCPU's last hit. A guess, checked against the
    /// current table on use: a stale index simply misses (see [`hinted`]).
    hint: Hint,
}

impl<S: AddressSpace> VcpuHandle<S> {
    pub(super) fn new(inner: Arc<Inner<S>>, vcpu: u32) -> Self {
        let reader = inner.domain.reader();
        VcpuHandle { inner, reader, vcpu, hint: Hint::default() }
    }

    /// The vCPU id passed to devices in [`Access::vcpu`].
    pub fn vcpu(&self) -> u32 {
        self.vcpu
    }

    /// Dispatches a guest read of `width` bytes at `addr`.
    ///
    /// # Errors
    /// [`AccessError::Unmapped`] when no device owns `addr`,
    /// [`AccessError::Straddles`] when the access runs past the device's
    /// range, [`AccessError::Device`] when the device refuses it.
    #[inline]
    pub fn read(&mut self, addr: u64, width: Width) -> Result<u64, AccessError> {
        let section = self.reader.pin();
        dispatch_read(&self.inner, &section, addr, width, Some(self.vcpu), &mut self.hint)
    }

    /// Dispatches a guest write of the low `width` bytes of `value` at `addr`.
    ///
    /// # Errors
    /// As for [`Self::read`].
    #[inline]
    pub fn write(&mut self, addr: u64, width: Width, value: u64) -> Result<(), AccessError> {
        let section = self.reader.pin();
        dispatch_write(&self.inner, &section, addr, width, value, Some(self.vcpu), &mut self.hint)
    }
}

/// A vCPU's guess at its next slot: the index of its last hit, trusted
/// only while the vCPU keeps returning to one device.
#[derive(Clone, Copy, Default)]
pub(super) struct Hint {
    slot: usize,
    /// How many dispatches in a row searched their way back to `slot`.
    /// Checking the hint costs a branch that mispredicts when hits are
    /// random, so it is tried only after [`Hint::TRUST`] repeats: a vCPU
    /// that scatters over a few devices rarely gets there by chance.
    streak: u8,
}

impl Hint {
    const TRUST: u8 = 2;
}

/// The slot holding `addr`, trying `hint` first when it has been right.
///
/// Small tables skip the hint: their branch-free count costs about what
/// checking and maintaining the hint does, and never mispredicts.
///
/// Checking the hint's range against the table being searched is the whole
/// validation: ranges never overlap, so a slot that contains `addr` is the
/// right one, whichever table generation the hint came from.
#[inline(always)]
fn hinted(table: &Table, hint: &mut Hint, addr: u64) -> Option<usize> {
    if table.starts.len() <= LINEAR_MAX {
        return table.find(addr);
    }
    if hint.streak >= Hint::TRUST {
        let h = hint.slot;
        if let (Some(&start), Some(slot)) = (table.starts.get(h), table.slots.get(h))
            && start <= addr
            && addr <= slot.last
        {
            return Some(h);
        }
    }
    let i = table.find(addr)?;
    hint.streak = if i == hint.slot { hint.streak.saturating_add(1) } else { 0 };
    hint.slot = i;
    Some(i)
}

/// Finds the slot for `[addr, addr + width)`: the device pointer, id and offset.
#[inline(always)]
fn route(
    table: &Table,
    hint: &mut Hint,
    addr: u64,
    width: Width,
) -> Result<(usize, Access), AccessError> {
    let i = hinted(table, hint, addr).ok_or(AccessError::Unmapped { addr })?;
    let slot = &table.slots[i];
    // Overflow means the access runs past the top of the space, which no
    // range can contain.
    match addr.checked_add(width.bytes() - 1) {
        Some(end) if end <= slot.last => {}
        _ => return Err(AccessError::Straddles { addr, width: width.bytes(), device: slot.id }),
    }
    Ok((i, Access { offset: addr - table.starts[i], addr, width, vcpu: None }))
}

/// The published table, valid for as long as `section` is open.
#[inline(always)]
pub(super) fn load<'s, S>(inner: &'s Inner<S>, section: &'s Pinned<'_>) -> &'s Table {
    let _ = section;
    // Acquire pairs with the writer's Release swap: the table behind the
    // pointer is fully built.
    let table = inner.table.load(Ordering::Acquire);
    // SAFETY: the pointer is never null (a table is published at
    // construction), and a table is freed only after every read section
    // open when it was unlinked has closed; `section` outlives the borrow.
    unsafe { &*table }
}

#[inline(always)]
pub(super) fn dispatch_read<S>(
    inner: &Inner<S>,
    section: &Pinned<'_>,
    addr: u64,
    width: Width,
    vcpu: Option<u32>,
    hint: &mut Hint,
) -> Result<u64, AccessError> {
    let table = load(inner, section);
    let (i, access) = route(table, hint, addr, width)?;
    let slot = &table.slots[i];
    let _depth = DispatchDepth::enter();
    // SAFETY: the registry's `Arc` for this device is released only by the
    // retired destructor of a table that no longer names it, which runs
    // after `section` closes.
    let device = unsafe { &*slot.device };
    device
        .read(Access { vcpu, ..access })
        .map(|v| v & width.mask())
        .map_err(|error| AccessError::Device { device: slot.id, error })
}

#[inline(always)]
pub(super) fn dispatch_write<S>(
    inner: &Inner<S>,
    section: &Pinned<'_>,
    addr: u64,
    width: Width,
    value: u64,
    vcpu: Option<u32>,
    hint: &mut Hint,
) -> Result<(), AccessError> {
    let table = load(inner, section);
    let (i, access) = route(table, hint, addr, width)?;
    let slot = &table.slots[i];
    let _depth = DispatchDepth::enter();
    // SAFETY: as in `dispatch_read`.
    let device = unsafe { &*slot.device };
    device
        .write(Access { vcpu, ..access }, value & width.mask())
        .map_err(|error| AccessError::Device { device: slot.id, error })
}

/// Marks the current thread as inside a device call, so an unplug wait from
/// device code fails fast instead of waiting on its own pin.
struct DispatchDepth;

#[cfg(feature = "std")]
std::thread_local! {
    static DEPTH: core::cell::Cell<u32> = const { core::cell::Cell::new(0) };
}

impl DispatchDepth {
    #[inline(always)]
    fn enter() -> Self {
        #[cfg(feature = "std")]
        DEPTH.with(|d| d.set(d.get() + 1));
        DispatchDepth
    }
}

impl Drop for DispatchDepth {
    #[inline(always)]
    fn drop(&mut self) {
        #[cfg(feature = "std")]
        DEPTH.with(|d| d.set(d.get() - 1));
    }
}

/// Whether this thread is inside a device call of any bus. Always false
/// without `std` (no thread-local storage to ask).
pub(super) fn inside_dispatch() -> bool {
    #[cfg(feature = "std")]
    return DEPTH.with(|d| d.get() > 0);
    #[cfg(not(feature = "std"))]
    false
}

/// Runs `f` with a reader of `inner`'s domain: this thread's cached one
/// under `std`, a fresh registration without.
pub(super) fn with_reader<S: AddressSpace, R>(
    inner: &Arc<Inner<S>>,
    f: impl FnOnce(&Reader) -> R,
) -> R {
    #[cfg(feature = "std")]
    return cached::with_reader(inner, f);
    #[cfg(not(feature = "std"))]
    f(&inner.domain.reader())
}

#[cfg(feature = "std")]
mod cached {
    //! Per-thread readers for the handle-free `IoBus::read`/`write`.

    use alloc::rc::Rc;
    use alloc::sync::{Arc, Weak};
    use alloc::vec::Vec;
    use core::any::Any;
    use core::cell::RefCell;

    use super::{Inner, Reader};
    use crate::addr::AddressSpace;

    /// A bus (by its `Weak`, which pins the allocation so the address is not
    /// reused, and tells when the bus is gone) and this thread's reader of it.
    type Entry = (Weak<dyn Any + Send + Sync>, Rc<Reader>);

    std::thread_local! {
        /// One reader per bus this thread has dispatched on.
        static READERS: RefCell<Vec<Entry>> = const { RefCell::new(Vec::new()) };
    }

    pub(super) fn with_reader<S: AddressSpace, R>(
        inner: &Arc<Inner<S>>,
        f: impl FnOnce(&Reader) -> R,
    ) -> R {
        let me = Arc::as_ptr(inner).cast::<()>();
        let reader = READERS.with(|r| {
            if let Some(reader) = find(&r.borrow(), me) {
                return reader;
            }
            let mut r = r.borrow_mut();
            r.retain(|(bus, _)| bus.strong_count() > 0);
            let weak: Weak<dyn Any + Send + Sync> = Arc::downgrade(inner) as _;
            r.push((weak, Rc::new(inner.domain.reader())));
            find(&r, me).expect("reader was just added")
        });
        // The borrow is released before `f` runs, so a device may dispatch
        // on another (or the same) bus from inside `f`.
        f(&reader)
    }

    fn find(r: &[Entry], me: *const ()) -> Option<Rc<Reader>> {
        r.iter()
            .find(|(bus, _)| bus.as_ptr().cast::<()>() == me)
            .map(|(_, reader)| Rc::clone(reader))
    }
}

#[cfg(feature = "std")]
impl<S: AddressSpace> super::IoBus<S> {
    /// Dispatches a read without a [`VcpuHandle`], through a per-thread
    /// handle kept in thread-local storage (a little slower; `vcpu` is `None`).
    ///
    /// # Errors
    /// As for [`VcpuHandle::read`].
    pub fn read(&self, addr: u64, width: Width) -> Result<u64, AccessError> {
        with_reader(&self.inner, |r| {
            dispatch_read(&self.inner, &r.pin(), addr, width, None, &mut Hint::default())
        })
    }

    /// Dispatches a write without a [`VcpuHandle`]; see [`Self::read`].
    ///
    /// # Errors
    /// As for [`VcpuHandle::write`].
    pub fn write(&self, addr: u64, width: Width, value: u64) -> Result<(), AccessError> {
        with_reader(&self.inner, |r| {
            dispatch_write(&self.inner, &r.pin(), addr, width, value, None, &mut Hint::default())
        })
    }
}

#[cfg(test)]
mod tests {
    use alloc::sync::Arc;

    use super::Hint;
    use crate::addr::{IoRange, Mmio, Width};
    use crate::bus::IoBus;
    use crate::device::{Access, Device, DeviceError};
    use crate::error::AccessError;

    /// Answers its tag, so a test sees which device a dispatch reached.
    struct Tag(u64);
    impl Device for Tag {
        fn read(&self, _: Access) -> Result<u64, DeviceError> {
            Ok(self.0)
        }
        fn write(&self, _: Access, _: u64) -> Result<(), DeviceError> {
            Ok(())
        }
    }

    fn r(start: u64) -> IoRange<Mmio> {
        IoRange::new(start, 0x100).unwrap()
    }

    #[test]
    fn stale_hints_never_misroute() {
        let bus = IoBus::<Mmio>::new();
        let a = bus.register(r(0x1000), Arc::new(Tag(1))).unwrap();
        bus.register(r(0x3000), Arc::new(Tag(3))).unwrap();
        // Above every address below, so the indices the test names hold;
        // enough of them that the table is large enough to use the hint.
        for k in 0..=super::LINEAR_MAX as u64 {
            bus.register(r(0x10_0000 + k * 0x1000), Arc::new(Tag(100))).unwrap();
        }
        let mut h = bus.handle(0);
        // Enough repeats that the hint is trusted.
        for _ in 0..4 {
            assert_eq!(h.read(0x3010, Width::U8), Ok(3));
        }
        assert_eq!((h.hint.slot, h.hint.streak >= Hint::TRUST), (1, true));

        // A device below shifts every index: slot 1 is now the device at 0x1000.
        bus.register(r(0x0), Arc::new(Tag(0))).unwrap();
        assert_eq!(h.read(0x1010, Width::U8), Ok(1), "hit through the stale index");
        assert_eq!(h.read(0x3010, Width::U8), Ok(3), "hint misses, search finds it");
        assert_eq!((h.hint.slot, h.hint.streak), (2, 0), "a miss withdraws the trust");
        for _ in 0..4 {
            assert_eq!(h.read(0x3010, Width::U8), Ok(3));
        }

        // The hinted slot moves away: its old address is unmapped, not stale.
        let c = bus.lookup(0x3000).unwrap().0;
        bus.remap(c, r(0x8000)).unwrap();
        assert_eq!(h.read(0x3010, Width::U8), Err(AccessError::Unmapped { addr: 0x3010 }));
        for _ in 0..4 {
            assert_eq!(h.read(0x8010, Width::U8), Ok(3));
        }

        // The table shrinks below the trusted hint: the index is out of
        // range, not a panic.
        bus.unregister(a).unwrap();
        bus.unregister(c).unwrap();
        assert_eq!((h.hint.slot, h.hint.streak >= Hint::TRUST), (2, true));
        assert_eq!(h.read(0x8010, Width::U8), Err(AccessError::Unmapped { addr: 0x8010 }));
        assert_eq!(h.read(0x0010, Width::U8), Ok(0));
        assert!(h.write(0x0010, Width::U8, 1).is_ok());
    }
}
