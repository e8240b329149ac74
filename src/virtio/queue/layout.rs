//! Where a split queue lives in guest memory: the three areas the driver
//! programs, their alignment and size, and the raw descriptor format.

use super::error::QueueError;
use crate::memory::{GuestMemory, MemoryError};
use crate::virtio::spec::ring::{DESC_SIZE, MAX_QUEUE_SIZE};

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

/// One raw descriptor, copied out of guest memory before any check.
#[derive(Debug, Clone, Copy)]
pub(super) struct Desc {
    pub(super) addr: u64,
    pub(super) len: u32,
    pub(super) flags: u16,
    pub(super) next: u16,
}

#[inline]
pub(super) fn read_desc<M: GuestMemory + ?Sized>(
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
