//! The read side: per-vCPU handles and the dispatch hot path.

use alloc::boxed::Box;
use alloc::sync::Arc;
use core::sync::atomic::Ordering;

use crossbeam_epoch::{Guard, LocalHandle};

use super::Inner;
use super::error::AccessError;
use super::reclaim::Reclaim;
use super::search::HINT_MIN;
use super::table::Table;
use crate::addr::{AddressSpace, Width};
use crate::device::Access;

/// A vCPU thread's view of an [`IoBus`](super::IoBus).
///
/// Dispatching through it pins the bus's epoch collector through this
/// handle's own participant (one store to the handle's own cache line and a
/// full fence), loads the table, searches it and calls the device while
/// pinned. It never locks, retries or allocates. Every 128th pin, crossbeam
/// also tries to advance the epoch and runs a few retired closures: each
/// frees a table or queues devices for a writer to drop, so no device's
/// destructor ever runs on the handle's thread from here.
///
/// # Not `Send`
///
/// The handle owns a crossbeam-epoch `LocalHandle`, whose bookkeeping
/// (pin count, local garbage) is plain thread-local state that crossbeam
/// declares `!Send`; vmio does not override that. Create each handle on the
/// vCPU thread that will use it — clone the [`IoBus`](super::IoBus) (it is
/// `Send + Sync`) into the thread:
///
/// ```
/// # use vmio::{IoBus, Mmio, Width};
/// let bus = IoBus::<Mmio>::new();
/// let vcpus: Vec<_> = (0..2)
///     .map(|id| {
///         let bus = bus.clone();
///         std::thread::spawn(move || {
///             let mut vcpu = bus.handle(id); // created on its own thread
///             vcpu.read(0x1000, Width::U32).is_err()
///         })
///     })
///     .collect();
/// for v in vcpus {
///     assert!(v.join().unwrap());
/// }
/// ```
pub struct VcpuHandle<S> {
    inner: Arc<Inner<S>>,
    /// Boxed so its address, recorded for the unplug-wait check, is stable.
    local: Box<LocalHandle>,
    vcpu: u32,
    /// Slot index of this vCPU's last hit. A guess, checked against the
    /// current table on use: a stale index simply misses (see [`hinted`]).
    hint: Hint,
}

impl<S: AddressSpace> VcpuHandle<S> {
    pub(super) fn new(inner: Arc<Inner<S>>, vcpu: u32) -> Self {
        let local = Box::new(inner.reclaim.register());
        #[cfg(feature = "std")]
        owned::add(Arc::as_ptr(&inner.reclaim), &*local);
        VcpuHandle { inner, local, vcpu, hint: Hint::default() }
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
        let guard = self.local.pin();
        dispatch_read(&self.inner, &guard, addr, width, Some(self.vcpu), &mut self.hint)
    }

    /// Dispatches a guest write of the low `width` bytes of `value` at `addr`.
    ///
    /// # Errors
    /// As for [`Self::read`].
    #[inline]
    pub fn write(&mut self, addr: u64, width: Width, value: u64) -> Result<(), AccessError> {
        let guard = self.local.pin();
        dispatch_write(&self.inner, &guard, addr, width, value, Some(self.vcpu), &mut self.hint)
    }
}

impl<S> Drop for VcpuHandle<S> {
    fn drop(&mut self) {
        #[cfg(feature = "std")]
        owned::remove(&*self.local);
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

/// The slot that may hold `addr` — the one with the last start at or below
/// it — trying `hint` first when it has been right. The caller checks the
/// slot's end.
///
/// Small tables skip the hint: their search costs about what checking and
/// maintaining the hint does, and never mispredicts.
///
/// Checking the hint's range against the table being searched is the whole
/// validation: ranges never overlap, so a slot that contains `addr` is the
/// right one, whichever table generation the hint came from.
#[inline(always)]
fn candidate(table: &Table, hint: &mut Hint, addr: u64) -> Option<usize> {
    if table.starts.len() <= HINT_MIN {
        return super::search::last_start_at_or_below(&table.starts, addr);
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
    let i = super::search::last_start_at_or_below(&table.starts, addr)?;
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
    let i = candidate(table, hint, addr).ok_or(AccessError::Unmapped { addr })?;
    // SAFETY: `candidate` returns an index into `starts` (a search result,
    // or a hint it checked with `get`), and `slots` has the same length.
    let (start, slot) = unsafe { (*table.starts.get_unchecked(i), table.slots.get_unchecked(i)) };
    // One compare decides the common case: the whole access fits. Overflow
    // means the access runs past the top of the space, which no range can
    // contain.
    match addr.checked_add(width.bytes() - 1) {
        Some(end) if end <= slot.last => {
            Ok((i, Access { offset: addr - start, addr, width, vcpu: None }))
        }
        _ if addr > slot.last => Err(AccessError::Unmapped { addr }),
        _ => Err(AccessError::Straddles { addr, width: width.bytes(), device: slot.id }),
    }
}

/// The published table, valid for as long as `guard` is pinned.
#[inline(always)]
pub(super) fn load<'g, S>(inner: &Inner<S>, guard: &'g Guard) -> &'g Table {
    // Acquire pairs with the writer's Release swap: the table behind the
    // pointer is fully built.
    let table = inner.table.load(Ordering::Acquire, guard);
    // SAFETY: the pointer is never null (a table is published at
    // construction), and a table is freed only by a closure deferred to
    // this bus's collector after it was unlinked, which the collector runs
    // only once every participant pinned before the defer has unpinned;
    // `guard` is such a pin and outlives the borrow.
    unsafe { table.deref() }
}

#[inline(always)]
pub(super) fn dispatch_read<S>(
    inner: &Inner<S>,
    guard: &Guard,
    addr: u64,
    width: Width,
    vcpu: Option<u32>,
    hint: &mut Hint,
) -> Result<u64, AccessError> {
    let table = load(inner, guard);
    let (i, access) = route(table, hint, addr, width)?;
    // SAFETY: `route` returns an index into the table.
    let slot = unsafe { table.slots.get_unchecked(i) };
    // SAFETY: the registry's `Arc` for this device is released only after
    // the collector has run the retirement of a table that no longer names
    // it, which waits for `guard` to unpin.
    let device = unsafe { &*slot.device };
    device
        .read(Access { vcpu, ..access })
        .map(|v| v & width.mask())
        .map_err(|error| AccessError::Device { device: slot.id, error })
}

#[inline(always)]
pub(super) fn dispatch_write<S>(
    inner: &Inner<S>,
    guard: &Guard,
    addr: u64,
    width: Width,
    value: u64,
    vcpu: Option<u32>,
    hint: &mut Hint,
) -> Result<(), AccessError> {
    let table = load(inner, guard);
    let (i, access) = route(table, hint, addr, width)?;
    // SAFETY: `route` returns an index into the table.
    let slot = unsafe { table.slots.get_unchecked(i) };
    // SAFETY: as in `dispatch_read`.
    let device = unsafe { &*slot.device };
    device
        .write(Access { vcpu, ..access }, value & width.mask())
        .map_err(|error| AccessError::Device { device: slot.id, error })
}

/// Whether this thread is inside a device call of `bus`, i.e. holds a pin
/// of its collector through one of the participants it owns: its vCPU
/// handles (a handle is `!Send`, so it lives on the thread that created it)
/// and its cached participant for the handle-free paths. vmio pins around
/// device calls only, so a pin seen from device code is an open dispatch of
/// that bus somewhere below on the stack. Always false without `std` (no
/// thread-local storage to ask).
pub(super) fn inside_dispatch_of(bus: &Arc<Reclaim>) -> bool {
    #[cfg(feature = "std")]
    return owned::pinned(Arc::as_ptr(bus)) || bus.cached_is_pinned();
    #[cfg(not(feature = "std"))]
    {
        let _ = bus;
        false
    }
}

#[cfg(feature = "std")]
mod owned {
    //! The vCPU handles' participants that live on this thread.

    use alloc::vec::Vec;
    use core::cell::RefCell;
    use core::ptr;

    use crossbeam_epoch::LocalHandle;

    use super::Reclaim;

    std::thread_local! {
        /// Each of this thread's vCPU handles: its bus's domain and its
        /// participant (boxed in the handle, so the address is stable).
        static OWNED: RefCell<Vec<(*const Reclaim, *const LocalHandle)>> =
            const { RefCell::new(Vec::new()) };
    }

    pub(super) fn add(bus: *const Reclaim, local: *const LocalHandle) {
        // Without thread-local storage (a handle made in a thread-local
        // destructor) the handle still works; only the wait check misses it.
        let _ = OWNED.try_with(|o| o.borrow_mut().push((bus, local)));
    }

    pub(super) fn remove(local: *const LocalHandle) {
        let _ = OWNED.try_with(|o| o.borrow_mut().retain(|&(_, l)| !ptr::eq(l, local)));
    }

    pub(super) fn pinned(bus: *const Reclaim) -> bool {
        OWNED
            .try_with(|o| {
                o.borrow().iter().any(|&(b, local)| {
                    // SAFETY: an entry is removed by its handle's `Drop`
                    // before the boxed participant is freed, and handles
                    // never leave this thread, so the pointer is valid.
                    ptr::eq(b, bus) && unsafe { (*local).is_pinned() }
                })
            })
            .unwrap_or(false)
    }
}

#[cfg(feature = "std")]
#[cfg_attr(docsrs, doc(cfg(feature = "std")))]
impl<S: AddressSpace> super::IoBus<S> {
    /// Dispatches a read without a [`VcpuHandle`], through a per-thread
    /// handle kept in thread-local storage (a little slower; `vcpu` is `None`).
    ///
    /// # Errors
    /// As for [`VcpuHandle::read`].
    pub fn read(&self, addr: u64, width: Width) -> Result<u64, AccessError> {
        let guard = self.inner.reclaim.pin();
        dispatch_read(&self.inner, &guard, addr, width, None, &mut Hint::default())
    }

    /// Dispatches a write without a [`VcpuHandle`]; see [`Self::read`].
    ///
    /// # Errors
    /// As for [`VcpuHandle::write`].
    pub fn write(&self, addr: u64, width: Width, value: u64) -> Result<(), AccessError> {
        let guard = self.inner.reclaim.pin();
        dispatch_write(&self.inner, &guard, addr, width, value, None, &mut Hint::default())
    }
}

#[cfg(test)]
mod tests {
    use alloc::sync::Arc;

    use super::Hint;
    use crate::addr::{IoRange, Mmio, Width};
    use crate::bus::AccessError;
    use crate::bus::IoBus;
    use crate::device::{Access, Device, DeviceError};

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
        for k in 0..=super::HINT_MIN as u64 {
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
