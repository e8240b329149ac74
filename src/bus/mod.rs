//! `IoBus`: the dispatch engine for one address space.
//!
//! # Protocol
//!
//! * **Readers** (vCPUs, through a [`VcpuHandle`]) pin the bus's private
//!   crossbeam-epoch collector (see [`reclaim`]), load the current [`Table`]
//!   with `Acquire`, search it and call the device while still pinned. They
//!   take no lock, never retry and allocate nothing.
//! * **Writers** take the writer lock, copy the current table, apply their
//!   edits, validate, publish the new table and retire the old one (and any
//!   unplugged device's `Arc`) to the collector. They release the lock
//!   before driving reclamation (which may run device destructors) and never
//!   wait for a grace period, so a device may edit its own bus from inside a
//!   dispatch without deadlock.
//! * **Unplug completion**: once the collector has run the retirement of the
//!   table that last named a device (every reader pinned when it was
//!   unlinked has unpinned) and a driver has dropped the bus's reference to
//!   the device, the [`Unplug`] ticket's flag is raised.
//!
//! Lock order: the writer lock, then the reclamation domain's short list of
//! held retirements (taken on its own by unplug polls and waits). Device
//! code never runs under either.

mod error;
mod reader;
mod ready;
mod reclaim;
pub(crate) mod search;
pub(crate) mod table;

use alloc::collections::BTreeMap;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;
use core::marker::PhantomData;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crossbeam_epoch::{Atomic, Owned};

pub use error::{AccessError, BusError, WaitError};
pub use reader::VcpuHandle;
use reclaim::Reclaim;
use table::{Draft, Slot, Table};

use crate::addr::{AddressSpace, IoRange};
use crate::device::{Device, DeviceId};
use crate::sync::Mutex;

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
    /// The published table, never null. Readers may dereference it while
    /// pinned in `reclaim`'s collector.
    table: Atomic<Table>,
    /// This bus's collector and retired items.
    reclaim: Arc<Reclaim>,
    /// Owner of every live device's `Arc`, serializing writers.
    writer: Mutex<BTreeMap<DeviceId, Arc<dyn Device>>>,
    next_id: AtomicU64,
    space: PhantomData<fn() -> S>,
}

impl<S> Drop for Inner<S> {
    fn drop(&mut self) {
        // SAFETY: `Inner` is dropped only when no `IoBus` or `VcpuHandle`
        // refers to it, so no reader is pinned with a reference to the
        // current table; it was published from an `Owned` and only a writer
        // (none is left) retires it.
        drop(unsafe {
            self.table.load(Ordering::Relaxed, crossbeam_epoch::unprotected()).into_owned()
        });
        // Retired tables are the collector's; with no reader left, a few
        // rounds run them all, and the unplugged devices go now rather
        // than whenever the collector's last participant leaves.
        self.reclaim.drain_all();
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
                table: Atomic::new(Table::empty()),
                reclaim: Reclaim::new(),
                writer: Mutex::new(BTreeMap::new()),
                next_id: AtomicU64::new(1),
                space: PhantomData,
            }),
        }
    }

    /// A handle for one vCPU thread: the lock-free dispatch path.
    ///
    /// The handle is a participant of the bus's epoch collector and is
    /// therefore `!Send`: create it on the thread that will use it (see
    /// [`VcpuHandle`] for the pattern).
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
        let guard = self.inner.reclaim.pin();
        // Acquire: pairs with the previous writer's publishing swap (under
        // the lock too, so this is belt and braces).
        let current_ptr = self.inner.table.load(Ordering::Acquire, &guard);
        // SAFETY: never null; only a writer retires the published table, and
        // we hold the writer lock (and a pin), so it stays alive until we
        // swap it out.
        let current = unsafe { current_ptr.deref() };

        let mut draft = Draft::from_table(current);
        let mut registered = Vec::new();
        let mut added: Vec<(DeviceId, Arc<dyn Device>)> = Vec::new();
        let mut removed: Vec<DeviceId> = Vec::new();
        for edit in edits {
            match edit {
                Edit::Register { range, device } => {
                    // Relaxed: the counter only hands out unique numbers.
                    let id = DeviceId(self.inner.next_id.fetch_add(1, Ordering::Relaxed));
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

        let next = Owned::new(draft.compile(current.generation + 1));
        // Release: a reader whose Acquire load sees the new pointer also sees
        // the fully built table behind it. Acquire: the retirement below is
        // ordered after the unlink.
        let old = self.inner.table.swap(next, Ordering::AcqRel, &guard);
        debug_assert_eq!(old, current_ptr);
        registry.extend(added);
        // A device registered and unregistered in the same transaction is
        // in `added` too, so `extend` comes before the removals.
        let retired: Vec<Arc<dyn Device>> =
            removed.iter().filter_map(|id| registry.remove(id)).collect();
        // `old` was unlinked by the swap above, so only readers pinned
        // before now can reach it; the retired `Arc`s keep the devices that
        // `old` points to alive until those have unpinned.
        let done = self.inner.reclaim.retire(&guard, old, retired);
        drop(registry);
        // Outside the lock, since this may run device destructors: finish
        // whatever is due (`retire` handed this edit to the collector).
        drop(guard);
        self.inner.reclaim.run_ready();
        Ok(Committed {
            registered,
            unplug: Unplug { done, reclaim: Arc::clone(&self.inner.reclaim) },
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
        let guard = self.inner.reclaim.pin();
        f(reader::load(&self.inner, &guard))
    }
}

fn range_of<S: AddressSpace>(t: &Table, i: usize) -> IoRange<S> {
    IoRange::inclusive(t.starts[i], t.slots[i].last).expect("table ranges were validated on insert")
}

/// Completion of an unplug: tells when no vCPU can still be inside the
/// devices an [`IoBus::unregister`] (or transaction) removed.
pub struct Unplug {
    done: Arc<AtomicBool>,
    reclaim: Arc<Reclaim>,
}

impl fmt::Debug for Unplug {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Unplug").field("complete", &self.is_complete()).finish()
    }
}

impl Unplug {
    /// Whether the grace period has passed: no dispatch is still inside the
    /// removed devices, and the bus has dropped its references to them.
    pub fn is_complete(&self) -> bool {
        // Acquire pairs with the Release store when the retirement is done.
        self.done.load(Ordering::Acquire)
    }

    /// Helps reclamation along once (never blocks on a reader); returns
    /// [`Self::is_complete`]. For no_std VMMs that poll instead of blocking,
    /// and for device code, which must not [`wait`](Self::wait) on its own bus.
    pub fn poll(&self) -> bool {
        if !self.is_complete() {
            self.reclaim.flush();
        }
        self.is_complete()
    }

    /// Blocks until [`Self::is_complete`]. A vCPU still inside a removed
    /// device keeps this waiting until its call returns.
    ///
    /// While waiting it drives reclamation itself, at full speed while that
    /// makes progress, and otherwise backs off: a few short spins, then
    /// yielding the CPU, then (with `std`) sleeping with a growing interval
    /// up to a millisecond. It never interrupts other CPUs.
    ///
    /// # Errors
    /// [`WaitError::InsideDispatch`] when the calling thread is itself inside
    /// a dispatch of this same bus (a device unplugging during its own
    /// call, or a device of another bus called from one): its own open
    /// dispatch would make the wait endless. Waiting on an unrelated bus
    /// from inside a dispatch is fine. Detection needs `std`; without it,
    /// use [`Self::poll`] from device code.
    pub fn wait(&self) -> Result<(), WaitError> {
        if self.is_complete() {
            return Ok(());
        }
        if reader::inside_dispatch_of(&self.reclaim) {
            return Err(WaitError::InsideDispatch);
        }
        let mut backoff = Backoff::default();
        let mut pending = self.reclaim.pending();
        while !self.poll() {
            // Each poll collects a bounded number of crossbeam's batches:
            // while they keep completing (a backlog left by a vCPU that was
            // parked in a device), go on at full speed.
            let now = self.reclaim.pending();
            if now < pending {
                backoff = Backoff::default();
            } else {
                backoff.snooze();
            }
            pending = now;
        }
        Ok(())
    }
}

/// How an unplug wait spends the time between two reclamation attempts.
#[derive(Default)]
struct Backoff {
    step: u32,
}

impl Backoff {
    /// Rounds of spinning (2, 4, … 64 spin hints) before yielding.
    const SPIN: u32 = 6;
    /// Rounds of yielding before sleeping.
    #[cfg(feature = "std")]
    const YIELD: u32 = Self::SPIN + 10;
    /// Longest sleep, in microseconds.
    #[cfg(feature = "std")]
    const MAX_SLEEP_US: u64 = 1000;

    fn snooze(&mut self) {
        let step = self.step;
        self.step = step.saturating_add(1);
        if step < Self::SPIN {
            for _ in 0..2u32 << step {
                core::hint::spin_loop();
            }
            return;
        }
        #[cfg(feature = "std")]
        {
            if step < Self::YIELD {
                std::thread::yield_now();
            } else {
                // 10 µs, doubling, capped.
                let us = (10u64 << (step - Self::YIELD).min(10)).min(Self::MAX_SLEEP_US);
                std::thread::sleep(core::time::Duration::from_micros(us));
            }
        }
        #[cfg(not(feature = "std"))]
        for _ in 0..1u32 << Self::SPIN {
            core::hint::spin_loop();
        }
    }
}

#[cfg(test)]
mod tests;
