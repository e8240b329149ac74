//! The split virtqueue, device side: descriptor table, available ring and
//! used ring in guest memory.
//!
//! Its design notes are on [`SplitQueue`].

mod chain;
mod error;
mod layout;

use alloc::vec;
use alloc::vec::Vec;
use arrayvec::ArrayVec;
use core::sync::atomic::{Ordering, fence};

pub use chain::{Chain, DEFAULT_SEGMENTS, DescriptorChain, Segment};
pub use error::{ChainError, PopError, QueueError};
pub use layout::{QueueArea, QueueConfig};

use crate::memory::GuestMemory;
use crate::virtio::spec::features::{VIRTIO_F_INDIRECT_DESC, VIRTIO_F_RING_EVENT_IDX};
use crate::virtio::spec::ring::{VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_USED_F_NO_NOTIFY};

/// The split virtqueue, device side: descriptor table, available ring and
/// used ring in guest memory.
///
/// A [`SplitQueue`] is built from the addresses and size the driver
/// programmed, after checking them ([`SplitQueue::new`]). The device then
/// [`pop`](SplitQueue::pop)s descriptor chains — validated in full and copied
/// into a fixed-capacity scatter-gather list ([`DescriptorChain`]), so no
/// request allocates — and [`push`](SplitQueue::push)es them back used.
/// Hot device loops use [`pop_into`](SplitQueue::pop_into), which refills
/// one chain in place instead of moving a fresh one out each time, and
/// [`add_used`](SplitQueue::add_used) + [`publish_used`](SplitQueue::publish_used),
/// which publish a whole batch of completions with one `used.idx` store.
/// [`needs_interrupt`](SplitQueue::needs_interrupt) and
/// [`enable_notification`](SplitQueue::enable_notification) implement
/// VIRTIO_F_EVENT_IDX in both directions.
///
/// # What the guest can get wrong, and what happens
///
/// Two kinds of failure, told apart by [`PopError`]:
/// - **A bad chain** ([`PopError::Chain`]): a descriptor pointing outside
///   guest RAM, a `next` past the table, a loop, a zero-length buffer, a
///   total length above 4 GiB, a readable buffer after a writable one, an
///   indirect table that is nested, combined with NEXT, not a multiple of 16
///   bytes or not negotiated, more buffers than the list holds. The head is
///   valid and now in flight: the device returns it with
///   [`push`](SplitQueue::push)`(head, 0)` and carries on with the next one,
///   so the queue never stalls.
/// - **A broken queue** ([`PopError::Queue`]): the available index jumped
///   more than the queue size ahead, a head index past the table, a head made
///   available again while still in flight, ring memory that vanished. No
///   answer in the used ring could make sense to the driver: the queue stops
///   (every later call returns [`QueueError::Broken`]) and the device should
///   report DEVICE_NEEDS_RESET. The chains popped before the break are the
///   exception: [`push`](SplitQueue::push) still takes them back, so the
///   device publishes the completions of the requests it executed before
///   flagging the reset.
///
/// # Memory ordering
///
/// The driver and the device share three handshakes; each device-side
/// ordering below is the one the spec's driver-side barrier (virtio 1.2,
/// 2.7.7 and 2.7.13) needs on this side, and nothing more:
///
/// 1. **Buffers offered.** The driver writes descriptors and the ring entry,
///    issues a write barrier, then stores `avail.idx`. The device loads
///    `avail.idx` with Acquire, so everything the index announces is visible
///    to the reads that follow.
/// 2. **Buffers used.** The device writes data and used elements, then
///    stores `used.idx` with Release, pairing with the driver's read barrier
///    after it loads `used.idx`.
/// 3. **Sleeping without losing a wake-up**, in both directions. Each side
///    stores its own index or flag, then loads the other side's: the device
///    stores `avail_event` (or clears NO_NOTIFY) and re-loads `avail.idx`;
///    the driver stores `avail.idx` and loads `avail_event`. Likewise the
///    device stores `used.idx` and loads `used_event` (or NO_INTERRUPT)
///    while the driver stores `used_event` and re-loads `used.idx`. A
///    store followed by a load of another location needs a full (SeqCst)
///    fence on each side, or both could read the other's old value and both
///    wait. The device issues that fence once per notification decision —
///    in [`enable_notification`](SplitQueue::enable_notification) — and
///    [`needs_interrupt`](SplitQueue::needs_interrupt) re-uses it when no
///    `used.idx` store came after it, so a serve that publishes, re-arms
///    notifications and decides on the interrupt pays for one fence.
///
/// A pop never fences: finding the ring empty decides nothing until the
/// device re-arms notifications and looks again, which is where the fence
/// is. A device must therefore never go to sleep on an empty
/// [`pop`](SplitQueue::pop) alone (see the example).
///
/// # Example
/// ```
/// use vmio::GuestRam;
/// use vmio::virtio::{PopError, QueueConfig, SplitQueue};
///
/// let ram = GuestRam::new(0, 0x10000)?;
/// let cfg = QueueConfig { size: 16, desc_table: 0x1000, avail_ring: 0x2000, used_ring: 0x3000 };
/// let mut q = SplitQueue::new(cfg, 0, &ram)?;
/// let mut chain = vmio::virtio::Chain::new();
/// q.disable_notification(&ram)?;
/// loop {
///     match q.pop_into(&ram, &mut chain) {
///         Ok(true) => {
///             let written = 0; // ... serve the request ...
///             q.add_used(&ram, chain.head(), written)?;
///         }
///         // Empty: publish, re-arm notifications and look once more.
///         Ok(false) => {
///             q.publish_used(&ram)?;
///             if !q.enable_notification(&ram)? {
///                 break;
///             }
///             q.disable_notification(&ram)?;
///         }
///         Err(PopError::Chain { head, .. }) => q.add_used(&ram, head, 0)?,
///         Err(PopError::Queue(_)) => break, // report DEVICE_NEEDS_RESET
///     }
/// }
/// if q.needs_interrupt(&ram)? {
///     // raise a used-buffer interrupt
/// }
/// # Ok::<(), Box<dyn core::error::Error>>(())
/// ```
///
/// A SeqCst fence, counted per thread in unit tests so that a test can tell
/// a lost fence (a possible lost wake-up) or an added one (a slower path).
#[inline(always)]
fn full_fence() {
    #[cfg(all(test, feature = "std"))]
    FULL_FENCES.with(|n| n.set(n.get() + 1));
    fence(Ordering::SeqCst);
}

#[cfg(all(test, feature = "std"))]
std::thread_local! {
    /// Full fences this thread issued through [`full_fence`].
    pub(crate) static FULL_FENCES: core::cell::Cell<u32> = const { core::cell::Cell::new(0) };
}

/// Full fences the calling thread issued in the queue code so far (unit
/// tests only).
#[cfg(all(test, feature = "std"))]
pub(crate) fn full_fences() -> u32 {
    FULL_FENCES.with(core::cell::Cell::get)
}

/// Device side of one split virtqueue.
///
/// Owns the device's ring positions and the set of heads in flight; guest
/// memory is passed to each call, so one `SplitQueue` can sit behind its own
/// lock with nothing else shared. Allocates only in [`new`](Self::new).
#[derive(Debug, Clone)]
pub struct SplitQueue {
    size: u16,
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
    event_idx: bool,
    indirect: bool,
    /// Next available ring entry to read (free-running).
    next_avail: u16,
    /// `avail.idx` as last read; entries before it are known to be there.
    avail_idx: u16,
    /// Next used ring entry to write (free-running); also `used.idx`.
    next_used: u16,
    /// `next_used` when `needs_interrupt` last decided.
    signalled_used: u16,
    /// A `used.idx` store happened after the last full fence: the next
    /// interrupt decision must fence before it reads `used_event`.
    used_unfenced: bool,
    /// One bit per descriptor index: heads handed out and not yet pushed.
    in_flight: Vec<u64>,
    in_flight_count: u16,
    broken: bool,
}

impl SplitQueue {
    /// A queue over the areas in `config`, using the ring features in the
    /// negotiated `features` (VIRTIO_F_RING_EVENT_IDX,
    /// VIRTIO_F_INDIRECT_DESC). Positions start at 0, as after a reset.
    ///
    /// # Errors
    /// [`QueueError::InvalidSize`], [`QueueError::Misaligned`] or
    /// [`QueueError::AreaOutOfMemory`]: see [`QueueConfig::validate`].
    pub fn new<M: GuestMemory + ?Sized>(
        config: QueueConfig,
        features: u64,
        mem: &M,
    ) -> Result<Self, QueueError> {
        config.validate(mem)?;
        Ok(SplitQueue {
            size: config.size,
            desc_table: config.desc_table,
            avail_ring: config.avail_ring,
            used_ring: config.used_ring,
            event_idx: features & VIRTIO_F_RING_EVENT_IDX != 0,
            indirect: features & VIRTIO_F_INDIRECT_DESC != 0,
            next_avail: 0,
            avail_idx: 0,
            next_used: 0,
            signalled_used: 0,
            used_unfenced: false,
            in_flight: vec![0; usize::from(config.size).div_ceil(64)],
            in_flight_count: 0,
            broken: false,
        })
    }

    /// Number of entries.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Next available ring position the device will read.
    pub fn next_avail(&self) -> u16 {
        self.next_avail
    }

    /// Next used ring position the device will write (its `used.idx`).
    pub fn next_used(&self) -> u16 {
        self.next_used
    }

    /// Heads popped and not yet pushed.
    pub fn in_flight(&self) -> u16 {
        self.in_flight_count
    }

    /// Whether EVENT_IDX is in use.
    pub fn event_idx(&self) -> bool {
        self.event_idx
    }

    /// Whether the queue stopped after a [`QueueError`].
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    fn fail(&mut self, e: QueueError) -> QueueError {
        self.broken = true;
        e
    }

    #[inline]
    fn avail_entry(&self, pos: u16) -> u64 {
        self.avail_ring + 4 + 2 * u64::from(pos & (self.size - 1))
    }

    #[inline]
    fn used_event_addr(&self) -> u64 {
        self.avail_ring + 4 + 2 * u64::from(self.size)
    }

    #[inline]
    fn avail_event_addr(&self) -> u64 {
        self.used_ring + 4 + 8 * u64::from(self.size)
    }

    /// Reads `avail.idx` and checks it against our position.
    fn refresh_avail(&mut self, mem: &(impl GuestMemory + ?Sized)) -> Result<u16, QueueError> {
        // Acquire pairs with the driver's barrier before it bumps `avail.idx`:
        // ring entries and descriptors it wrote are visible to our reads.
        let idx = mem
            .load_u16(self.avail_ring + 2, Ordering::Acquire)
            .map_err(|e| self.fail(QueueError::Memory(e)))?;
        if idx.wrapping_sub(self.next_avail) > self.size {
            return Err(self
                .fail(QueueError::AvailIndexJump { next_avail: self.next_avail, avail_idx: idx }));
        }
        self.avail_idx = idx;
        Ok(idx.wrapping_sub(self.next_avail))
    }

    /// How many chains the driver has made available that are not popped.
    ///
    /// # Errors
    /// [`QueueError`] when the queue is broken or the driver's index jumped.
    pub fn pending<M: GuestMemory + ?Sized>(&mut self, mem: &M) -> Result<u16, QueueError> {
        if self.broken {
            return Err(QueueError::Broken);
        }
        self.refresh_avail(mem)
    }

    /// Pops the next available chain into a [`Chain`] (capacity
    /// [`DEFAULT_SEGMENTS`]); `Ok(None)` when the ring is empty.
    ///
    /// # Errors
    /// [`PopError::Chain`] for a malformed chain (return it with
    /// `push(head, 0)`), [`PopError::Queue`] when the queue cannot go on.
    #[inline]
    pub fn pop<M: GuestMemory + ?Sized>(&mut self, mem: &M) -> Result<Option<Chain>, PopError> {
        self.pop_sized(mem)
    }

    /// [`pop`](Self::pop) into a list of `N` segments.
    ///
    /// # Errors
    /// As for [`pop`](Self::pop).
    #[inline]
    pub fn pop_sized<const N: usize, M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
    ) -> Result<Option<DescriptorChain<N>>, PopError> {
        let mut chain = DescriptorChain::new();
        Ok(self.pop_into(mem, &mut chain)?.then_some(chain))
    }

    /// Pops the next available chain into `chain`, reusing its storage (the
    /// allocation-free, copy-free form for device loops); `Ok(false)` when
    /// the ring is empty. `chain` is overwritten in every case.
    ///
    /// # Errors
    /// As for [`pop`](Self::pop).
    pub fn pop_into<const N: usize, M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        chain: &mut DescriptorChain<N>,
    ) -> Result<bool, PopError> {
        chain.clear();
        if self.broken {
            return Err(QueueError::Broken.into());
        }
        // No fence before this look: an empty ring here decides nothing.
        // The device sleeps only after `enable_notification`, whose fence
        // orders its `avail_event` store before its own `avail.idx` load
        // (handshake 3 in the module docs).
        if self.next_avail == self.avail_idx && self.refresh_avail(mem)? == 0 {
            return Ok(false);
        }
        let slot = self.avail_entry(self.next_avail);
        let head = mem.read_u16(slot).map_err(|e| self.fail(QueueError::Memory(e)))?;
        if head >= self.size {
            return Err(self.fail(QueueError::HeadOutOfRange { head }).into());
        }
        let (word, bit) = (usize::from(head / 64), 1u64 << (head % 64));
        if self.in_flight[word] & bit != 0 {
            return Err(self.fail(QueueError::HeadInFlight { head }).into());
        }
        self.in_flight[word] |= bit;
        self.in_flight_count += 1;
        self.next_avail = self.next_avail.wrapping_add(1);
        if self.event_idx {
            // Ask to be notified once the driver goes past what we took.
            // Relaxed: only a hint while we are still popping; the
            // `enable_notification` that precedes any sleep stores it again
            // and fences.
            mem.store_u16(self.avail_event_addr(), self.next_avail, Ordering::Relaxed)
                .map_err(|e| self.fail(QueueError::Memory(e)))?;
        }
        chain.head = head;
        match self.read_chain(mem, chain) {
            Ok(()) => Ok(true),
            Err(error) => {
                chain.clear();
                chain.head = head;
                Err(PopError::Chain { head, error })
            }
        }
    }

    /// Pops up to `out`'s spare capacity of chains, reading `avail.idx` once.
    /// Stops at the first error, keeping the chains popped before it in
    /// `out`; returns how many were added.
    ///
    /// # Errors
    /// As for [`pop`](Self::pop).
    pub fn pop_batch<const N: usize, const B: usize, M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        out: &mut ArrayVec<DescriptorChain<N>, B>,
    ) -> Result<usize, PopError> {
        let mut added = 0;
        while !out.is_full() {
            match self.pop_sized(mem)? {
                Some(c) => {
                    out.push(c);
                    added += 1;
                }
                None => break,
            }
        }
        Ok(added)
    }

    /// Writes the used element for the chain at `head` (`len` bytes written
    /// into its writable buffers) without publishing it: the driver sees it
    /// at the next [`publish_used`](Self::publish_used). Works on a broken
    /// queue too, for chains popped before it broke.
    ///
    /// # Errors
    /// [`QueueError::NotInFlight`] when `head` was not popped (nothing
    /// changes), or a memory error.
    #[inline]
    pub fn add_used<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        head: u16,
        len: u32,
    ) -> Result<(), QueueError> {
        let (word, bit) = (usize::from(head / 64), 1u64 << (head % 64));
        if head >= self.size || self.in_flight[word] & bit == 0 {
            return Err(QueueError::NotInFlight { head });
        }
        let slot = self.used_ring + 4 + 8 * u64::from(self.next_used & (self.size - 1));
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        mem.write(slot, &elem).map_err(|e| self.fail(QueueError::Memory(e)))?;
        self.in_flight[word] &= !bit;
        self.in_flight_count -= 1;
        self.next_used = self.next_used.wrapping_add(1);
        Ok(())
    }

    /// Publishes every used element added since the last publish with one
    /// `used.idx` store.
    ///
    /// # Errors
    /// A memory error.
    #[inline]
    pub fn publish_used<M: GuestMemory + ?Sized>(&mut self, mem: &M) -> Result<(), QueueError> {
        // Release (handshake 2): the data written into the buffers and the
        // used elements are visible before the index that hands them over;
        // pairs with the driver's read barrier after it loads `used.idx`.
        mem.store_u16(self.used_ring + 2, self.next_used, Ordering::Release)
            .map_err(|e| self.fail(QueueError::Memory(e)))?;
        self.used_unfenced = true;
        Ok(())
    }

    /// Returns the chain at `head` to the driver, `len` bytes written into
    /// its writable buffers, and publishes `used.idx`. Works on a broken
    /// queue too, for chains popped before it broke.
    ///
    /// # Errors
    /// [`QueueError::NotInFlight`] when `head` was not popped (nothing
    /// changes), or a memory error.
    pub fn push<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        head: u16,
        len: u32,
    ) -> Result<(), QueueError> {
        self.add_used(mem, head, len)?;
        self.publish_used(mem)
    }

    /// Returns many `(head, len)` chains and publishes `used.idx` once.
    /// On an error the elements before it are still published.
    ///
    /// # Errors
    /// As for [`push`](Self::push).
    pub fn push_batch<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        used: &[(u16, u32)],
    ) -> Result<(), QueueError> {
        let mut result = Ok(());
        for &(head, len) in used {
            if let Err(e) = self.add_used(mem, head, len) {
                result = Err(e);
                break;
            }
        }
        self.publish_used(mem)?;
        result
    }

    /// Whether the driver wants an interrupt for what was pushed since the
    /// last call: with EVENT_IDX, whether `used.idx` crossed `used_event`;
    /// without, whether anything was pushed and NO_INTERRUPT is clear.
    ///
    /// # Errors
    /// [`QueueError::Broken`] or a memory error.
    pub fn needs_interrupt<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
    ) -> Result<bool, QueueError> {
        if self.broken {
            return Err(QueueError::Broken);
        }
        let (old, new) = (self.signalled_used, self.next_used);
        self.signalled_used = new;
        if old == new {
            return Ok(false);
        }
        if self.used_unfenced {
            // SeqCst (handshake 3): our `used.idx` store is visible before we
            // load the driver's `used_event` / NO_INTERRUPT, pairing with the
            // driver's full barrier between storing `used_event` and
            // re-loading `used.idx`. Skipped when `enable_notification`
            // fenced after the last `used.idx` store: that fence already
            // orders it before this load.
            full_fence();
            self.used_unfenced = false;
        }
        if self.event_idx {
            let event = mem
                .load_u16(self.used_event_addr(), Ordering::Relaxed)
                .map_err(|e| self.fail(QueueError::Memory(e)))?;
            Ok(new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old))
        } else {
            let flags = mem
                .load_u16(self.avail_ring, Ordering::Relaxed)
                .map_err(|e| self.fail(QueueError::Memory(e)))?;
            Ok(flags & VIRTQ_AVAIL_F_NO_INTERRUPT == 0)
        }
    }

    /// Asks the driver to notify when it makes buffers available (publishes
    /// `avail_event`, or clears NO_NOTIFY), then reports whether buffers
    /// arrived meanwhile: if `true`, pop again before going to sleep.
    ///
    /// # Errors
    /// [`QueueError`] when the queue is broken, memory vanished or the
    /// driver's index jumped.
    pub fn enable_notification<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
    ) -> Result<bool, QueueError> {
        if self.broken {
            return Err(QueueError::Broken);
        }
        // Relaxed: the fence below orders the store before the `avail.idx`
        // load.
        let r = if self.event_idx {
            mem.store_u16(self.avail_event_addr(), self.next_avail, Ordering::Relaxed)
        } else {
            mem.store_u16(self.used_ring, 0, Ordering::Relaxed)
        };
        r.map_err(|e| self.fail(QueueError::Memory(e)))?;
        // SeqCst (handshake 3): our `avail_event` / flags store is visible
        // before we re-load `avail.idx`, pairing with the driver's full
        // barrier between storing `avail.idx` and loading `avail_event` /
        // NO_NOTIFY. It also orders every `used.idx` store before it ahead
        // of a later `used_event` load, which `needs_interrupt` relies on.
        full_fence();
        self.used_unfenced = false;
        Ok(self.refresh_avail(mem)? != 0)
    }

    /// Tells the driver it need not notify (sets NO_NOTIFY; with EVENT_IDX
    /// a no-op, `avail_event` simply stops moving). A hint only: spurious
    /// notifications stay harmless.
    ///
    /// # Errors
    /// [`QueueError::Broken`] or a memory error.
    pub fn disable_notification<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
    ) -> Result<(), QueueError> {
        if self.broken {
            return Err(QueueError::Broken);
        }
        if !self.event_idx {
            // Relaxed: a hint, see above.
            mem.store_u16(self.used_ring, VIRTQ_USED_F_NO_NOTIFY, Ordering::Relaxed)
                .map_err(|e| self.fail(QueueError::Memory(e)))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::GuestRam;
    use crate::testing::{Buf, GuestQueue};
    use crate::virtio::spec::ring::{VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT};

    const ALL: u64 = VIRTIO_F_INDIRECT_DESC | VIRTIO_F_RING_EVENT_IDX;

    fn setup(size: u16, features: u64) -> (GuestRam, GuestQueue, SplitQueue) {
        let ram = GuestRam::new(0, 0x40000).unwrap();
        let mut gq = GuestQueue::new(size, 0x1000);
        gq.init(&ram).unwrap();
        let q = SplitQueue::new(gq.config(), features, &ram).unwrap();
        (ram, gq, q)
    }

    #[test]
    fn direct_chain_round_trip() {
        let (ram, mut gq, mut q) = setup(8, 0);
        ram.write(0x10000, b"hello").unwrap();
        let head = gq
            .add(
                &ram,
                &[Buf::readable(0x10000, 5), Buf::writable(0x11000, 16), Buf::writable(0x12000, 4)],
            )
            .unwrap();
        let c = q.pop(&ram).unwrap().unwrap();
        assert_eq!(c.head(), head);
        assert_eq!(c.readable(), &[Segment { addr: 0x10000, len: 5 }]);
        assert_eq!(c.writable().len(), 2);
        assert_eq!((c.readable_len(), c.writable_len()), (5, 20));
        let mut buf = [0u8; 8];
        assert_eq!(c.read_at(&ram, 1, &mut buf).unwrap(), 4);
        assert_eq!(&buf[..4], b"ello");
        // Spans the two writable buffers.
        assert_eq!(c.write_at(&ram, 14, b"abcd").unwrap(), 4);
        assert_eq!(ram.read_u16(0x1100e).unwrap(), u16::from_le_bytes(*b"ab"));
        assert_eq!(ram.read_u16(0x12000).unwrap(), u16::from_le_bytes(*b"cd"));
        assert!(q.pop(&ram).unwrap().is_none());
        assert_eq!(q.in_flight(), 1);
        q.push(&ram, head, 18).unwrap();
        assert_eq!(gq.pop_used(&ram).unwrap(), Some((u32::from(head), 18)));
        assert_eq!(q.in_flight(), 0);
        assert_eq!(q.push(&ram, head, 0), Err(QueueError::NotInFlight { head }));
    }

    #[test]
    fn indirect_chain_and_mixed_prefix() {
        let (ram, mut gq, mut q) = setup(4, ALL);
        let head = gq
            .add_indirect(&ram, 0x20000, &[Buf::readable(0x10000, 16), Buf::writable(0x11000, 1)])
            .unwrap();
        let c = q.pop(&ram).unwrap().unwrap();
        assert_eq!(c.head(), head);
        assert_eq!(c.segments().len(), 2);
        assert_eq!(c.writable(), &[Segment { addr: 0x11000, len: 1 }]);
        // Direct descriptors followed by an indirect one are allowed.
        gq.write_desc(&ram, 2, 0x10000, 8, VIRTQ_DESC_F_NEXT, 3).unwrap();
        gq.write_desc(&ram, 3, 0x20000, 32, VIRTQ_DESC_F_INDIRECT, 0).unwrap();
        gq.put_avail(&ram, 2).unwrap();
        gq.publish(&ram).unwrap();
        let c = q.pop(&ram).unwrap().unwrap();
        assert_eq!(c.segments().len(), 3);
        assert_eq!(c.readable_len(), 24);
    }

    #[test]
    fn indirect_refused_without_feature() {
        let (ram, mut gq, mut q) = setup(4, 0);
        let head = gq.add_indirect(&ram, 0x20000, &[Buf::readable(0x10000, 16)]).unwrap();
        assert_eq!(
            q.pop(&ram),
            Err(PopError::Chain { head, error: ChainError::IndirectNotNegotiated })
        );
        q.push(&ram, head, 0).unwrap();
        assert_eq!(gq.pop_used(&ram).unwrap(), Some((u32::from(head), 0)));
    }

    #[test]
    fn event_idx_interrupt_suppression() {
        let (ram, mut gq, mut q) = setup(8, ALL);
        // The driver wants an interrupt only after the 3rd used buffer.
        gq.set_used_event(&ram, 2).unwrap();
        let mut raised = [false; 4];
        for r in &mut raised {
            let h = gq.add(&ram, &[Buf::writable(0x10000, 4)]).unwrap();
            let c = q.pop(&ram).unwrap().unwrap();
            assert_eq!(c.head(), h);
            q.push(&ram, h, 4).unwrap();
            *r = q.needs_interrupt(&ram).unwrap();
            gq.pop_used(&ram).unwrap().unwrap();
        }
        assert_eq!(raised, [false, false, true, false]);
        // Nothing pushed since: never an interrupt.
        assert!(!q.needs_interrupt(&ram).unwrap());
    }

    #[test]
    fn event_idx_notification_suppression() {
        let (ram, mut gq, mut q) = setup(8, ALL);
        let old = gq.avail_idx();
        gq.add(&ram, &[Buf::readable(0x10000, 4)]).unwrap();
        assert!(gq.needs_notify(&ram, true, old).unwrap(), "avail_event starts at 0");
        let c = q.pop(&ram).unwrap().unwrap();
        q.push(&ram, c.head(), 0).unwrap();
        // The device published avail_event = 1: the next add needs a kick.
        let old = gq.avail_idx();
        gq.add(&ram, &[Buf::readable(0x10000, 4)]).unwrap();
        assert!(gq.needs_notify(&ram, true, old).unwrap());
        // A second add before the device caught up does not.
        let old = gq.avail_idx();
        gq.add(&ram, &[Buf::readable(0x10000, 4)]).unwrap();
        assert!(!gq.needs_notify(&ram, true, old).unwrap());
        assert!(q.enable_notification(&ram).unwrap(), "two chains are waiting");
    }

    /// One full fence per notification decision, none per pop: the
    /// drain-publish-rearm-decide sequence a device runs fences once, and an
    /// interrupt decision without a re-arm after the publish fences itself.
    #[cfg(feature = "std")]
    #[test]
    fn fences_are_exactly_the_handshake_ones() {
        for features in [0, ALL] {
            let (ram, mut gq, mut q) = setup(8, features);
            for _ in 0..3 {
                gq.add(&ram, &[Buf::writable(0x10000, 4)]).unwrap();
            }
            let before = full_fences();
            q.disable_notification(&ram).unwrap();
            let mut chain = Chain::new();
            let mut used = ArrayVec::<(u16, u32), 4>::new();
            while q.pop_into(&ram, &mut chain).unwrap() {
                used.push((chain.head(), 4));
            }
            assert_eq!(full_fences() - before, 0, "popping fences nothing");
            q.push_batch(&ram, &used).unwrap();
            assert!(!q.enable_notification(&ram).unwrap());
            q.needs_interrupt(&ram).unwrap();
            assert_eq!(full_fences() - before, 1, "features {features:#x}");
            // Published after the re-arm: the decision fences on its own.
            gq.add(&ram, &[Buf::writable(0x10000, 4)]).unwrap();
            let c = q.pop(&ram).unwrap().unwrap();
            q.push(&ram, c.head(), 4).unwrap();
            q.needs_interrupt(&ram).unwrap();
            assert_eq!(full_fences() - before, 2, "features {features:#x}");
        }
    }

    #[test]
    fn no_interrupt_flag_without_event_idx() {
        let (ram, mut gq, mut q) = setup(8, 0);
        gq.set_no_interrupt(&ram, true).unwrap();
        let h = gq.add(&ram, &[Buf::writable(0x10000, 4)]).unwrap();
        q.pop(&ram).unwrap().unwrap();
        q.push(&ram, h, 4).unwrap();
        assert!(!q.needs_interrupt(&ram).unwrap());
        gq.set_no_interrupt(&ram, false).unwrap();
        let h = gq.add(&ram, &[Buf::writable(0x10000, 4)]).unwrap();
        q.pop(&ram).unwrap().unwrap();
        q.push(&ram, h, 4).unwrap();
        assert!(q.needs_interrupt(&ram).unwrap());
        q.disable_notification(&ram).unwrap();
        assert!(!gq.needs_notify(&ram, false, 0).unwrap());
        assert!(!q.enable_notification(&ram).unwrap());
        assert!(gq.needs_notify(&ram, false, 0).unwrap());
    }

    #[test]
    fn batch_pop_and_push_wrap_around() {
        let (ram, mut gq, mut q) = setup(4, ALL);
        for round in 0..40u32 {
            for _ in 0..3 {
                gq.add_unpublished(&ram, &[Buf::writable(0x10000, 8)]).unwrap();
            }
            gq.publish(&ram).unwrap();
            let mut out: ArrayVec<Chain, 8> = ArrayVec::new();
            assert_eq!(q.pop_batch(&ram, &mut out).unwrap(), 3);
            let used: ArrayVec<(u16, u32), 8> = out.iter().map(|c| (c.head(), round)).collect();
            q.push_batch(&ram, &used).unwrap();
            for _ in 0..3 {
                assert_eq!(gq.pop_used(&ram).unwrap().unwrap().1, round);
            }
        }
        assert_eq!(q.next_used(), 120);
    }

    #[test]
    fn config_validation() {
        let ram = GuestRam::new(0, 0x10000).unwrap();
        let ok =
            QueueConfig { size: 16, desc_table: 0x1000, avail_ring: 0x2000, used_ring: 0x3000 };
        assert!(SplitQueue::new(ok, 0, &ram).is_ok());
        for size in [0, 3, 12, 32767, 65535] {
            let c = QueueConfig { size, ..ok };
            assert_eq!(c.validate(&ram), Err(QueueError::InvalidSize(size)));
        }
        let c = QueueConfig { desc_table: 0x1008, ..ok };
        assert!(matches!(
            c.validate(&ram),
            Err(QueueError::Misaligned { area: QueueArea::Descriptors, .. })
        ));
        let c = QueueConfig { avail_ring: 0x2001, ..ok };
        assert!(matches!(
            c.validate(&ram),
            Err(QueueError::Misaligned { area: QueueArea::Available, .. })
        ));
        let c = QueueConfig { used_ring: 0x3002, ..ok };
        assert!(matches!(
            c.validate(&ram),
            Err(QueueError::Misaligned { area: QueueArea::Used, .. })
        ));
        // The used ring's last byte (avail_event) one past the end of RAM.
        let c = QueueConfig { used_ring: 0x10000 - 132, ..ok };
        assert!(matches!(
            c.validate(&ram),
            Err(QueueError::AreaOutOfMemory { area: QueueArea::Used, .. })
        ));
        let c = QueueConfig { desc_table: u64::MAX - 15, ..ok };
        assert!(matches!(c.validate(&ram), Err(QueueError::AreaOutOfMemory { .. })));
    }
}
