//! The driver side of a split virtqueue in guest memory: builds direct and
//! indirect chains, makes them available, reaps the used ring — and, for
//! adversarial tests, writes raw descriptors and ring entries.

use alloc::vec;
use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::{Ordering, fence};

use crate::memory::{GuestMemory, MemoryError};
use crate::virtio::spec::ring::{
    DESC_SIZE, VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE, VIRTQ_USED_F_NO_NOTIFY,
};
use crate::virtio::{QueueArea, QueueConfig};

/// One buffer of a chain the driver builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Buf {
    /// Guest address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable (a response buffer) rather than device-readable.
    pub writable: bool,
}

impl Buf {
    /// A device-readable buffer.
    pub const fn readable(addr: u64, len: u32) -> Self {
        Buf { addr, len, writable: false }
    }
    /// A device-writable buffer.
    pub const fn writable(addr: u64, len: u32) -> Self {
        Buf { addr, len, writable: true }
    }
}

/// What the test driver can fail with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriverError {
    /// Not enough free descriptors (or an empty chain).
    NoDescriptors,
    /// Guest memory refused an access.
    Memory(MemoryError),
    /// The device refused a register access.
    Register {
        /// Offset of the register from the device's base.
        offset: u64,
    },
    /// The device did not behave as the driver expected.
    Device(&'static str),
}

impl fmt::Display for DriverError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DriverError::NoDescriptors => f.write_str("no free descriptors"),
            DriverError::Memory(e) => write!(f, "guest memory: {e}"),
            DriverError::Register { offset } => write!(f, "register access at {offset:#x} refused"),
            DriverError::Device(why) => write!(f, "device misbehaved: {why}"),
        }
    }
}
impl core::error::Error for DriverError {}

impl From<MemoryError> for DriverError {
    fn from(e: MemoryError) -> Self {
        DriverError::Memory(e)
    }
}

/// A bump allocator over a window of guest memory, for buffers and
/// indirect tables.
#[derive(Debug, Clone)]
pub struct GuestAlloc {
    next: u64,
    end: u64,
}

impl GuestAlloc {
    /// Hands out `[start, start + len)`.
    pub const fn new(start: u64, len: u64) -> Self {
        GuestAlloc { next: start, end: start + len }
    }

    /// `len` bytes aligned to `align` (a power of two).
    ///
    /// # Panics
    /// When the window is exhausted: a test sized it wrong.
    pub fn alloc(&mut self, len: u64, align: u64) -> u64 {
        let at = self.next.next_multiple_of(align);
        assert!(at + len <= self.end, "GuestAlloc window exhausted");
        self.next = at + len;
        at
    }

    /// Forgets every allocation.
    pub fn reset_to(&mut self, start: u64) {
        self.next = start;
    }
}

/// The driver's view of one split virtqueue.
#[derive(Debug, Clone)]
pub struct GuestQueue {
    config: QueueConfig,
    free: Vec<u16>,
    /// Descriptor indices of each head's chain, to free when it is used.
    chains: Vec<Vec<u16>>,
    avail_idx: u16,
    last_used: u16,
}

impl GuestQueue {
    /// Bytes one queue of `size` entries occupies when laid out by
    /// [`new`](Self::new).
    pub const fn footprint(size: u16) -> u64 {
        let avail = QueueArea::Descriptors.len(size);
        let used = (avail + QueueArea::Available.len(size)).next_multiple_of(4);
        used + QueueArea::Used.len(size)
    }

    /// A queue of `size` entries laid out contiguously from `base` (16-byte
    /// aligned): table, available ring, used ring.
    pub fn new(size: u16, base: u64) -> Self {
        let avail = base + QueueArea::Descriptors.len(size);
        let used = (avail + QueueArea::Available.len(size)).next_multiple_of(4);
        Self::with_config(QueueConfig {
            size,
            desc_table: base,
            avail_ring: avail,
            used_ring: used,
        })
    }

    /// A queue at explicit (possibly hostile) addresses.
    pub fn with_config(config: QueueConfig) -> Self {
        GuestQueue {
            config,
            free: (0..config.size).rev().collect(),
            chains: vec![Vec::new(); usize::from(config.size)],
            avail_idx: 0,
            last_used: 0,
        }
    }

    /// The addresses to program into the transport.
    pub fn config(&self) -> QueueConfig {
        self.config
    }

    /// Zeroes all three areas (what a driver does before QueueReady).
    ///
    /// # Errors
    /// A memory error if the areas are not guest RAM.
    pub fn init<M: GuestMemory + ?Sized>(&mut self, mem: &M) -> Result<(), DriverError> {
        let s = self.config.size;
        mem.fill(self.config.desc_table, QueueArea::Descriptors.len(s), 0)?;
        mem.fill(self.config.avail_ring, QueueArea::Available.len(s), 0)?;
        mem.fill(self.config.used_ring, QueueArea::Used.len(s), 0)?;
        *self = Self::with_config(self.config);
        Ok(())
    }

    /// Free descriptors left.
    pub fn free_descriptors(&self) -> usize {
        self.free.len()
    }

    /// The driver's `avail.idx`.
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// Takes `n` free descriptors for a hand-built (possibly malformed)
    /// chain whose head is the first of them: when the device returns that
    /// head, [`pop_used`](Self::pop_used) frees all `n`.
    ///
    /// # Errors
    /// [`DriverError::NoDescriptors`] when fewer than `n` (or 0) are free.
    pub fn reserve(&mut self, n: usize) -> Result<Vec<u16>, DriverError> {
        if n == 0 || n > self.free.len() {
            return Err(DriverError::NoDescriptors);
        }
        let idx: Vec<u16> = (0..n).map(|_| self.free.pop().expect("counted")).collect();
        self.chains[usize::from(idx[0])] = idx.clone();
        Ok(idx)
    }

    /// Writes one raw descriptor (any values, for adversarial tests).
    ///
    /// # Errors
    /// A memory error if the table is not guest RAM.
    pub fn write_desc<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) -> Result<(), DriverError> {
        write_desc_at(mem, self.config.desc_table, index, addr, len, flags, next)
    }

    /// Builds a direct chain from `bufs` and makes it available; returns
    /// its head.
    ///
    /// # Errors
    /// [`DriverError::NoDescriptors`] when `bufs` is empty or longer than the
    /// free descriptors; memory errors.
    pub fn add<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        bufs: &[Buf],
    ) -> Result<u16, DriverError> {
        let head = self.add_unpublished(mem, bufs)?;
        self.publish(mem)?;
        Ok(head)
    }

    /// [`add`](Self::add) without bumping `avail.idx` (batch several, then
    /// [`publish`](Self::publish)).
    ///
    /// # Errors
    /// As for [`add`](Self::add).
    pub fn add_unpublished<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        bufs: &[Buf],
    ) -> Result<u16, DriverError> {
        if bufs.is_empty() || bufs.len() > self.free.len() {
            return Err(DriverError::NoDescriptors);
        }
        let idx: Vec<u16> = (0..bufs.len()).map(|_| self.free.pop().expect("counted")).collect();
        for (i, b) in bufs.iter().enumerate() {
            let last = i + 1 == bufs.len();
            let mut flags = if last { 0 } else { VIRTQ_DESC_F_NEXT };
            if b.writable {
                flags |= VIRTQ_DESC_F_WRITE;
            }
            let next = if last { 0 } else { idx[i + 1] };
            self.write_desc(mem, idx[i], b.addr, b.len, flags, next)?;
        }
        let head = idx[0];
        self.chains[usize::from(head)] = idx;
        self.put_avail(mem, head)?;
        Ok(head)
    }

    /// Writes `bufs` as an indirect table at `table` (16-byte aligned, room
    /// for `16 * bufs.len()` bytes), points one descriptor at it and makes it
    /// available; returns the head.
    ///
    /// # Errors
    /// As for [`add`](Self::add).
    pub fn add_indirect<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        table: u64,
        bufs: &[Buf],
    ) -> Result<u16, DriverError> {
        if bufs.is_empty() {
            return Err(DriverError::NoDescriptors);
        }
        let n = u16::try_from(bufs.len()).map_err(|_| DriverError::NoDescriptors)?;
        for (i, b) in (0..n).zip(bufs) {
            let last = i + 1 == n;
            let mut flags = if last { 0 } else { VIRTQ_DESC_F_NEXT };
            if b.writable {
                flags |= VIRTQ_DESC_F_WRITE;
            }
            write_desc_at(mem, table, i, b.addr, b.len, flags, if last { 0 } else { i + 1 })?;
        }
        let head = self.free.pop().ok_or(DriverError::NoDescriptors)?;
        let len = u32::from(n) * DESC_SIZE as u32;
        self.write_desc(mem, head, table, len, VIRTQ_DESC_F_INDIRECT, 0)?;
        self.chains[usize::from(head)] = vec![head];
        self.put_avail(mem, head)?;
        self.publish(mem)?;
        Ok(head)
    }

    /// Writes `head` into the next available ring slot (raw: any value, not
    /// checked against the free list) without publishing.
    ///
    /// # Errors
    /// A memory error if the ring is not guest RAM.
    pub fn put_avail<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        head: u16,
    ) -> Result<(), DriverError> {
        let slot = self.config.avail_ring
            + 4
            + 2 * u64::from(self.avail_idx & self.config.size.wrapping_sub(1));
        mem.write_u16(slot, head)?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        Ok(())
    }

    /// Publishes `avail.idx` (Release: ring entries and descriptors first).
    ///
    /// # Errors
    /// A memory error if the ring is not guest RAM.
    pub fn publish<M: GuestMemory + ?Sized>(&self, mem: &M) -> Result<(), DriverError> {
        // Release pairs with the device's Acquire load of `avail.idx`.
        mem.store_u16(self.config.avail_ring + 2, self.avail_idx, Ordering::Release)?;
        Ok(())
    }

    /// Sets `avail.idx` to any value (adversarial).
    ///
    /// # Errors
    /// A memory error if the ring is not guest RAM.
    pub fn set_avail_idx<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        idx: u16,
    ) -> Result<(), DriverError> {
        self.avail_idx = idx;
        self.publish(mem)
    }

    /// Whether the device asked for a notification for what was published
    /// since `old_avail` (EVENT_IDX's `avail_event`, or NO_NOTIFY).
    ///
    /// # Errors
    /// A memory error if the rings are not guest RAM.
    pub fn needs_notify<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        event_idx: bool,
        old_avail: u16,
    ) -> Result<bool, DriverError> {
        // SeqCst: our `avail.idx` store before the device's fields load;
        // pairs with the device's fence in `enable_notification`.
        fence(Ordering::SeqCst);
        let new = self.avail_idx;
        if event_idx {
            let ev_addr = self.config.used_ring + 4 + 8 * u64::from(self.config.size);
            let ev = mem.load_u16(ev_addr, Ordering::Relaxed)?;
            Ok(new.wrapping_sub(ev).wrapping_sub(1) < new.wrapping_sub(old_avail))
        } else {
            let flags = mem.load_u16(self.config.used_ring, Ordering::Relaxed)?;
            Ok(flags & VIRTQ_USED_F_NO_NOTIFY == 0)
        }
    }

    /// Sets `used_event` (EVENT_IDX: interrupt me when `used.idx` passes it).
    ///
    /// # Errors
    /// A memory error if the ring is not guest RAM.
    pub fn set_used_event<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        v: u16,
    ) -> Result<(), DriverError> {
        let addr = self.config.avail_ring + 4 + 2 * u64::from(self.config.size);
        mem.store_u16(addr, v, Ordering::Relaxed)?;
        Ok(())
    }

    /// The next used ring position the driver will reap.
    pub fn last_used(&self) -> u16 {
        self.last_used
    }

    /// EVENT_IDX: asks for an interrupt as soon as the device uses anything
    /// the driver has not reaped (`used_event = last_used`), then reports
    /// whether something is already there — if so, reap instead of waiting,
    /// or the interrupt may never come.
    ///
    /// # Errors
    /// A memory error if the rings are not guest RAM.
    pub fn arm_interrupt<M: GuestMemory + ?Sized>(&self, mem: &M) -> Result<bool, DriverError> {
        self.set_used_event(mem, self.last_used)?;
        // SeqCst: `used_event` must be visible before we re-read `used.idx`;
        // pairs with the device's fence in `needs_interrupt`.
        fence(Ordering::SeqCst);
        Ok(self.used_idx(mem)? != self.last_used)
    }

    /// Sets or clears NO_INTERRUPT in the available ring's flags.
    ///
    /// # Errors
    /// A memory error if the ring is not guest RAM.
    pub fn set_no_interrupt<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        on: bool,
    ) -> Result<(), DriverError> {
        let v = if on { VIRTQ_AVAIL_F_NO_INTERRUPT } else { 0 };
        mem.store_u16(self.config.avail_ring, v, Ordering::Relaxed)?;
        Ok(())
    }

    /// The device's `used.idx`.
    ///
    /// # Errors
    /// A memory error if the ring is not guest RAM.
    pub fn used_idx<M: GuestMemory + ?Sized>(&self, mem: &M) -> Result<u16, DriverError> {
        // Acquire pairs with the device's Release store of `used.idx`.
        Ok(mem.load_u16(self.config.used_ring + 2, Ordering::Acquire)?)
    }

    /// Takes the next used element `(id, len)`, freeing its descriptors;
    /// `None` when the device has not used anything new.
    ///
    /// # Errors
    /// A memory error, or [`DriverError::Device`] when the device returned an
    /// id that is not the head of an outstanding chain.
    pub fn pop_used<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
    ) -> Result<Option<(u32, u32)>, DriverError> {
        if self.used_idx(mem)? == self.last_used {
            return Ok(None);
        }
        let slot = self.config.used_ring
            + 4
            + 8 * u64::from(self.last_used & self.config.size.wrapping_sub(1));
        let id = mem.read_u32(slot)?;
        let len = mem.read_u32(slot + 4)?;
        self.last_used = self.last_used.wrapping_add(1);
        let chain = usize::try_from(id)
            .ok()
            .and_then(|i| self.chains.get_mut(i))
            .map(core::mem::take)
            .unwrap_or_default();
        if chain.is_empty() {
            return Err(DriverError::Device("used id is not an outstanding head"));
        }
        self.free.extend(chain);
        Ok(Some((id, len)))
    }
}

/// Writes one raw descriptor at `index` of the table at `table`.
///
/// # Errors
/// A memory error if the table entry is not guest RAM.
pub fn write_desc_at<M: GuestMemory + ?Sized>(
    mem: &M,
    table: u64,
    index: u16,
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
) -> Result<(), DriverError> {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&addr.to_le_bytes());
    b[8..12].copy_from_slice(&len.to_le_bytes());
    b[12..14].copy_from_slice(&flags.to_le_bytes());
    b[14..].copy_from_slice(&next.to_le_bytes());
    mem.write(table + DESC_SIZE * u64::from(index), &b)?;
    Ok(())
}
