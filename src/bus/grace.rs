//! Grace periods for retired tables, with readers that pay no fence.
//!
//! Every reader (a [`VcpuHandle`](super::VcpuHandle), or a thread's cached
//! reader for the handle-free path) owns a [`Slot`]: a counter that is odd
//! while the reader is inside a read section. Entering a section is a plain
//! store to the reader's own cache line; leaving is a `Release` store.
//!
//! The store that enters a section must be visible before the section loads
//! the table pointer, or a writer could miss it and free a table the reader
//! is about to use (the store-buffer pattern). The usual cure is a full
//! fence on every entry — a few nanoseconds, most of a dispatch's
//! synchronization cost. Instead, the fence is made *asymmetric*: on Linux
//! the reclaimer calls `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`, which
//! runs a full barrier on every CPU currently running one of this process's
//! threads (a context switch is one for the others), and readers need only
//! a compiler fence. Where `membarrier` is unavailable (no `std`, another
//! OS, an old kernel, Miri), readers fall back to a `SeqCst` fence on entry and
//! the reclaimer to a `SeqCst` fence: the textbook pairing.
//!
//! Reclamation (`Domain::reclaim`, run by unplug polls and waits, and by
//! writers once [`RECLAIM_BATCH`] retired items have piled up: each call
//! interrupts every CPU running a vCPU, so writers batch) never blocks on
//! readers: it fences, records which
//! readers were inside a section, and runs a retired item's destructor once
//! each of those has left it. Lock order: `retired`, then `readers`.

use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::cell::Cell;
use core::marker::PhantomData;
use core::sync::atomic::{AtomicU64, Ordering, fence};

use crate::sync::Mutex;

/// Retired items a writer lets pile up before it reclaims.
const RECLAIM_BATCH: usize = 8;

/// One reader's section counter, alone on its cache lines so vCPUs never
/// write a line another vCPU reads on its own hot path.
#[repr(align(128))]
pub(crate) struct Slot {
    seq: AtomicU64,
}

/// Something retired by a writer, freed after a grace period.
struct Retired {
    free: Box<dyn FnOnce() + Send>,
    /// Readers that were inside a section when the grace period began, with
    /// the counter value they had; `None` until the period begins.
    waiting: Option<Vec<(Arc<Slot>, u64)>>,
}

/// The reclamation domain of one bus: its readers and its retired items.
pub(crate) struct Domain {
    readers: Mutex<Vec<Arc<Slot>>>,
    retired: Mutex<Vec<Retired>>,
}

impl Domain {
    pub(crate) fn new() -> Arc<Self> {
        asymmetric::init();
        Arc::new(Domain { readers: Mutex::new(Vec::new()), retired: Mutex::new(Vec::new()) })
    }

    /// A new reader of this domain.
    pub(crate) fn reader(self: &Arc<Self>) -> Reader {
        let slot = Arc::new(Slot { seq: AtomicU64::new(0) });
        self.readers.lock().push(Arc::clone(&slot));
        Reader {
            slot,
            seq: Cell::new(0),
            depth: Cell::new(0),
            domain: Arc::clone(self),
            not_send: PhantomData,
        }
    }

    /// Runs `free` once no reader can still be in a section that began
    /// before this call. The caller must already have unlinked whatever
    /// `free` frees, so that no section beginning later can reach it.
    pub(crate) fn retire(&self, free: Box<dyn FnOnce() + Send>) {
        self.retired.lock().push(Retired { free, waiting: None });
    }

    /// [`Self::reclaim`], once enough has been retired since the last one
    /// to be worth a `membarrier` (it interrupts every CPU running a vCPU).
    pub(crate) fn reclaim_if_due(&self) {
        if self.retired.lock().len() >= RECLAIM_BATCH {
            self.reclaim();
        }
    }

    /// Frees every retired item whose grace period is over; never waits.
    /// Runs destructors (the bus's last references to unplugged devices)
    /// on the calling thread, with no lock held.
    pub(crate) fn reclaim(&self) {
        let done: Vec<Retired> = {
            let mut retired = self.retired.lock();
            if retired.is_empty() {
                return;
            }
            // Everything in `retired` was unlinked before it was pushed,
            // hence before this fence: after it, a reader that could still
            // reach such an item shows an odd counter (see the module docs).
            asymmetric::heavy();
            let readers = self.readers.lock();
            for item in retired.iter_mut() {
                let waiting = item.waiting.get_or_insert_with(|| {
                    readers
                        .iter()
                        // Acquire: pairs with the Release exit of an earlier
                        // section, so an even value means that section's
                        // reads are over.
                        .map(|s| (s, s.seq.load(Ordering::Acquire)))
                        .filter(|(_, seq)| seq & 1 == 1)
                        .map(|(s, seq)| (Arc::clone(s), seq))
                        .collect()
                });
                // Any change of an odd counter means the section we saw has
                // ended (counters only grow); Acquire as above.
                waiting.retain(|(s, seq)| s.seq.load(Ordering::Acquire) == *seq);
            }
            drop(readers);
            retired
                .extract_if(.., |item| item.waiting.as_ref().is_some_and(Vec::is_empty))
                .collect()
        };
        for item in done {
            (item.free)();
        }
    }

    /// Runs every retired item's destructor now.
    ///
    /// # Safety
    /// No reader of this domain may be inside a section, now or later, that
    /// could reach a retired item.
    pub(crate) unsafe fn free_all(&self) {
        let all = core::mem::take(&mut *self.retired.lock());
        for item in all {
            (item.free)();
        }
    }
}

/// A registered reader: enters and leaves read sections of one domain.
/// `!Send` and `!Sync`: its sections are the calling thread's.
pub(crate) struct Reader {
    slot: Arc<Slot>,
    /// Mirror of `slot.seq`, which only this reader writes.
    seq: Cell<u64>,
    /// Nesting depth: a device may dispatch on its own bus from inside a
    /// dispatch through the same thread's cached reader.
    depth: Cell<u32>,
    domain: Arc<Domain>,
    not_send: PhantomData<*const ()>,
}

impl Reader {
    /// Enters a read section; it lasts until the returned guard drops.
    /// Pointers loaded (`Acquire`) from the domain's published locations
    /// after this stay valid until then.
    #[inline(always)]
    pub(crate) fn pin(&self) -> Pinned<'_> {
        let depth = self.depth.get();
        self.depth.set(depth + 1);
        if depth == 0 {
            let seq = self.seq.get() + 1;
            self.seq.set(seq);
            // Relaxed: ordered before the section's loads by the fence below
            // (a compiler fence paired with the reclaimer's membarrier, or a
            // full fence paired with its SeqCst fence).
            self.slot.seq.store(seq, Ordering::Relaxed);
            asymmetric::light();
        }
        Pinned { reader: self }
    }

    #[inline(always)]
    fn unpin(&self) {
        let depth = self.depth.get() - 1;
        self.depth.set(depth);
        if depth == 0 {
            let seq = self.seq.get() + 1;
            self.seq.set(seq);
            // Release: the section's reads happen before a reclaimer that
            // sees the even value frees anything.
            self.slot.seq.store(seq, Ordering::Release);
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        let mut readers = self.domain.readers.lock();
        if let Some(i) = readers.iter().position(|s| Arc::ptr_eq(s, &self.slot)) {
            readers.swap_remove(i);
        }
    }
}

/// An open read section; leaving it is dropping this.
pub(crate) struct Pinned<'r> {
    reader: &'r Reader,
}

impl Drop for Pinned<'_> {
    #[inline(always)]
    fn drop(&mut self) {
        self.reader.unpin();
    }
}

/// The two halves of the asymmetric fence.
mod asymmetric {
    #[cfg(all(feature = "std", target_os = "linux", not(miri)))]
    use core::sync::atomic::compiler_fence;

    use super::{Ordering, fence};

    #[cfg(all(feature = "std", target_os = "linux", not(miri)))]
    mod os {
        use core::sync::atomic::{AtomicBool, Ordering};

        const CMD_PRIVATE_EXPEDITED: libc::c_long = 1 << 3;
        const CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_long = 1 << 4;

        /// Whether `membarrier` is registered for this process. Set once,
        /// before any domain (hence any reader) exists, by `init`.
        pub(super) static ACTIVE: AtomicBool = AtomicBool::new(false);
        static INIT: std::sync::Once = std::sync::Once::new();

        fn membarrier(cmd: libc::c_long) -> bool {
            // SAFETY: `membarrier` takes (cmd, flags, cpu_id) integers and
            // touches no memory of ours.
            unsafe {
                libc::syscall(libc::SYS_membarrier, cmd, 0 as libc::c_long, 0 as libc::c_long) == 0
            }
        }

        pub(super) fn init() {
            INIT.call_once(|| {
                // Relaxed: `Once` orders this store before every later
                // `init` return, and a domain (so a reader or reclaimer)
                // exists only after `init` returned on some thread, whose
                // handing the domain over synchronizes with its users.
                ACTIVE.store(membarrier(CMD_REGISTER_PRIVATE_EXPEDITED), Ordering::Relaxed);
            });
        }

        /// Runs the barrier on every CPU running this process; false when
        /// not registered (readers then fence themselves).
        pub(super) fn heavy() -> bool {
            // Relaxed: see `init`.
            if !ACTIVE.load(Ordering::Relaxed) {
                return false;
            }
            // Readers skip their fence once registered, so a failure here
            // could not be made up for; a registered process cannot get one.
            assert!(membarrier(CMD_PRIVATE_EXPEDITED), "membarrier failed after registration");
            true
        }
    }

    pub(super) fn init() {
        #[cfg(all(feature = "std", target_os = "linux", not(miri)))]
        os::init();
    }

    /// The reader's half, between publishing its odd counter and loading.
    #[inline(always)]
    pub(super) fn light() {
        #[cfg(all(feature = "std", target_os = "linux", not(miri)))]
        {
            // Relaxed: see `os::init`. Once registered, a registered
            // process stays registered, so the branch never changes.
            if os::ACTIVE.load(Ordering::Relaxed) {
                compiler_fence(Ordering::SeqCst);
            } else {
                fence(Ordering::SeqCst);
            }
        }
        #[cfg(not(all(feature = "std", target_os = "linux", not(miri))))]
        fence(Ordering::SeqCst);
    }

    /// The reclaimer's half, between unlinking and reading the counters.
    pub(super) fn heavy() {
        #[cfg(all(feature = "std", target_os = "linux", not(miri)))]
        if os::heavy() {
            return;
        }
        // Readers fence on entry; this fence pairs with theirs.
        fence(Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use alloc::sync::Arc;
    use core::sync::atomic::{AtomicBool, Ordering};

    use super::Domain;

    fn flag_item(d: &Domain) -> Arc<AtomicBool> {
        let freed = Arc::new(AtomicBool::new(false));
        let f = Arc::clone(&freed);
        d.retire(alloc::boxed::Box::new(move || f.store(true, Ordering::Relaxed)));
        freed
    }

    #[test]
    fn an_open_section_holds_back_only_what_was_retired_during_it() {
        let d = Domain::new();
        let (a, b) = (d.reader(), d.reader());
        let section = a.pin();
        let nested = a.pin();
        let first = flag_item(&d);
        d.reclaim();
        assert!(!first.load(Ordering::Relaxed), "a's section began before the retire");
        drop(nested);
        d.reclaim();
        assert!(!first.load(Ordering::Relaxed), "the outer section is still open");

        // b enters after the retire: it cannot hold `first` back.
        let _b = b.pin();
        drop(section);
        d.reclaim();
        assert!(first.load(Ordering::Relaxed));

        // ...but it does hold back what is retired while it is inside.
        let second = flag_item(&d);
        d.reclaim();
        assert!(!second.load(Ordering::Relaxed));
        drop(_b);
        d.reclaim();
        assert!(second.load(Ordering::Relaxed));
    }

    #[test]
    fn idle_and_dropped_readers_never_hold_anything_back() {
        let d = Domain::new();
        let idle = d.reader();
        let gone = d.reader();
        drop(gone.pin());
        drop(gone);
        let item = flag_item(&d);
        d.reclaim();
        assert!(item.load(Ordering::Relaxed));
        drop(idle);
        assert!(d.readers.lock().is_empty(), "readers deregister on drop");
    }

    #[test]
    fn a_section_that_moves_on_releases_the_snapshot() {
        let d = Domain::new();
        let r = d.reader();
        let s = r.pin();
        let item = flag_item(&d);
        d.reclaim();
        drop(s);
        // A new section: the counter differs from the snapshot, so the old
        // section is known to be over even though this one is open.
        let _s = r.pin();
        d.reclaim();
        assert!(item.load(Ordering::Relaxed));
    }
}
