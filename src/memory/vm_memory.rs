//! [`GuestMemory`] for rust-vmm's [`GuestMemoryMmap`] (feature `vm-memory`).
//!
//! A VMM built on rust-vmm already holds its guest RAM as a
//! `GuestMemoryMmap`; with this implementation it passes that very object to
//! vmio's devices (`Arc<GuestMemoryMmap>` coerces to
//! `Arc<dyn GuestMemory>`). Nothing is copied or mapped a second time: every
//! access is translated to vm-memory's own bounds-checked
//! [`VolatileSlice`](vm_memory::VolatileSlice) copies and its atomic
//! accessors, on the mappings the VMM created.
//!
//! What the translation adds to vm-memory's accessors is vmio's contract:
//!
//! - **All or nothing.** The whole range is checked before the first byte
//!   moves, so a refused [`write`](GuestMemory::write) writes nothing
//!   (vm-memory's own `write_slice` may write a prefix and then fail).
//! - **Region boundaries.** A buffer may run from one region into the next
//!   when the two are adjacent in guest-physical space; it is copied piece
//!   by piece, each piece inside one mapping. A buffer with any byte in a
//!   hole is [`MemoryError::OutOfBounds`]. [`host_ptr`](GuestMemory::host_ptr)
//!   cannot describe two mappings with one pointer and answers
//!   [`MemoryError::NotContiguous`] for such a range. This is exactly how
//!   [`GuestRam`](super::GuestRam) behaves.
//! - **Ring indices.** [`load_u16`](GuestMemory::load_u16) and
//!   [`store_u16`](GuestMemory::store_u16) are real atomic accesses (through
//!   vm-memory's `AtomicU16` view of the mapping) with the ordering asked
//!   for, so the queue's acquire/release pairs and its `SeqCst` fences work
//!   exactly as over [`GuestRam`](super::GuestRam). A misaligned index (only
//!   a broken driver places one there) falls back to a copy and a fence.
//! - **Dirty tracking.** With a dirty bitmap (`GuestMemoryMmap<B>` for a
//!   `B` other than `()`), every write and atomic store marks the pages it
//!   touches, because it goes through vm-memory's accessors, and
//!   `host_ptr` marks its whole range dirty up front, since the caller may
//!   write through it.
//!
//! Both vmio and vm-memory name a trait `GuestMemory`, and vm-memory's
//! `Bytes` also has `read`/`write` methods: code that brings both traits
//! into scope calls vmio's through the trait path
//! (`vmio::GuestMemory::read(&mem, addr, buf)`) or through the
//! `dyn GuestMemory` the devices take anyway.

use core::ptr::NonNull;
use core::sync::atomic::{Ordering, fence};

use vm_memory::bitmap::Bitmap;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
    MemoryRegionAddress,
};

use super::{GuestMemory, MemoryError};

/// One piece of an access: the region, the offset inside it, the length.
type Piece<'a, B> = (&'a GuestRegionMmap<B>, MemoryRegionAddress, usize);

/// The piece of `[at, at + left)` that lies in the region holding `at`, or
/// `None` when `at` is not guest RAM. `left` is not 0.
fn piece<B: Bitmap>(mem: &GuestMemoryMmap<B>, at: u64, left: u64) -> Option<Piece<'_, B>> {
    let region = mem.find_region(GuestAddress(at))?;
    // `find_region` returned the region holding `at`: `start <= at`, and
    // `at - start < len`.
    let off = at - region.start_addr().0;
    let n = (region.len() - off).min(left);
    // A region is one host mapping, so its length (and anything shorter)
    // fits in `usize`.
    Some((region, MemoryRegionAddress(off), usize::try_from(n).ok()?))
}

/// Calls `f(region, offset, start_in_access, n)` for each piece of
/// `[addr, addr + len)` in address order, after checking the whole range.
fn for_each_piece<B: Bitmap + Send + Sync + 'static>(
    mem: &GuestMemoryMmap<B>,
    addr: u64,
    len: u64,
    mut f: impl FnMut(&GuestRegionMmap<B>, MemoryRegionAddress, usize, usize) -> Result<(), ()>,
) -> Result<(), MemoryError> {
    let oob = MemoryError::OutOfBounds { addr, len };
    // Fast path: the whole access inside one region (every ring field and
    // descriptor, almost every data buffer), checked by `piece` itself.
    if len != 0
        && let Some((r, off, n)) = piece(mem, addr, len)
        && n as u64 == len
    {
        return f(r, off, 0, n).map_err(|()| oob);
    }
    GuestMemory::check(mem, addr, len)?;
    let mut done = 0u64;
    while done < len {
        // `check` proved every byte of the range is guest RAM, so `piece`
        // only fails if the map changed under us, which `&self` rules out.
        let (r, off, n) = piece(mem, addr + done, len - done).ok_or(oob)?;
        let at = usize::try_from(done).map_err(|_| oob)?;
        f(r, off, at, n).map_err(|()| oob)?;
        done += n as u64;
    }
    Ok(())
}

/// rust-vmm's guest memory, as it is (feature `vm-memory`): no copy, no
/// second mapping, every access through vm-memory's bounds-checked volatile
/// slices and atomics, and through its dirty bitmap when `B` has one. A
/// buffer may run across adjacent regions; any byte in a hole is
/// [`MemoryError::OutOfBounds`]; [`host_ptr`](GuestMemory::host_ptr) over
/// two regions is [`MemoryError::NotContiguous`].
///
/// # Example
/// ```
/// use std::sync::Arc;
/// use vm_memory::{GuestAddress, GuestMemoryMmap};
/// use vmio::{GuestMemory, MemoryError};
///
/// // The VMM's RAM: 1 MiB at 2 GiB (and what it hands KVM, unchanged).
/// let ram = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0x8000_0000), 1 << 20)])?;
/// let ram = Arc::new(ram);
/// // What it hands vmio's devices (`MmioTransport::new` takes this).
/// let memory: Arc<dyn GuestMemory> = ram.clone();
/// memory.write_u32(0x8000_0010, 0xdead_beef)?;
/// assert_eq!(memory.read_u32(0x8000_0010)?, 0xdead_beef);
/// assert_eq!(
///     memory.read_u32(0x800f_fffe),
///     Err(MemoryError::OutOfBounds { addr: 0x800f_fffe, len: 4 })
/// );
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
impl<B: Bitmap + Send + Sync + 'static> GuestMemory for GuestMemoryMmap<B> {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        for_each_piece(self, addr, buf.len() as u64, |r, off, at, n| {
            let slice = r.get_slice(off, n).map_err(|_| ())?;
            // Volatile for small pieces, a non-overlapping copy for large
            // ones (vm-memory's choice), into host memory the guest cannot
            // reach; the range was checked, so all `n` bytes are copied.
            let copied = slice.copy_to(&mut buf[at..at + n]);
            if copied == n { Ok(()) } else { Err(()) }
        })
    }

    fn write(&self, addr: u64, data: &[u8]) -> Result<(), MemoryError> {
        for_each_piece(self, addr, data.len() as u64, |r, off, at, n| {
            let slice = r.get_slice(off, n).map_err(|_| ())?;
            // Also marks the piece dirty in the region's bitmap.
            slice.copy_from(&data[at..at + n]);
            Ok(())
        })
    }

    fn check(&self, addr: u64, len: u64) -> Result<(), MemoryError> {
        if len == 0 {
            return Ok(());
        }
        let last = addr.checked_add(len - 1).ok_or(MemoryError::Overflow { addr, len })?;
        let oob = MemoryError::OutOfBounds { addr, len };
        let mut at = addr;
        // Walk adjacent regions until one holds `last`; a gap is an error.
        loop {
            let region = self.find_region(GuestAddress(at)).ok_or(oob)?;
            let region_last = region.last_addr().0;
            if last <= region_last {
                return Ok(());
            }
            // `region_last < last <= u64::MAX`: no overflow.
            at = region_last + 1;
        }
    }

    fn load_u16(&self, addr: u64, order: Ordering) -> Result<u16, MemoryError> {
        if let Some((r, off, 2)) = piece(self, addr, 2) {
            // An atomic load through vm-memory's `AtomicU16` view of the
            // mapping; refused (and handled below) only when misaligned.
            if let Ok(v) = Bytes::<MemoryRegionAddress>::load::<u16>(r, off, order) {
                return Ok(u16::from_le(v));
            }
        }
        let mut b = [0; 2];
        GuestMemory::read(self, addr, &mut b)?;
        if order != Ordering::Relaxed {
            // Later reads (ring entries, descriptors) must not be satisfied
            // before the index that announced them.
            fence(Ordering::Acquire);
        }
        Ok(u16::from_le_bytes(b))
    }

    fn store_u16(&self, addr: u64, value: u16, order: Ordering) -> Result<(), MemoryError> {
        if let Some((r, off, 2)) = piece(self, addr, 2) {
            // An atomic store (which also marks the page dirty); refused
            // only when misaligned.
            if Bytes::<MemoryRegionAddress>::store(r, value.to_le(), off, order).is_ok() {
                return Ok(());
            }
        }
        if order != Ordering::Relaxed {
            // Everything written before (used elements, data) must be
            // visible no later than the index that publishes it.
            fence(Ordering::Release);
        }
        GuestMemory::write(self, addr, &value.to_le_bytes())
    }

    fn host_ptr(&self, addr: u64, len: u64) -> Result<NonNull<u8>, MemoryError> {
        GuestMemory::check(self, addr, len)?;
        let oob = MemoryError::OutOfBounds { addr, len };
        let region = self.find_region(GuestAddress(addr)).ok_or(oob)?;
        let off = addr - region.start_addr().0;
        if len > region.len() - off {
            return Err(MemoryError::NotContiguous { addr, len });
        }
        let ptr = region
            .get_host_address(MemoryRegionAddress(off))
            .map_err(|_| MemoryError::NotContiguous { addr, len })?;
        // The caller may write through the pointer: record the range dirty
        // now, as no later write will pass through vm-memory. `len` fits in
        // the mapping, hence in `usize`; so does `off`.
        region.bitmap().mark_dirty(off as usize, len as usize);
        NonNull::new(ptr).ok_or(oob)
    }
}

#[cfg(test)]
mod tests {
    use alloc::sync::Arc;
    use alloc::vec;

    use vm_memory::GuestAddress;

    use super::*;

    /// Regions at 0x1000 and 0x2000 (adjacent), a hole, then one at 0x4000.
    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0x1000), 0x1000),
            (GuestAddress(0x2000), 0x1000),
            (GuestAddress(0x4000), 0x1000),
        ])
        .expect("anonymous guest memory")
    }

    #[test]
    fn bounds_at_region_edges() {
        let m = mem();
        let g: &dyn GuestMemory = &m;
        assert_eq!(g.check(0x1000, 0x1000), Ok(()));
        assert_eq!(g.check(0x4fff, 1), Ok(()));
        assert_eq!(g.check(0x4fff, 2), Err(MemoryError::OutOfBounds { addr: 0x4fff, len: 2 }));
        assert_eq!(g.check(0xfff, 1), Err(MemoryError::OutOfBounds { addr: 0xfff, len: 1 }));
        assert_eq!(g.check(0xfff, 2), Err(MemoryError::OutOfBounds { addr: 0xfff, len: 2 }));
        assert_eq!(g.check(u64::MAX, 2), Err(MemoryError::Overflow { addr: u64::MAX, len: 2 }));
        assert_eq!(
            g.read_u32(0x4ffd),
            Err(MemoryError::OutOfBounds { addr: 0x4ffd, len: 4 }),
            "one byte past the last region"
        );
        assert_eq!(g.write_u64(0x5000, 1), Err(MemoryError::OutOfBounds { addr: 0x5000, len: 8 }));
        // Last bytes of the last region are fine.
        g.write_u32(0x4ffc, 0xfeed_f00d).unwrap();
        assert_eq!(g.read_u32(0x4ffc), Ok(0xfeed_f00d));
        // Zero-length accesses touch nothing, anywhere.
        assert_eq!(g.read(u64::MAX, &mut []), Ok(()));
        assert_eq!(g.write(0, &[]), Ok(()));
    }

    #[test]
    fn adjacent_regions_join_and_holes_refuse() {
        let m = mem();
        let g: &dyn GuestMemory = &m;
        // An 8-byte value and a 4 KiB buffer across the 0x2000 boundary.
        g.write_u64(0x1ffc, 0x1122_3344_5566_7788).unwrap();
        assert_eq!(g.read_u64(0x1ffc), Ok(0x1122_3344_5566_7788));
        assert_eq!(g.read_u32(0x2000), Ok(0x1122_3344), "the high half landed in region 2");
        let data: vec::Vec<u8> = (0..0x1000u32).map(|i| (i * 7) as u8).collect();
        g.write(0x1800, &data).unwrap();
        let mut back = vec![0u8; data.len()];
        g.read(0x1800, &mut back).unwrap();
        assert_eq!(back, data);
        // Through the 0x3000 hole: refused whole, nothing written.
        g.write_u32(0x2ffc, 0).unwrap();
        assert_eq!(
            g.write(0x2ffc, &[0xaa; 8]),
            Err(MemoryError::OutOfBounds { addr: 0x2ffc, len: 8 })
        );
        assert_eq!(g.read_u32(0x2ffc), Ok(0), "a refused write writes no prefix");
        let mut b = [0u8; 0x1001];
        assert!(g.read(0x3fff, &mut b).is_err(), "starts in the hole");
        assert!(g.read(0x2000, &mut b[..0x1001]).is_err(), "ends in the hole");
        // One host pointer cannot cover two mappings, even adjacent ones.
        assert_eq!(g.host_ptr(0x1ffc, 8), Err(MemoryError::NotContiguous { addr: 0x1ffc, len: 8 }));
        assert_eq!(g.host_ptr(0x2ffc, 8), Err(MemoryError::OutOfBounds { addr: 0x2ffc, len: 8 }));
        assert!(g.host_ptr(0x2000, 0x1000).is_ok());
    }

    #[test]
    fn host_ptr_is_the_vmm_mapping() {
        let m = mem();
        let g: &dyn GuestMemory = &m;
        let p = g.host_ptr(0x4010, 4).unwrap();
        let vm = m.get_host_address(GuestAddress(0x4010)).unwrap();
        assert_eq!(p.as_ptr(), vm, "no copy, no second mapping");
        g.write_u32(0x4010, 0x0102_0304).unwrap();
        let mut seen = [0u8; 4];
        // SAFETY: `p` points at 4 bytes of the live mapping, nothing else
        // accesses them during this copy.
        unsafe { core::ptr::copy_nonoverlapping(p.as_ptr(), seen.as_mut_ptr(), 4) };
        assert_eq!(u32::from_le_bytes(seen), 0x0102_0304);
    }

    #[test]
    fn ring_indices_are_atomic_and_little_endian() {
        let m = mem();
        let g: &dyn GuestMemory = &m;
        g.store_u16(0x1010, 0x1234, Ordering::Release).unwrap();
        assert_eq!(g.load_u16(0x1010, Ordering::Acquire), Ok(0x1234));
        let mut raw = [0u8; 2];
        g.read(0x1010, &mut raw).unwrap();
        assert_eq!(raw, [0x34, 0x12], "stored little-endian");
        // Misaligned and across the region boundary: copies, still correct.
        g.store_u16(0x1021, 0x5678, Ordering::SeqCst).unwrap();
        assert_eq!(g.load_u16(0x1021, Ordering::SeqCst), Ok(0x5678));
        g.store_u16(0x1fff, 0x9abc, Ordering::Release).unwrap();
        assert_eq!(g.load_u16(0x1fff, Ordering::Acquire), Ok(0x9abc));
        assert_eq!(
            g.load_u16(0x4fff, Ordering::Acquire),
            Err(MemoryError::OutOfBounds { addr: 0x4fff, len: 2 })
        );
        assert_eq!(
            g.store_u16(0x4fff, 1, Ordering::Release),
            Err(MemoryError::OutOfBounds { addr: 0x4fff, len: 2 })
        );
    }

    #[cfg(feature = "std")]
    #[test]
    fn index_handoff_between_threads() {
        extern crate std;
        // A producer publishes data then an index with Release; a consumer
        // that sees the index with Acquire must see the data.
        let m = Arc::new(mem());
        let rounds: u16 = if cfg!(miri) { 50 } else { 2_000 };
        let producer = {
            let m = m.clone();
            std::thread::spawn(move || {
                for i in 1..=rounds {
                    GuestMemory::write_u32(&*m, 0x4100, u32::from(i)).unwrap();
                    GuestMemory::store_u16(&*m, 0x4000, i, Ordering::Release).unwrap();
                    while GuestMemory::load_u16(&*m, 0x4002, Ordering::Acquire).unwrap() != i {
                        core::hint::spin_loop();
                    }
                }
            })
        };
        let mut seen = 0;
        while seen != rounds {
            let idx = GuestMemory::load_u16(&*m, 0x4000, Ordering::Acquire).unwrap();
            if idx != seen {
                assert_eq!(GuestMemory::read_u32(&*m, 0x4100), Ok(u32::from(idx)));
                seen = idx;
                GuestMemory::store_u16(&*m, 0x4002, idx, Ordering::Release).unwrap();
            }
            core::hint::spin_loop();
        }
        producer.join().unwrap();
    }

    #[test]
    fn usable_as_dyn_guest_memory() {
        let m: Arc<dyn GuestMemory> = Arc::new(mem());
        m.fill(0x1ff0, 0x20, 0x5a).unwrap();
        assert_eq!(m.read_u32(0x1ffe), Ok(0x5a5a_5a5a));
        assert!(m.fill(0x2ff0, 0x20, 0).is_err());
    }
}
