//! What can go wrong with a split queue: a bad chain (the queue goes on) or a
//! broken queue (the device needs a reset).

use core::fmt;

use super::layout::QueueArea;
use crate::memory::MemoryError;

/// Why a queue cannot go on; the device should report DEVICE_NEEDS_RESET.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
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
#[non_exhaustive]
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
///
/// Unlike the error enums it wraps, this one is exhaustive on purpose: its
/// two variants are the two things a device can do about a failed pop
/// (return the chain, or stop the queue), and a device must handle both.
///
/// [`SplitQueue::pop`]: super::SplitQueue::pop
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
