//! Descriptor chains: the validated scatter-gather list a pop fills, and the
//! one walker that copies bytes between it and guest memory.

use arrayvec::ArrayVec;

use super::SplitQueue;
use super::error::ChainError;
use super::layout::read_desc;
use crate::memory::{GuestMemory, MemoryError};
use crate::virtio::spec::ring::{
    DESC_SIZE, MAX_QUEUE_SIZE, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
};

/// Scatter-gather capacity of [`Chain`], the list [`SplitQueue::pop`] fills.
/// Devices should advertise a segment limit (virtio-blk's `seg_max`) that
/// keeps well-behaved drivers under it; use
/// [`SplitQueue::pop_sized`] for another capacity.
pub const DEFAULT_SEGMENTS: usize = 64;

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
    pub(super) head: u16,
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

    /// Appends a buffer without any check, for unit tests of code that
    /// consumes chains (request parsing) in layouts a pop would refuse.
    #[cfg(test)]
    pub(crate) fn push_unchecked(&mut self, addr: u64, len: u32, writable: bool) {
        if !writable && self.first_writable == self.segments.len() {
            self.first_writable += 1;
            self.readable_len += len;
        } else {
            self.writable_len += len;
        }
        self.segments.push(Segment { addr, len });
    }

    pub(super) fn clear(&mut self) {
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

impl SplitQueue {
    /// Walks the chain at `chain.head` (direct, then at most one indirect
    /// table), validating every descriptor into `chain`.
    pub(super) fn read_chain<const N: usize, M: GuestMemory + ?Sized>(
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
}
