//! The split virtqueue, device side: descriptor table, available ring and
//! used ring in guest memory.
//!
//! A [`SplitQueue`] is built from the addresses and size the driver
//! programmed, after checking them ([`SplitQueue::new`]). The device then
//! [`pop`](SplitQueue::pop)s descriptor chains — validated in full and copied
//! into a fixed-capacity scatter-gather list ([`DescriptorChain`]), so no
//! request allocates — and [`push`](SplitQueue::push)es them back used.
//! Hot device loops use [`pop_into`](SplitQueue::pop_into), which refills
//! one chain in place instead of moving a fresh one out each time.
//! [`needs_interrupt`](SplitQueue::needs_interrupt) and
//! [`enable_notification`](SplitQueue::enable_notification) implement
//! VIRTIO_F_EVENT_IDX in both directions.
//!
//! # What the guest can get wrong, and what happens
//!
//! Two kinds of failure, told apart by [`PopError`]:
//! - **A bad chain** ([`PopError::Chain`]): a descriptor pointing outside
//!   guest RAM, a `next` past the table, a loop, a zero-length buffer, a
//!   total length above 4 GiB, a readable buffer after a writable one, an
//!   indirect table that is nested, combined with NEXT, not a multiple of 16
//!   bytes or not negotiated, more buffers than the list holds. The head is
//!   valid and now in flight: the device returns it with
//!   [`push`](SplitQueue::push)`(head, 0)` and carries on with the next one,
//!   so the queue never stalls.
//! - **A broken queue** ([`PopError::Queue`]): the available index jumped
//!   more than the queue size ahead, a head index past the table, a head made
//!   available again while still in flight, ring memory that vanished. No
//!   answer in the used ring could make sense to the driver: the queue stops
//!   (every later call returns [`QueueError::Broken`]) and the device should
//!   report DEVICE_NEEDS_RESET. The chains popped before the break are the
//!   exception: [`push`](SplitQueue::push) still takes them back, so the
//!   device publishes the completions of the requests it executed before
//!   flagging the reset.
//!
//! # Memory ordering
//!
//! `avail.idx` is loaded with Acquire (pairs with the driver's write barrier
//! before it publishes new entries) and `used.idx` stored with Release (the
//! used elements and data written before are visible first). Before reading
//! `used_event`/`avail.flags` to decide on an interrupt, and before
//! re-reading `avail.idx` after publishing `avail_event`, a SeqCst fence
//! orders the store before the load, pairing with the driver's full barrier
//! on the other side; without it both sides could miss each other's update
//! and sleep forever.
//!
//! # Example
//! ```
//! use vmio::virtio::{GuestRam, PopError, QueueConfig, SplitQueue};
//!
//! let ram = GuestRam::new(0, 0x10000)?;
//! let cfg = QueueConfig { size: 16, desc_table: 0x1000, avail_ring: 0x2000, used_ring: 0x3000 };
//! let mut q = SplitQueue::new(cfg, 0, &ram)?;
//! loop {
//!     match q.pop(&ram) {
//!         Ok(Some(chain)) => {
//!             let written = 0; // ... serve the request ...
//!             q.push(&ram, chain.head(), written)?;
//!         }
//!         Ok(None) => break,
//!         Err(PopError::Chain { head, .. }) => q.push(&ram, head, 0)?,
//!         Err(PopError::Queue(_)) => break, // report DEVICE_NEEDS_RESET
//!     }
//! }
//! if q.needs_interrupt(&ram)? {
//!     // raise a used-buffer interrupt
//! }
//! # Ok::<(), Box<dyn core::error::Error>>(())
//! ```

use alloc::vec;
use alloc::vec::Vec;
use arrayvec::ArrayVec;
use core::fmt;
use core::sync::atomic::{Ordering, fence};

use super::features::{VIRTIO_F_INDIRECT_DESC, VIRTIO_F_RING_EVENT_IDX};
use super::memory::{GuestMemory, MemoryError};

/// Largest split queue the spec allows.
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Scatter-gather capacity of [`Chain`], the list [`SplitQueue::pop`] fills.
/// Devices should advertise a segment limit (virtio-blk's `seg_max`) that
/// keeps well-behaved drivers under it; use
/// [`SplitQueue::pop_sized`] for another capacity.
pub const DEFAULT_SEGMENTS: usize = 64;

/// Descriptor flag: the buffer continues in the descriptor named by `next`.
pub const VIRTQ_DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the buffer is device-writable (otherwise device-readable).
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
/// Descriptor flag: the buffer holds a table of indirect descriptors.
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;
/// Available ring flag: the driver asks for no used-buffer interrupts.
pub const VIRTQ_AVAIL_F_NO_INTERRUPT: u16 = 1;
/// Used ring flag: the device asks for no available-buffer notifications.
pub const VIRTQ_USED_F_NO_NOTIFY: u16 = 1;

/// Size of one descriptor in bytes.
pub const DESC_SIZE: u64 = 16;

/// The three areas of a split queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QueueArea {
    /// The descriptor table (16-byte aligned, 16 × size bytes).
    Descriptors,
    /// The available (driver) ring (2-byte aligned, 6 + 2 × size bytes).
    Available,
    /// The used (device) ring (4-byte aligned, 6 + 8 × size bytes).
    Used,
}

impl QueueArea {
    /// Required alignment in bytes.
    pub const fn align(self) -> u64 {
        match self {
            QueueArea::Descriptors => 16,
            QueueArea::Available => 2,
            QueueArea::Used => 4,
        }
    }

    /// Size in bytes for a queue of `size` entries (with the event field).
    pub const fn len(self, size: u16) -> u64 {
        let n = size as u64;
        match self {
            QueueArea::Descriptors => DESC_SIZE * n,
            QueueArea::Available => 6 + 2 * n,
            QueueArea::Used => 6 + 8 * n,
        }
    }
}

/// What the driver programmed for one queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueConfig {
    /// Number of entries (QueueNum).
    pub size: u16,
    /// Guest address of the descriptor table (QueueDesc).
    pub desc_table: u64,
    /// Guest address of the available ring (QueueDriver).
    pub avail_ring: u64,
    /// Guest address of the used ring (QueueDevice).
    pub used_ring: u64,
}

impl QueueConfig {
    /// Checks size, alignment and that each area lies in guest memory.
    ///
    /// # Errors
    /// The first problem found, as a [`QueueError`].
    pub fn validate<M: GuestMemory + ?Sized>(&self, mem: &M) -> Result<(), QueueError> {
        let size = self.size;
        if size == 0 || size > MAX_QUEUE_SIZE || !size.is_power_of_two() {
            return Err(QueueError::InvalidSize(size));
        }
        for (area, addr) in [
            (QueueArea::Descriptors, self.desc_table),
            (QueueArea::Available, self.avail_ring),
            (QueueArea::Used, self.used_ring),
        ] {
            if addr % area.align() != 0 {
                return Err(QueueError::Misaligned { area, addr });
            }
            mem.check(addr, area.len(size))
                .map_err(|error| QueueError::AreaOutOfMemory { area, error })?;
        }
        Ok(())
    }
}

/// Why a queue cannot go on; the device should report DEVICE_NEEDS_RESET.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueError {
    /// Queue size 0, above 32768 or not a power of two.
    InvalidSize(u16),
    /// A ring area is not aligned as the spec requires.
    Misaligned {
        /// Which area.
        area: QueueArea,
        /// Its guest address.
        addr: u64,
    },
    /// A ring area is not (entirely) guest RAM.
    AreaOutOfMemory {
        /// Which area.
        area: QueueArea,
        /// What the memory said.
        error: MemoryError,
    },
    /// The driver moved `avail.idx` more than the queue size past the
    /// device's position.
    AvailIndexJump {
        /// Next entry the device would have read.
        next_avail: u16,
        /// The index the driver published.
        avail_idx: u16,
    },
    /// An available ring entry names a descriptor past the table.
    HeadOutOfRange {
        /// The head index found in the ring.
        head: u16,
    },
    /// An available ring entry names a head the device has not returned yet.
    HeadInFlight {
        /// The head index found in the ring.
        head: u16,
    },
    /// The ring memory itself became inaccessible.
    Memory(MemoryError),
    /// The device pushed a head that is not in flight (a device bug, not the
    /// guest's doing; the queue stays usable).
    NotInFlight {
        /// The head that was pushed.
        head: u16,
    },
    /// The queue stopped after an earlier error; only a reset revives it.
    Broken,
}

impl fmt::Display for QueueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            QueueError::InvalidSize(s) => {
                write!(f, "queue size {s} is not a power of two in 1..=32768")
            }
            QueueError::Misaligned { area, addr } => {
                write!(f, "{area:?} area at {addr:#x} is not {}-byte aligned", area.align())
            }
            QueueError::AreaOutOfMemory { area, error } => write!(f, "{area:?} area: {error}"),
            QueueError::AvailIndexJump { next_avail, avail_idx } => write!(
                f,
                "available index {avail_idx} is more than the queue size ahead of {next_avail}"
            ),
            QueueError::HeadOutOfRange { head } => {
                write!(f, "available head {head} is past the descriptor table")
            }
            QueueError::HeadInFlight { head } => {
                write!(f, "head {head} made available again while in flight")
            }
            QueueError::Memory(e) => write!(f, "ring access failed: {e}"),
            QueueError::NotInFlight { head } => write!(f, "head {head} is not in flight"),
            QueueError::Broken => f.write_str("queue stopped after an earlier error"),
        }
    }
}
impl core::error::Error for QueueError {}

impl From<MemoryError> for QueueError {
    fn from(e: MemoryError) -> Self {
        QueueError::Memory(e)
    }
}

/// Why one descriptor chain was rejected; the queue itself goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainError {
    /// A `next` index is past the (direct or indirect) table.
    NextOutOfRange {
        /// The offending index.
        next: u16,
        /// Entries in the table it indexes.
        table_len: u32,
    },
    /// More descriptors than the table holds: a loop.
    TooLong,
    /// The buffers add up to more than `u32::MAX` bytes.
    LengthOverflow,
    /// A buffer of zero bytes.
    ZeroLength,
    /// A buffer that is not (entirely) guest RAM.
    BufferOutOfMemory(MemoryError),
    /// A device-readable buffer after a device-writable one.
    ReadableAfterWritable,
    /// An indirect descriptor, but VIRTIO_F_INDIRECT_DESC was not negotiated.
    IndirectNotNegotiated,
    /// INDIRECT and NEXT set on the same descriptor.
    IndirectWithNext,
    /// An indirect descriptor inside an indirect table.
    NestedIndirect,
    /// An indirect table whose length is 0, not a multiple of 16, or more
    /// than 32768 entries.
    IndirectTableLength(u32),
    /// More buffers than the scatter-gather list holds.
    TooManySegments {
        /// The list's capacity.
        capacity: usize,
    },
    /// The descriptor table could not be read.
    Memory(MemoryError),
}

impl fmt::Display for ChainError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ChainError::NextOutOfRange { next, table_len } => {
                write!(f, "next index {next} is past a table of {table_len} descriptors")
            }
            ChainError::TooLong => f.write_str("chain longer than its table (a loop)"),
            ChainError::LengthOverflow => f.write_str("chain length exceeds 4 GiB"),
            ChainError::ZeroLength => f.write_str("zero-length descriptor"),
            ChainError::BufferOutOfMemory(e) => write!(f, "buffer outside guest RAM: {e}"),
            ChainError::ReadableAfterWritable => {
                f.write_str("device-readable descriptor after a device-writable one")
            }
            ChainError::IndirectNotNegotiated => {
                f.write_str("indirect descriptor without VIRTIO_F_INDIRECT_DESC")
            }
            ChainError::IndirectWithNext => f.write_str("descriptor has both INDIRECT and NEXT"),
            ChainError::NestedIndirect => f.write_str("indirect descriptor in an indirect table"),
            ChainError::IndirectTableLength(len) => {
                write!(f, "indirect table of {len} bytes is empty, too big or not a multiple of 16")
            }
            ChainError::TooManySegments { capacity } => {
                write!(f, "chain has more than {capacity} buffers")
            }
            ChainError::Memory(e) => write!(f, "descriptor table unreadable: {e}"),
        }
    }
}
impl core::error::Error for ChainError {}

/// What [`SplitQueue::pop`] can fail with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PopError {
    /// The chain at `head` is malformed. It is in flight now: return it with
    /// `push(head, 0)` and pop the next one.
    Chain {
        /// The chain's head descriptor index.
        head: u16,
        /// What is wrong with it.
        error: ChainError,
    },
    /// The queue cannot go on; report DEVICE_NEEDS_RESET.
    Queue(QueueError),
}

impl fmt::Display for PopError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PopError::Chain { head, error } => write!(f, "chain at head {head}: {error}"),
            PopError::Queue(e) => e.fmt(f),
        }
    }
}
impl core::error::Error for PopError {}

impl From<QueueError> for PopError {
    fn from(e: QueueError) -> Self {
        PopError::Queue(e)
    }
}

/// One guest buffer of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Segment {
    /// Guest-physical address (checked: `[addr, addr + len)` was guest RAM
    /// when the chain was popped).
    pub addr: u64,
    /// Length in bytes, never 0.
    pub len: u32,
}

/// A validated descriptor chain: its head and its buffers, readable ones
/// first, in a fixed-capacity list of `N` segments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DescriptorChain<const N: usize = DEFAULT_SEGMENTS> {
    head: u16,
    segments: ArrayVec<Segment, N>,
    /// Index of the first writable segment (== len when none).
    first_writable: usize,
    readable_len: u32,
    writable_len: u32,
}

/// The chain type [`SplitQueue::pop`] returns.
pub type Chain = DescriptorChain<DEFAULT_SEGMENTS>;

impl<const N: usize> Default for DescriptorChain<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> DescriptorChain<N> {
    /// An empty chain, to be filled by [`SplitQueue::pop_into`].
    pub const fn new() -> Self {
        DescriptorChain {
            head: 0,
            segments: ArrayVec::new_const(),
            first_writable: 0,
            readable_len: 0,
            writable_len: 0,
        }
    }

    fn clear(&mut self) {
        self.segments.clear();
        self.first_writable = 0;
        self.readable_len = 0;
        self.writable_len = 0;
    }

    /// The head descriptor index: what goes back in the used ring.
    pub fn head(&self) -> u16 {
        self.head
    }

    /// Every buffer, readable ones first.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// The device-readable buffers (the request).
    pub fn readable(&self) -> &[Segment] {
        &self.segments[..self.first_writable]
    }

    /// The device-writable buffers (the response).
    pub fn writable(&self) -> &[Segment] {
        &self.segments[self.first_writable..]
    }

    /// Total bytes of the readable buffers.
    pub fn readable_len(&self) -> u32 {
        self.readable_len
    }

    /// Total bytes of the writable buffers.
    pub fn writable_len(&self) -> u32 {
        self.writable_len
    }

    /// Copies readable bytes starting `offset` bytes into the request into
    /// `buf`, as if the readable buffers were one; returns how many bytes
    /// were copied (less than `buf.len()` at the end of the request).
    ///
    /// # Errors
    /// A [`MemoryError`] if guest memory changed since the chain was popped.
    pub fn read_at<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize, MemoryError> {
        let mut done = 0;
        for_range(self.readable(), offset, buf.len(), |addr, at, n| {
            mem.read(addr, &mut buf[at..at + n])?;
            done = at + n;
            Ok(())
        })?;
        Ok(done)
    }

    /// Copies `data` into the writable buffers starting `offset` bytes into
    /// the response; returns how many bytes were copied.
    ///
    /// # Errors
    /// A [`MemoryError`] if guest memory changed since the chain was popped.
    pub fn write_at<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        offset: u64,
        data: &[u8],
    ) -> Result<usize, MemoryError> {
        let mut done = 0;
        for_range(self.writable(), offset, data.len(), |addr, at, n| {
            mem.write(addr, &data[at..at + n])?;
            done = at + n;
            Ok(())
        })?;
        Ok(done)
    }
}

/// Calls `f(guest_addr, offset_in_buf, n)` for each piece of the logical
/// byte range `[offset, offset + len)` over `segs`.
fn for_range(
    segs: &[Segment],
    offset: u64,
    len: usize,
    mut f: impl FnMut(u64, usize, usize) -> Result<(), MemoryError>,
) -> Result<(), MemoryError> {
    let mut skip = offset;
    let mut at = 0usize;
    for s in segs {
        if at == len {
            break;
        }
        let slen = u64::from(s.len);
        if skip >= slen {
            skip -= slen;
            continue;
        }
        // `slen - skip` <= u32::MAX, fits in usize on every supported target.
        let n = ((slen - skip) as usize).min(len - at);
        f(s.addr + skip, at, n)?;
        at += n;
        skip = 0;
    }
    Ok(())
}

/// One raw descriptor, copied out of guest memory before any check.
#[derive(Debug, Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

#[inline]
fn read_desc<M: GuestMemory + ?Sized>(
    mem: &M,
    table: u64,
    index: u16,
) -> Result<Desc, MemoryError> {
    let mut b = [0u8; 16];
    // The table was checked to hold `index` (`index < table_len`), and
    // `table + 16 * index` cannot overflow for a checked table.
    mem.read(table + DESC_SIZE * u64::from(index), &mut b)?;
    let [a0, a1, a2, a3, a4, a5, a6, a7, l0, l1, l2, l3, f0, f1, n0, n1] = b;
    Ok(Desc {
        addr: u64::from_le_bytes([a0, a1, a2, a3, a4, a5, a6, a7]),
        len: u32::from_le_bytes([l0, l1, l2, l3]),
        flags: u16::from_le_bytes([f0, f1]),
        next: u16::from_le_bytes([n0, n1]),
    })
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
        if self.next_avail == self.avail_idx {
            if self.event_idx {
                // SeqCst: our last `avail_event` store must be visible before
                // we read `avail.idx`, or a driver that checks `avail_event`
                // after publishing could skip the notification we then miss.
                fence(Ordering::SeqCst);
            }
            if self.refresh_avail(mem)? == 0 {
                return Ok(false);
            }
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
            // Relaxed: only a hint; the fence before the next `avail.idx`
            // read orders it where it matters.
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

    fn read_chain<const N: usize, M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        chain: &mut DescriptorChain<N>,
    ) -> Result<(), ChainError> {
        let mut table = self.desc_table;
        let mut table_len = u32::from(self.size);
        // Descriptors we may still visit in this table: more means a loop.
        let mut ttl = table_len;
        let mut index = chain.head;
        let mut in_indirect = false;
        let mut total: u64 = 0;
        let mut writable_seen = false;
        loop {
            if ttl == 0 {
                return Err(ChainError::TooLong);
            }
            ttl -= 1;
            let d = read_desc(mem, table, index).map_err(ChainError::Memory)?;
            if d.flags & VIRTQ_DESC_F_INDIRECT != 0 {
                if !self.indirect {
                    return Err(ChainError::IndirectNotNegotiated);
                }
                if in_indirect {
                    return Err(ChainError::NestedIndirect);
                }
                if d.flags & VIRTQ_DESC_F_NEXT != 0 {
                    return Err(ChainError::IndirectWithNext);
                }
                let entries = d.len / DESC_SIZE as u32;
                if d.len == 0
                    || u64::from(d.len) % DESC_SIZE != 0
                    || entries > u32::from(MAX_QUEUE_SIZE)
                {
                    return Err(ChainError::IndirectTableLength(d.len));
                }
                mem.check(d.addr, u64::from(d.len)).map_err(ChainError::BufferOutOfMemory)?;
                table = d.addr;
                table_len = entries;
                ttl = entries;
                index = 0;
                in_indirect = true;
                continue;
            }
            if d.len == 0 {
                return Err(ChainError::ZeroLength);
            }
            mem.check(d.addr, u64::from(d.len)).map_err(ChainError::BufferOutOfMemory)?;
            total += u64::from(d.len);
            if total > u64::from(u32::MAX) {
                return Err(ChainError::LengthOverflow);
            }
            let seg = Segment { addr: d.addr, len: d.len };
            if d.flags & VIRTQ_DESC_F_WRITE != 0 {
                if !writable_seen {
                    writable_seen = true;
                    chain.first_writable = chain.segments.len();
                }
                chain.writable_len += d.len;
            } else {
                if writable_seen {
                    return Err(ChainError::ReadableAfterWritable);
                }
                chain.readable_len += d.len;
            }
            chain
                .segments
                .try_push(seg)
                .map_err(|_| ChainError::TooManySegments { capacity: N })?;
            if d.flags & VIRTQ_DESC_F_NEXT == 0 {
                break;
            }
            if u32::from(d.next) >= table_len {
                return Err(ChainError::NextOutOfRange { next: d.next, table_len });
            }
            index = d.next;
        }
        if !writable_seen {
            chain.first_writable = chain.segments.len();
        }
        Ok(())
    }

    /// Writes one used element without publishing it.
    #[inline]
    fn put_used<M: GuestMemory + ?Sized>(
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

    fn publish_used<M: GuestMemory + ?Sized>(&mut self, mem: &M) -> Result<(), QueueError> {
        // Release: the used elements and the data written into the buffers
        // are visible to the driver before the index that hands them over.
        mem.store_u16(self.used_ring + 2, self.next_used, Ordering::Release)
            .map_err(|e| self.fail(QueueError::Memory(e)))
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
        self.put_used(mem, head, len)?;
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
            if let Err(e) = self.put_used(mem, head, len) {
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
        // SeqCst: the `used.idx` store must be visible before we read the
        // driver's `used_event`/`flags`, pairing with the driver's barrier
        // between writing those and re-reading `used.idx`.
        fence(Ordering::SeqCst);
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
        // Relaxed stores: the SeqCst fence below orders them before the
        // `avail.idx` read.
        let r = if self.event_idx {
            mem.store_u16(self.avail_event_addr(), self.next_avail, Ordering::Relaxed)
        } else {
            mem.store_u16(self.used_ring, 0, Ordering::Relaxed)
        };
        r.map_err(|e| self.fail(QueueError::Memory(e)))?;
        // SeqCst: see `pop_sized`.
        fence(Ordering::SeqCst);
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
    use crate::testing::{Buf, GuestQueue};
    use crate::virtio::GuestRam;
    use crate::virtio::features::{VIRTIO_F_INDIRECT_DESC, VIRTIO_F_RING_EVENT_IDX};

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
