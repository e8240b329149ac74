//! The compiled dispatch table: an immutable, sorted, non-overlapping array of
//! inclusive ranges, and the copy-edit-validate step that builds the next one.
//!
//! Starts live in their own dense array so a search touches as few cache
//! lines as possible; everything else about a slot is read only on a hit.

use alloc::boxed::Box;
use alloc::vec::Vec;

use super::error::BusError;
use crate::device::{Device, DeviceId};

/// Everything the hot path needs about one range once the search has hit it.
#[derive(Clone, Copy)]
pub(crate) struct Slot {
    /// Last address of the range (inclusive).
    pub(crate) last: u64,
    pub(crate) id: DeviceId,
    /// Borrowed from the bus's registry, which owns the `Arc`. The registry
    /// hands the `Arc` to the grace-period reclaimer of the last table that
    /// points here, so the pointer outlives every table that holds it.
    pub(crate) device: *const (dyn Device + 'static),
}

/// One published generation of the bus.
pub(crate) struct Table {
    /// `starts[i]` is the first address of `slots[i]`; strictly increasing.
    pub(crate) starts: Box<[u64]>,
    pub(crate) slots: Box<[Slot]>,
    /// Number of publishes before this table; 0 for the empty initial table.
    pub(crate) generation: u64,
}

// SAFETY: a `Table` is immutable once published; its raw device pointers
// point at `dyn Device` values, which are `Send + Sync`, and are kept alive
// by the bus's ownership protocol (see `Slot::device`).
unsafe impl Send for Table {}
// SAFETY: as above; shared access only reads.
unsafe impl Sync for Table {}

impl Table {
    pub(crate) fn empty() -> Self {
        Table { starts: Box::new([]), slots: Box::new([]), generation: 0 }
    }

    /// Index of the slot whose range contains `addr`, if any.
    #[inline]
    pub(crate) fn find(&self, addr: u64) -> Option<usize> {
        let i = super::search::last_start_at_or_below(&self.starts, addr)?;
        // SAFETY-free bound: `starts` and `slots` have equal length and the
        // search returns an index into `starts`.
        (addr <= self.slots[i].last).then_some(i)
    }
}

/// A table being edited by a writer (under the writer lock).
pub(crate) struct Draft {
    pub(crate) starts: Vec<u64>,
    pub(crate) slots: Vec<Slot>,
}

impl Draft {
    pub(crate) fn from_table(t: &Table) -> Self {
        Draft { starts: t.starts.to_vec(), slots: t.slots.to_vec() }
    }

    pub(crate) fn position(&self, id: DeviceId) -> Result<usize, BusError> {
        self.slots.iter().position(|s| s.id == id).ok_or(BusError::UnknownDevice(id))
    }

    /// Inserts a slot for `start..=slot.last`, refusing any overlap and
    /// naming the device already there.
    pub(crate) fn insert(&mut self, start: u64, slot: Slot) -> Result<(), BusError> {
        let pos = self.starts.partition_point(|&s| s < start);
        let overlap = |i: usize| BusError::Overlap {
            start,
            last: slot.last,
            existing: self.slots[i].id,
            existing_start: self.starts[i],
            existing_last: self.slots[i].last,
        };
        if pos > 0 && self.slots[pos - 1].last >= start {
            return Err(overlap(pos - 1));
        }
        if pos < self.starts.len() && self.starts[pos] <= slot.last {
            return Err(overlap(pos));
        }
        self.starts.insert(pos, start);
        self.slots.insert(pos, slot);
        Ok(())
    }

    pub(crate) fn remove(&mut self, pos: usize) -> (u64, Slot) {
        (self.starts.remove(pos), self.slots.remove(pos))
    }

    pub(crate) fn compile(self, generation: u64) -> Table {
        debug_assert!(self.starts.windows(2).all(|w| w[0] < w[1]));
        Table {
            starts: self.starts.into_boxed_slice(),
            slots: self.slots.into_boxed_slice(),
            generation,
        }
    }
}
