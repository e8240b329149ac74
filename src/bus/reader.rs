//! The read side: per-vCPU handles and the dispatch hot path.

use alloc::sync::Arc;
use core::sync::atomic::Ordering;

use crossbeam_epoch::{Guard, LocalHandle};

use super::Inner;
use super::table::Table;
use crate::addr::{AddressSpace, Width};
use crate::device::Access;
use crate::error::AccessError;

/// A vCPU thread's view of an [`IoBus`](super::IoBus).
///
/// Dispatching through it pins the bus's epoch collector (a write to this
/// handle's own epoch record only), loads the table, searches it and calls
/// the device while pinned. It never locks, retries or allocates.
pub struct VcpuHandle<S> {
    inner: Arc<Inner<S>>,
    local: LocalHandle,
    vcpu: u32,
}

impl<S: AddressSpace> VcpuHandle<S> {
    pub(super) fn new(inner: Arc<Inner<S>>, vcpu: u32) -> Self {
        let local = inner.collector.register();
        VcpuHandle { inner, local, vcpu }
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
        dispatch_read(&self.inner, &guard, addr, width, Some(self.vcpu))
    }

    /// Dispatches a guest write of the low `width` bytes of `value` at `addr`.
    ///
    /// # Errors
    /// As for [`Self::read`].
    #[inline]
    pub fn write(&mut self, addr: u64, width: Width, value: u64) -> Result<(), AccessError> {
        let guard = self.local.pin();
        dispatch_write(&self.inner, &guard, addr, width, value, Some(self.vcpu))
    }
}

/// Finds the slot for `[addr, addr + width)`: the device pointer, id and offset.
#[inline(always)]
fn route(table: &Table, addr: u64, width: Width) -> Result<(usize, Access), AccessError> {
    let i = table.find(addr).ok_or(AccessError::Unmapped { addr })?;
    let slot = &table.slots[i];
    // Overflow means the access runs past the top of the space, which no
    // range can contain.
    match addr.checked_add(width.bytes() - 1) {
        Some(end) if end <= slot.last => {}
        _ => return Err(AccessError::Straddles { addr, width: width.bytes(), device: slot.id }),
    }
    Ok((i, Access { offset: addr - table.starts[i], addr, width, vcpu: None }))
}

#[inline(always)]
fn load<'g, S>(inner: &Inner<S>, guard: &'g Guard) -> &'g Table {
    // Acquire pairs with the writer's Release swap: the table behind the
    // pointer is fully built.
    let table = inner.table.load(Ordering::Acquire, guard);
    // SAFETY: the pointer is never null (a table is published at
    // construction), and the table is not reclaimed while `guard` pins.
    unsafe { table.deref() }
}

#[inline(always)]
pub(super) fn dispatch_read<S>(
    inner: &Inner<S>,
    guard: &Guard,
    addr: u64,
    width: Width,
    vcpu: Option<u32>,
) -> Result<u64, AccessError> {
    let table = load(inner, guard);
    let (i, access) = route(table, addr, width)?;
    let slot = &table.slots[i];
    let _depth = DispatchDepth::enter();
    // SAFETY: the registry's `Arc` for this device is released only by the
    // deferred destructor of a table that no longer names it, which runs
    // after `guard` unpins.
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
) -> Result<(), AccessError> {
    let table = load(inner, guard);
    let (i, access) = route(table, addr, width)?;
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

/// Runs `f` pinned to `inner`'s collector: through this thread's cached
/// handle under `std`, through a fresh registration without.
pub(super) fn with_guard<S: AddressSpace, R>(
    inner: &Arc<Inner<S>>,
    f: impl FnOnce(&Guard) -> R,
) -> R {
    #[cfg(feature = "std")]
    return cached::with_guard(inner, f);
    #[cfg(not(feature = "std"))]
    f(&inner.collector.register().pin())
}

#[cfg(feature = "std")]
mod cached {
    //! Per-thread epoch handles for the handle-free `IoBus::read`/`write`.

    use alloc::sync::{Arc, Weak};
    use alloc::vec::Vec;
    use core::any::Any;
    use core::cell::RefCell;

    use crossbeam_epoch::{Guard, LocalHandle};

    use super::Inner;
    use crate::addr::AddressSpace;

    std::thread_local! {
        /// One handle per bus this thread has dispatched on. The `Weak`
        /// identifies the bus (it pins the allocation, so the address is not
        /// reused) and tells when the bus is gone.
        static HANDLES: RefCell<Vec<(Weak<dyn Any + Send + Sync>, LocalHandle)>> =
            const { RefCell::new(Vec::new()) };
    }

    pub(super) fn with_guard<S: AddressSpace, R>(
        inner: &Arc<Inner<S>>,
        f: impl FnOnce(&Guard) -> R,
    ) -> R {
        let me = Arc::as_ptr(inner).cast::<()>();
        let guard = HANDLES.with(|h| {
            if let Some(guard) = find(&h.borrow(), me) {
                return guard;
            }
            let mut h = h.borrow_mut();
            h.retain(|(bus, _)| bus.strong_count() > 0);
            let weak: Weak<dyn Any + Send + Sync> = Arc::downgrade(inner) as _;
            h.push((weak, inner.collector.register()));
            find(&h, me).expect("handle was just added")
        });
        // The borrow is released before `f` runs, so a device may dispatch
        // on another (or the same) bus from inside `f`.
        f(&guard)
    }

    fn find(h: &[(Weak<dyn Any + Send + Sync>, LocalHandle)], me: *const ()) -> Option<Guard> {
        h.iter().find(|(bus, _)| bus.as_ptr().cast::<()>() == me).map(|(_, local)| local.pin())
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
        with_guard(&self.inner, |g| dispatch_read(&self.inner, g, addr, width, None))
    }

    /// Dispatches a write without a [`VcpuHandle`]; see [`Self::read`].
    ///
    /// # Errors
    /// As for [`VcpuHandle::write`].
    pub fn write(&self, addr: u64, width: Width, value: u64) -> Result<(), AccessError> {
        with_guard(&self.inner, |g| dispatch_write(&self.inner, g, addr, width, value, None))
    }
}
