//! `IoBus`: the dispatch engine for one address space.
//!
//! # Protocol
//!
//! * **Readers** (vCPUs, through a [`VcpuHandle`]) enter a read section of
//!   the bus's grace-period domain (see [`grace`]: a store to the reader's own
//!   cache line, no fence), load the current [`Table`] with `Acquire`, search
//!   it and call the device while still inside. They take no lock, never
//!   retry and write no shared cache line.
//! * **Writers** take the writer lock, copy the current table, apply their
//!   edits, validate, publish the new table and retire the old one (and any
//!   unplugged device's `Arc`) to the domain. They release the lock before
//!   reclaiming (which may run device destructors) and never wait for a
//!   grace period, so a device may edit its own bus from inside a dispatch
//!   without deadlock.
//! * **Unplug completion**: the destructor of the table that last named a
//!   device also raises the [`Unplug`] ticket's flag; by then every reader
//!   that could have seen the device has left its read section.
//!
//! Lock order: the writer lock is a leaf. Nothing else is acquired while it
//! is held, and device code never runs under it.

mod grace;
mod reader;
pub(crate) mod search;
pub(crate) mod table;

use alloc::collections::BTreeMap;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;
use core::marker::PhantomData;
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};

use alloc::boxed::Box;
use grace::Domain;

pub use reader::VcpuHandle;
use table::{Draft, Slot, Table};

use crate::addr::{AddressSpace, IoRange};
use crate::device::Device;
use crate::error::{BusError, WaitError};
use crate::sync::Mutex;

/// Identifies a device registration. Ids are never reused within a bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeviceId(pub(crate) u64);

impl DeviceId {
    /// The raw id.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// The id whose raw value is `raw` (as returned by [`Self::get`]), for
    /// VMMs that keep ids in their own tables.
    pub const fn from_raw(raw: u64) -> Self {
        DeviceId(raw)
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// One edit of a [`IoBus::transaction`].
pub enum Edit<S> {
    /// Put `device` at `range`; its id is reported in [`Committed::registered`].
    Register {
        /// Where.
        range: IoRange<S>,
        /// What.
        device: Arc<dyn Device>,
    },
    /// Take a device off the bus.
    Unregister(DeviceId),
    /// Move or resize a device's range.
    Remap {
        /// Which device.
        id: DeviceId,
        /// Its new range.
        range: IoRange<S>,
    },
}

/// What a successful [`IoBus::transaction`] reports.
#[derive(Debug)]
pub struct Committed {
    /// Ids of the transaction's `Register` edits, in order.
    pub registered: Vec<DeviceId>,
    /// Completion of the transaction's unregisters: complete once no reader
    /// can still hold the table this transaction replaced.
    pub unplug: Unplug,
}

pub(crate) struct Inner<S> {
    /// The published table: from `Box::into_raw`, never null. Readers may
    /// dereference it inside a read section of `domain`.
    table: AtomicPtr<Table>,
    /// This bus's readers and retired tables.
    domain: Arc<Domain>,
    /// Owner of every live device's `Arc`, serializing writers.
    writer: Mutex<BTreeMap<DeviceId, Arc<dyn Device>>>,
    next_id: AtomicU64,
    space: PhantomData<fn() -> S>,
}

impl<S> Drop for Inner<S> {
    fn drop(&mut self) {
        // SAFETY: `Inner` is dropped only when no `IoBus` or `VcpuHandle`
        // refers to it, so no reader can be inside a section that reaches
        // the current table or a retired one; the current table came from
        // `Box::into_raw` and nothing else frees it.
        unsafe {
            drop(Box::from_raw(*self.table.get_mut()));
            self.domain.free_all();
        }
    }
}

/// The dispatch engine for address space `S`: a cheap handle (clone it to
/// share) onto one lock-free interval table.
pub struct IoBus<S: AddressSpace> {
    inner: Arc<Inner<S>>,
}

impl<S: AddressSpace> Clone for IoBus<S> {
    fn clone(&self) -> Self {
        IoBus { inner: Arc::clone(&self.inner) }
    }
}

impl<S: AddressSpace> Default for IoBus<S> {
    fn default() -> Self {
        Self::new()
    }
}

impl<S: AddressSpace> fmt::Debug for IoBus<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoBus").field("space", &S::NAME).field("devices", &self.devices()).finish()
    }
}

impl<S: AddressSpace> IoBus<S> {
    /// An empty bus.
    pub fn new() -> Self {
        IoBus {
            inner: Arc::new(Inner {
                table: AtomicPtr::new(Box::into_raw(Box::new(Table::empty()))),
                domain: Domain::new(),
                writer: Mutex::new(BTreeMap::new()),
                next_id: AtomicU64::new(1),
                space: PhantomData,
            }),
        }
    }

    /// A handle for one vCPU thread: the lock-free dispatch path.
    ///
    /// The handle holds a reader registration and is therefore `!Send`:
    /// create it on the thread that will use it.
    pub fn handle(&self, vcpu: u32) -> VcpuHandle<S> {
        VcpuHandle::new(Arc::clone(&self.inner), vcpu)
    }

    /// Puts `device` at `range`.
    ///
    /// # Errors
    /// [`BusError::Overlap`] naming the device already there.
    pub fn register(
        &self,
        range: IoRange<S>,
        device: Arc<dyn Device>,
    ) -> Result<DeviceId, BusError> {
        let c = self.transaction([Edit::Register { range, device }])?;
        Ok(c.registered[0])
    }

    /// Takes a device off the bus. No dispatch that starts after this returns
    /// reaches it; [`Unplug::wait`] tells when none is still running.
    ///
    /// # Errors
    /// [`BusError::UnknownDevice`].
    pub fn unregister(&self, id: DeviceId) -> Result<Unplug, BusError> {
        Ok(self.transaction([Edit::Unregister(id)])?.unplug)
    }

    /// Moves or resizes a device's range in one atomic swap: every access
    /// sees it either at the old range or at the new one.
    ///
    /// # Errors
    /// [`BusError::UnknownDevice`], or [`BusError::Overlap`] with another device.
    pub fn remap(&self, id: DeviceId, range: IoRange<S>) -> Result<(), BusError> {
        self.transaction([Edit::Remap { id, range }]).map(drop)
    }

    /// Applies `edits` in order and publishes the result once: either all of
    /// them take effect together or, on the first error, none does.
    ///
    /// # Errors
    /// The first failing edit's error.
    pub fn transaction(
        &self,
        edits: impl IntoIterator<Item = Edit<S>>,
    ) -> Result<Committed, BusError> {
        let mut registry = self.inner.writer.lock();
        // Acquire: pairs with the previous writer's publishing swap (under
        // the lock too, so this is belt and braces).
        let current_ptr = self.inner.table.load(Ordering::Acquire);
        // SAFETY: never null; only a writer retires the published table, and
        // we hold the writer lock, so it stays alive until we swap it out.
        let current = unsafe { &*current_ptr };

        let mut draft = Draft::from_table(current);
        let mut registered = Vec::new();
        let mut added: Vec<(DeviceId, Arc<dyn Device>)> = Vec::new();
        let mut removed: Vec<DeviceId> = Vec::new();
        for edit in edits {
            match edit {
                Edit::Register { range, device } => {
                    let id = DeviceId(self.inner.next_id.fetch_add(1, Ordering::Relaxed));
                    // Relaxed: the counter only hands out unique numbers.
                    let slot = Slot { last: range.last(), id, device: Arc::as_ptr(&device) };
                    draft.insert(range.start(), slot)?;
                    registered.push(id);
                    added.push((id, device));
                }
                Edit::Unregister(id) => {
                    let pos = draft.position(id)?;
                    draft.remove(pos);
                    removed.push(id);
                }
                Edit::Remap { id, range } => {
                    let pos = draft.position(id)?;
                    let (_, slot) = draft.remove(pos);
                    draft.insert(range.start(), Slot { last: range.last(), ..slot })?;
                }
            }
        }

        let next = Box::into_raw(Box::new(draft.compile(current.generation + 1)));
        // Release: a reader whose Acquire load sees the new pointer also sees
        // the fully built table behind it. Acquire: nothing below moves above
        // the unlink the grace period is counted from.
        let old = self.inner.table.swap(next, Ordering::AcqRel);
        debug_assert_eq!(old, current_ptr);
        let old = SendPtr(old);
        registry.extend(added);
        // A device registered and unregistered in the same transaction is
        // in `added` too, so `extend` comes before the removals.
        let retired: Vec<Arc<dyn Device>> =
            removed.iter().filter_map(|id| registry.remove(id)).collect();
        let done = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&done);
        // `old` was unlinked by the swap above, so only read sections that
        // began before now can reach it; the domain runs this closure after
        // all of them have ended. The retired `Arc`s keep the devices that
        // `old` points to alive until then.
        self.inner.domain.retire(Box::new(move || {
            let old = old;
            // SAFETY: from `Box::into_raw`, unlinked, and past its grace
            // period (see above); retired exactly once.
            drop(unsafe { Box::from_raw(old.0) });
            drop(retired);
            // Release: whoever sees the flag sees the devices dropped.
            flag.store(true, Ordering::Release);
        }));
        drop(registry);
        // Outside the lock: this may run device destructors. Batched, since
        // each reclaim interrupts the vCPUs; unplug waits reclaim at once.
        self.inner.domain.reclaim_if_due();
        Ok(Committed {
            registered,
            unplug: Unplug { done, domain: Arc::clone(&self.inner.domain) },
        })
    }

    /// Number of publishes so far (each edit call or transaction is one).
    pub fn generation(&self) -> u64 {
        self.with_table(|t| t.generation)
    }

    /// Number of devices on the bus.
    pub fn len(&self) -> usize {
        self.with_table(|t| t.slots.len())
    }

    /// Whether no device is on the bus.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The device that owns `addr`, and its range.
    pub fn lookup(&self, addr: u64) -> Option<(DeviceId, IoRange<S>)> {
        self.with_table(|t| t.find(addr).map(|i| (t.slots[i].id, range_of(t, i))))
    }

    /// The current range of device `id`.
    pub fn range(&self, id: DeviceId) -> Option<IoRange<S>> {
        self.with_table(|t| t.slots.iter().position(|s| s.id == id).map(|i| range_of(t, i)))
    }

    /// The device registered as `id`.
    pub fn device(&self, id: DeviceId) -> Option<Arc<dyn Device>> {
        self.inner.writer.lock().get(&id).cloned()
    }

    /// Every device and its range, in address order.
    pub fn devices(&self) -> Vec<(DeviceId, IoRange<S>)> {
        self.with_table(|t| (0..t.slots.len()).map(|i| (t.slots[i].id, range_of(t, i))).collect())
    }

    fn with_table<R>(&self, f: impl FnOnce(&Table) -> R) -> R {
        reader::with_reader(&self.inner, |reader| {
            let section = reader.pin();
            f(reader::load(&self.inner, &section))
        })
    }
}

fn range_of<S: AddressSpace>(t: &Table, i: usize) -> IoRange<S> {
    IoRange::inclusive(t.starts[i], t.slots[i].last).expect("table ranges were validated on insert")
}

/// Completion of an unplug: tells when no vCPU can still be inside the
/// devices an [`IoBus::unregister`] (or transaction) removed.
pub struct Unplug {
    done: Arc<AtomicBool>,
    domain: Arc<Domain>,
}

/// A retired table pointer on its way to the domain's destructor list.
struct SendPtr(*mut Table);
// SAFETY: `Table` is `Send`; the pointer is an owned `Box` in transit.
unsafe impl Send for SendPtr {}

impl fmt::Debug for Unplug {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Unplug").field("complete", &self.is_complete()).finish()
    }
}

impl Unplug {
    /// Whether the grace period has passed: no dispatch is still inside the
    /// removed devices, and the bus has dropped its references to them.
    pub fn is_complete(&self) -> bool {
        // Acquire pairs with the Release store in the deferred destructor.
        self.done.load(Ordering::Acquire)
    }

    /// Helps reclamation along once; returns [`Self::is_complete`]. For
    /// no_std VMMs that poll instead of blocking.
    pub fn poll(&self) -> bool {
        if !self.is_complete() {
            self.domain.reclaim();
        }
        self.is_complete()
    }

    /// Blocks until [`Self::is_complete`]. A vCPU still inside a removed
    /// device keeps this waiting until its call returns.
    ///
    /// # Errors
    /// [`WaitError::InsideDispatch`] when the calling thread is itself inside
    /// a vmio dispatch (a device unplugging during its own call): its own
    /// open dispatch would make the wait endless. Detection needs `std`; without it,
    /// use [`Self::poll`] from device code.
    pub fn wait(&self) -> Result<(), WaitError> {
        if self.is_complete() {
            return Ok(());
        }
        if reader::inside_dispatch() {
            return Err(WaitError::InsideDispatch);
        }
        while !self.is_complete() {
            // Each pass ends the grace period of whatever no reader is still
            // inside, and runs those destructors.
            self.domain.reclaim();
            #[cfg(feature = "std")]
            std::thread::yield_now();
            #[cfg(not(feature = "std"))]
            core::hint::spin_loop();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
