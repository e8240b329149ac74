//! Reclamation of retired tables and unplugged devices, on crossbeam-epoch.
//!
//! Each bus owns a [`Reclaim`]: a private [`Collector`] (so no other crate's
//! garbage is ever collected on a vCPU thread, and a bus's grace periods
//! depend only on its own readers) and a list of retired items whose grace
//! period is over.
//!
//! A writer retires what it unlinked by deferring one closure to the
//! collector. That closure runs on whichever thread collects next — often a
//! vCPU thread, inside `pin` — so it does only what cannot block or run
//! foreign code: it frees the old table and, when the edit unplugged devices,
//! pushes the bus's last references to them onto [`Ready`] (no allocation:
//! the node was allocated by the writer). The devices themselves are dropped
//! by whoever *drives* reclamation — writers after each edit, and
//! [`Unplug::poll`](super::Unplug::poll)/[`wait`](super::Unplug::wait) — with
//! no lock held, so a device's destructor never runs in the middle of a
//! vCPU's dispatch, and one that panics is contained (see [`Retired`]).

use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crossbeam_epoch::{Collector, Guard, LocalHandle, Shared};

use super::ready::{self, Node};
use super::table::Table;
use crate::device::Device;
use crate::sync::Mutex;

/// One bus's reclamation domain.
pub(crate) struct Reclaim {
    collector: Collector,
    /// Shared with the deferred closures; whichever drops it last drops
    /// what the collector ran after the last driver (the collector runs its
    /// remaining closures when its last participant leaves).
    ready: Arc<Ready>,
    /// Retirements held back while the collector is not keeping up (see
    /// `retire`). Taken under the writer lock and by `flush`, nothing else.
    held: Mutex<Vec<Unlinked>>,
    /// Retirements whose unplug has not completed yet.
    pending: Arc<AtomicUsize>,
}

impl Reclaim {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Reclaim {
            collector: Collector::new(),
            ready: Arc::new(Ready::new()),
            held: Mutex::new(Vec::new()),
            pending: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// A participant of this bus's collector, for one vCPU handle.
    pub(crate) fn register(&self) -> LocalHandle {
        self.collector.register()
    }

    /// Pins this thread in the collector: its cached participant under
    /// `std`, a fresh one when there is none (no `std`, or thread-local
    /// storage already torn down). Pointers loaded from the bus after this
    /// stay valid until the guard drops.
    pub(crate) fn pin(self: &Arc<Self>) -> Guard {
        #[cfg(feature = "std")]
        if let Some(guard) = cached::pin(self) {
            return guard;
        }
        // A guard keeps its participant alive on its own, so the handle can
        // go at once; the participant leaves the collector when the guard does.
        self.collector.register().pin()
    }

    /// Whether this thread's cached participant of this bus is pinned.
    #[cfg(feature = "std")]
    pub(crate) fn cached_is_pinned(self: &Arc<Self>) -> bool {
        cached::is_pinned(self)
    }

    /// Hands `old` (already unlinked: no read section that begins from now
    /// on can reach it) and the bus's references to the devices the same
    /// edit unplugged to the collector. The returned flag turns true once no
    /// read section that could see `old` is still open and every one of
    /// `devices` has been dropped by the bus.
    pub(crate) fn retire(
        &self,
        guard: &Guard,
        old: Shared<'_, Table>,
        devices: Vec<Arc<dyn Device>>,
    ) -> Arc<AtomicBool> {
        let done = Arc::new(AtomicBool::new(false));
        // Relaxed: a gauge that only steers holding, `drain_all` and waits'
        // backoff; the items themselves are handed over through the
        // collector, `held` and `Ready`.
        let pending = self.pending.fetch_add(1, Ordering::Relaxed);
        let item = Node::new(Retired {
            devices,
            done: Done { flag: Arc::clone(&done), pending: Arc::clone(&self.pending) },
        });
        let unlinked = Unlinked { table: SendPtr(old.as_raw().cast_mut()), item };
        let mut held = self.held.lock();
        // Retirements the collector has and has not finished yet.
        let in_flight = pending.saturating_sub(held.len());
        if in_flight < HOLD_AFTER {
            // The collector keeps up (again): hand it anything held too.
            self.defer_held(guard, core::mem::take(&mut *held));
            drop(held);
            let ready = Arc::clone(&self.ready);
            // `defer` requires `Send + 'static`, which the closure is; it
            // cannot panic (freeing a table runs no foreign code).
            guard.defer(move || unlinked.finish(&ready));
            guard.flush();
        } else {
            // Something holds the epoch (a vCPU parked in a device): keep
            // the retirement here and hand a whole batch to the collector
            // at once, so each edit does not also pin a batch of crossbeam's
            // (about 2 KiB) until the vCPU returns.
            held.push(unlinked);
            if held.len() >= HOLD_BATCH {
                self.defer_held(guard, core::mem::take(&mut *held));
                drop(held);
                guard.flush();
            }
        }
        done
    }

    /// Defers `batch` as one closure.
    fn defer_held(&self, guard: &Guard, batch: Vec<Unlinked>) {
        if batch.is_empty() {
            return;
        }
        let ready = Arc::clone(&self.ready);
        // Deferring later than the unlink is always safe: the grace period
        // only gets longer.
        guard.defer(move || {
            for unlinked in batch {
                unlinked.finish(&ready);
            }
        });
    }

    /// Moves held and this thread's retirements into the collector, runs
    /// whatever is past its grace period, and drops the devices that became
    /// ready. Never waits for a reader.
    pub(crate) fn flush(self: &Arc<Self>) {
        let guard = self.pin();
        let held = core::mem::take(&mut *self.held.lock());
        self.defer_held(&guard, held);
        guard.flush();
        drop(guard);
        self.ready.drain();
    }

    /// Retirements not done yet (a progress gauge for waits).
    pub(crate) fn pending(&self) -> usize {
        // Relaxed: see `retire`.
        self.pending.load(Ordering::Relaxed)
    }

    /// Drops the devices of every retirement whose grace period is over.
    pub(crate) fn run_ready(&self) {
        self.ready.drain();
    }

    /// Best effort at reclaiming everything now, for a bus with no reader
    /// left: each flush lets the epoch advance once, and crossbeam collects
    /// a bounded number of bags per call.
    pub(crate) fn drain_all(self: &Arc<Self>) {
        for _ in 0..64 {
            // Relaxed: see `retire`; a stale value costs one more round.
            if self.pending.load(Ordering::Relaxed) == 0 {
                return;
            }
            self.flush();
        }
    }
}

/// Retirements allowed in flight before new ones are held back and batched.
const HOLD_AFTER: usize = 16;
/// Held retirements handed to the collector in one closure.
const HOLD_BATCH: usize = 64;

/// An unlinked table and its retirement, on their way to the collector.
struct Unlinked {
    table: SendPtr,
    item: Box<Node<Retired>>,
}

impl Unlinked {
    /// Runs once the grace period is over: frees the table and completes the
    /// retirement, or queues its devices for a driver.
    fn finish(self, ready: &Ready) {
        // SAFETY: the table came from `Owned::into_shared` when it was
        // published, was unlinked by the writer's swap before it was retired,
        // and this runs from a closure the collector runs only after every
        // participant pinned before the defer has unpinned; nothing else frees
        // a table.
        drop(unsafe { Box::from_raw(self.table.0) });
        if self.item.value().devices.is_empty() {
            // Nothing foreign to run: done here (dropping the item flips
            // its flag).
            drop(self.item);
        } else {
            ready.push(self.item);
        }
    }
}

/// A raw table pointer on its way into a deferred closure.
struct SendPtr(*mut Table);
// SAFETY: `Table` is `Send`; the pointer is an owned allocation in transit
// to the one closure that frees it.
unsafe impl Send for SendPtr {}

/// Items past their grace period, waiting for a driver to drop their
/// devices (see [`ready`](super::ready) for why it is a hand-written stack).
type Ready = ready::Stack<Retired>;

impl Ready {
    /// Drops every ready item's devices and completes their unplugs, on
    /// the calling thread.
    fn drain(&self) {
        // Dropping the chain drops every item in it, even when one of them
        // unwinds (no `std`: a device destructor's panic propagates, but the
        // rest of the chain is still finished first).
        drop(self.take());
    }
}

/// One edit's retirement: the bus's references to the devices it
/// unplugged, and the unplug's completion flag.
///
/// Dropping it drops the devices one by one — under `std` each inside
/// `catch_unwind`, so a panicking destructor is logged and the others still
/// run — and then, even while unwinding, flips the flag (field order: `done`
/// drops after `devices`).
struct Retired {
    devices: Vec<Arc<dyn Device>>,
    #[expect(dead_code, reason = "held for its `Drop`, which completes the unplug")]
    done: Done,
}

impl Drop for Retired {
    fn drop(&mut self) {
        for device in self.devices.drain(..) {
            release(device);
        }
    }
}

/// Drops one of the bus's device references.
fn release(device: Arc<dyn Device>) {
    #[cfg(feature = "std")]
    {
        // Nothing is observed after a panic but the device being gone, so
        // asserting unwind safety is right.
        let dropped = std::panic::catch_unwind(core::panic::AssertUnwindSafe(move || drop(device)));
        if dropped.is_err() {
            log::error!("a device destructor panicked during unplug; the other devices still go");
        }
    }
    #[cfg(not(feature = "std"))]
    drop(device);
}

/// Completes one unplug when dropped.
struct Done {
    flag: Arc<AtomicBool>,
    /// The bus's count of retirements not yet done.
    pending: Arc<AtomicUsize>,
}

impl Drop for Done {
    fn drop(&mut self) {
        // Relaxed: see `Reclaim::retire`.
        self.pending.fetch_sub(1, Ordering::Relaxed);
        // Release: whoever sees the flag (Acquire in `Unplug::is_complete`)
        // sees the old table freed and the devices dropped.
        self.flag.store(true, Ordering::Release);
    }
}

#[cfg(feature = "std")]
mod cached {
    //! Per-thread participants for the handle-free paths (`IoBus::read`,
    //! `len`, `lookup`…, writers and unplug waits).

    use alloc::sync::{Arc, Weak};
    use alloc::vec::Vec;
    use core::cell::RefCell;

    use crossbeam_epoch::{Guard, LocalHandle};

    use super::Reclaim;

    std::thread_local! {
        /// One participant per bus this thread has used, with the bus's
        /// domain (a `Weak`: it tells when the bus is gone, and keeps the
        /// address from being reused while the entry exists).
        static LOCALS: RefCell<Vec<(Weak<Reclaim>, LocalHandle)>> =
            const { RefCell::new(Vec::new()) };
    }

    pub(super) fn is_pinned(domain: &Arc<Reclaim>) -> bool {
        LOCALS
            .try_with(|locals| {
                let me = Arc::as_ptr(domain);
                locals.try_borrow().is_ok_and(|locals| {
                    locals.iter().any(|(d, local)| d.as_ptr() == me && local.is_pinned())
                })
            })
            .unwrap_or(false)
    }

    /// Pins this thread's participant of `domain`, registering one on first
    /// use; `None` when thread-local storage is being torn down or is
    /// already borrowed (the caller then registers a fresh participant).
    pub(super) fn pin(domain: &Arc<Reclaim>) -> Option<Guard> {
        LOCALS
            .try_with(|locals| {
                let mut locals = locals.try_borrow_mut().ok()?;
                let me = Arc::as_ptr(domain);
                if let Some((_, local)) = locals.iter().find(|(d, _)| d.as_ptr() == me) {
                    // The guard borrows nothing from the list, so the borrow
                    // ends before any device code runs under it.
                    return Some(local.pin());
                }
                // Forget the participants of buses that are gone.
                locals.retain(|(d, _)| d.strong_count() > 0);
                locals.push((Arc::downgrade(domain), domain.register()));
                locals.last().map(|(_, local)| local.pin())
            })
            .ok()
            .flatten()
    }
}
