//! [`GuestRam`]: guest RAM owned by vmio, for tests and simple VMMs.

use alloc::vec::Vec;
use core::fmt;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU16, Ordering, fence};

use super::pages::ZeroedPages;
use super::{GuestMemory, MemoryError};

/// Why a [`GuestRam`] could not be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum GuestRamError {
    /// No regions, or a region of zero bytes.
    Empty,
    /// A region runs past the top of the 64-bit guest-physical space.
    Wraps {
        /// Guest-physical base of the region.
        base: u64,
        /// Its size in bytes.
        size: u64,
    },
    /// Two regions overlap.
    Overlap {
        /// Base of the first region.
        first: u64,
        /// Base of the second region, which starts inside the first.
        second: u64,
    },
    /// The host could not allocate the backing memory.
    Alloc {
        /// Size of the allocation that failed.
        size: u64,
    },
}

impl fmt::Display for GuestRamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            GuestRamError::Empty => f.write_str("guest RAM needs at least one non-empty region"),
            GuestRamError::Wraps { base, size } => {
                write!(f, "region of {size:#x} bytes at {base:#x} runs past the top of memory")
            }
            GuestRamError::Overlap { first, second } => {
                write!(f, "region at {second:#x} overlaps region at {first:#x}")
            }
            GuestRamError::Alloc { size } => write!(f, "cannot allocate {size:#x} bytes"),
        }
    }
}
impl core::error::Error for GuestRamError {}

/// One contiguous piece of guest RAM backed by host memory.
#[derive(Debug)]
struct Region {
    /// Guest-physical address of the first byte.
    base: u64,
    /// Size in bytes (never 0; `base + len - 1` does not overflow).
    len: u64,
    /// Host address of the first byte.
    ptr: NonNull<u8>,
    /// The memory behind `ptr` when the region is ours (freed on drop);
    /// `None` for memory lent by [`GuestRam::from_host`].
    _owned: Option<ZeroedPages>,
}

/// Host memory standing for guest physical memory: one or more regions at
/// guest-physical addresses, for tests and simple VMMs (std and no_std).
///
/// Regions either belong to the `GuestRam` (zero-filled, page-aligned, freed
/// on drop) or are borrowed from the VMM with [`from_host`](Self::from_host).
/// Its own regions cost nothing until written: on Linux with `std` they are
/// anonymous mappings whose pages the kernel provides on first write, so a
/// 1 GiB guest RAM is created in microseconds and is resident only where the
/// guest (or the device) wrote; without `std` they come from
/// `alloc_zeroed`. Accesses may cross from one region into
/// the next when they are adjacent; any byte that falls in a hole is an error.
///
/// # Example
/// ```
/// use vmio::{GuestMemory, GuestRam, MemoryError};
///
/// let ram = GuestRam::new(0x4000_0000, 0x10000)?;
/// ram.write_u32(0x4000_0010, 0xdead_beef)?;
/// assert_eq!(ram.read_u32(0x4000_0010)?, 0xdead_beef);
/// // One byte past the end is refused, never touched.
/// assert_eq!(
///     ram.read_u32(0x4000_fffd),
///     Err(MemoryError::OutOfBounds { addr: 0x4000_fffd, len: 4 })
/// );
/// # Ok::<(), Box<dyn core::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct GuestRam {
    /// Sorted by `base`, non-overlapping.
    regions: Vec<Region>,
}

// SAFETY: a `GuestRam` only holds pointers to memory it owns or that the
// creator of `from_host` promised stays mapped; every access goes through
// volatile or raw-pointer copies or atomics (never a reference, never a
// pointer kept between calls), the accesses the memory is shared under
// anyway, so using it from several threads adds nothing a guest writing the
// same memory from its vCPUs does not already do.
unsafe impl Send for GuestRam {}
// SAFETY: see `Send`; `&GuestRam` only offers copies and atomic accesses.
unsafe impl Sync for GuestRam {}

impl GuestRam {
    /// One zeroed region of `size` bytes at guest-physical `base`.
    ///
    /// # Errors
    /// [`GuestRamError`] for an empty or wrapping region, or when the host is
    /// out of memory.
    pub fn new(base: u64, size: u64) -> Result<Self, GuestRamError> {
        Self::with_regions(&[(base, size)])
    }

    /// Zeroed regions at the given `(base, size)` pairs, in any order.
    ///
    /// # Errors
    /// [`GuestRamError`] for an empty list or region, a region that wraps,
    /// overlapping regions, or a failed allocation.
    pub fn with_regions(regions: &[(u64, u64)]) -> Result<Self, GuestRamError> {
        Self::validate(regions)?;
        // Built up in place so that a failed allocation frees the earlier
        // regions through `Drop`.
        let mut ram = GuestRam { regions: Vec::with_capacity(regions.len()) };
        for &(base, len) in regions {
            let size = usize::try_from(len).map_err(|_| GuestRamError::Alloc { size: len })?;
            // Zero-filled and page-aligned (ring fields stay
            // atomic-capable); untouched pages cost nothing on Linux.
            let pages = ZeroedPages::new(size).ok_or(GuestRamError::Alloc { size: len })?;
            let ptr = pages.as_ptr();
            ram.regions.push(Region { base, len, ptr, _owned: Some(pages) });
        }
        ram.regions.sort_by_key(|r| r.base);
        Ok(ram)
    }

    /// Guest RAM over host memory the VMM already has (an `mmap` of the
    /// guest's memory, say): each `(base, ptr, size)` maps `size` bytes at
    /// host `ptr` to guest-physical `base`. The memory is not freed on drop.
    ///
    /// # Errors
    /// As for [`with_regions`](Self::with_regions) (never `Alloc`).
    ///
    /// # Safety
    /// What vmio guarantees in return is in the [module docs](GuestMemory#aliasing):
    /// it reaches these bytes only with volatile and raw-pointer copies and
    /// atomic `u16` accesses, holds no Rust reference to them and no pointer
    /// between two calls, and tolerates anyone (the guest's vCPUs, other
    /// threads of the VMM) reading and writing them at the same time. So the
    /// caller must only ensure that, for as long as the returned value lives:
    ///
    /// - each `ptr` is valid for reads and writes of `size` bytes: mapped
    ///   readable and writable, not freed, unmapped or remapped;
    /// - no `[ptr, ptr + size)` overlaps another region's, nor host memory
    ///   that the VMM passes to vmio as a buffer of its own (a block
    ///   backend's storage, a `&mut [u8]` handed to a device);
    /// - no Rust code holds a reference (`&[u8]`, `&mut [u8]`, `&T`) into
    ///   those bytes while vmio may access them. Sharing them with the guest
    ///   (KVM, a vCPU thread), with DMA, or with code that itself uses raw
    ///   pointers, volatile or atomic accesses is exactly what this type is
    ///   built for and needs nothing more.
    pub unsafe fn from_host(regions: &[(u64, NonNull<u8>, u64)]) -> Result<Self, GuestRamError> {
        let ranges: Vec<(u64, u64)> = regions.iter().map(|&(b, _, s)| (b, s)).collect();
        Self::validate(&ranges)?;
        let mut out: Vec<Region> = regions
            .iter()
            .map(|&(base, ptr, len)| Region { base, len, ptr, _owned: None })
            .collect();
        out.sort_by_key(|r| r.base);
        Ok(GuestRam { regions: out })
    }

    fn validate(regions: &[(u64, u64)]) -> Result<(), GuestRamError> {
        if regions.is_empty() {
            return Err(GuestRamError::Empty);
        }
        let mut sorted: Vec<(u64, u64)> = regions.to_vec();
        sorted.sort_unstable();
        for &(base, size) in &sorted {
            if size == 0 {
                return Err(GuestRamError::Empty);
            }
            if base.checked_add(size - 1).is_none() {
                return Err(GuestRamError::Wraps { base, size });
            }
        }
        for pair in sorted.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            // `a.0 + a.1 - 1` cannot overflow: checked above.
            if b.0 <= a.0 + (a.1 - 1) {
                return Err(GuestRamError::Overlap { first: a.0, second: b.0 });
            }
        }
        Ok(())
    }

    /// The `(base, size)` of each region, in address order.
    pub fn regions(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.regions.iter().map(|r| (r.base, r.len))
    }

    /// The region holding `addr`, if any.
    #[inline]
    fn region_of(&self, addr: u64) -> Option<&Region> {
        let r = if self.regions.len() == 1 {
            &self.regions[0]
        } else {
            let i = self.regions.partition_point(|r| r.base <= addr);
            self.regions.get(i.checked_sub(1)?)?
        };
        // `addr - base < len` means inside; `wrapping_sub` also rejects
        // `addr < base` because it wraps to a huge value.
        (addr.wrapping_sub(r.base) < r.len).then_some(r)
    }

    /// Calls `f(host_ptr, offset_in_access, n)` for each piece of
    /// `[addr, addr + len)` after checking the whole range.
    #[inline(always)]
    fn for_each_piece(
        &self,
        addr: u64,
        len: u64,
        mut f: impl FnMut(NonNull<u8>, usize, usize),
    ) -> Result<(), MemoryError> {
        // Fast path, inlined into every access: the whole access inside the
        // region holding `addr` (ring fields, descriptors, almost every
        // buffer).
        if let Some(r) = self.region_of(addr) {
            let off = addr - r.base;
            if len <= r.len - off {
                // SAFETY: `off + len <= r.len`: in bounds of the region.
                let p = unsafe { r.ptr.add(off as usize) };
                f(p, 0, len as usize);
                return Ok(());
            }
        }
        self.for_each_piece_across(addr, len, &mut f)
    }

    /// [`for_each_piece`](Self::for_each_piece) for an access that leaves
    /// the region it starts in (or starts outside RAM): out of line, so the
    /// fast path stays small enough to inline.
    #[cold]
    #[inline(never)]
    fn for_each_piece_across(
        &self,
        addr: u64,
        len: u64,
        f: &mut dyn FnMut(NonNull<u8>, usize, usize),
    ) -> Result<(), MemoryError> {
        self.check(addr, len)?;
        let mut done = 0u64;
        while done < len {
            let at = addr + done;
            let r = self.region_of(at).ok_or(MemoryError::OutOfBounds { addr, len })?;
            let off = at - r.base;
            let n = (r.len - off).min(len - done);
            // Region sizes fit in `usize` (they were allocated or mapped),
            // so offsets and lengths inside one do too.
            let (off, n_us) = (off as usize, n as usize);
            // SAFETY: `off < r.len`, and the region is valid for `r.len`
            // bytes from `r.ptr`, so the offset pointer stays in bounds.
            let p = unsafe { r.ptr.add(off) };
            f(p, done as usize, n_us);
            done += n;
        }
        Ok(())
    }

    /// [`GuestMemory::check`] for a range that leaves the region it starts
    /// in, is empty, or starts outside RAM.
    #[cold]
    #[inline(never)]
    fn check_across(&self, addr: u64, len: u64) -> Result<(), MemoryError> {
        if len == 0 {
            return Ok(());
        }
        let last = addr.checked_add(len - 1).ok_or(MemoryError::Overflow { addr, len })?;
        let oob = MemoryError::OutOfBounds { addr, len };
        let mut r = self.region_of(addr).ok_or(oob)?;
        // Walk adjacent regions until one holds `last`.
        loop {
            let r_last = r.base + (r.len - 1);
            if last <= r_last {
                return Ok(());
            }
            r = self.region_of(r_last + 1).ok_or(oob)?;
        }
    }
}

/// Copies up to this many bytes with volatile accesses (descriptors,
/// headers, used elements, status bytes); longer copies are bulk data.
const VOLATILE_MAX: usize = 16;

/// Copies `n` bytes of guest memory at `src` to the host buffer at `dst`.
///
/// # Safety
/// `src` is valid for reads and `dst` for writes of `n` bytes, and they do
/// not overlap.
#[inline(always)]
unsafe fn copy_from_guest(src: *const u8, dst: *mut u8, n: usize) {
    if n > VOLATILE_MAX {
        // SAFETY: the caller's contract.
        unsafe { core::ptr::copy_nonoverlapping(src, dst, n) };
        return;
    }
    // The shapes the rings and requests use — a naturally aligned
    // descriptor, header or ring entry — in one or two loads, without the
    // general loop.
    // SAFETY: the caller's contract (`n` bytes valid at both pointers), and
    // each arm checks the guest side's alignment before its volatile load.
    unsafe {
        if n == 16 && src.cast::<u64>().is_aligned() {
            let s = src.cast::<u64>();
            dst.cast::<u64>().write_unaligned(s.read_volatile());
            dst.add(8).cast::<u64>().write_unaligned(s.add(1).read_volatile());
            return;
        }
        if n == 2 && src.cast::<u16>().is_aligned() {
            dst.cast::<u16>().write_unaligned(src.cast::<u16>().read_volatile());
            return;
        }
    }
    let mut i = 0;
    while i < n {
        // SAFETY: `i < n`, so `src + i` and `dst + i` are in bounds; each
        // volatile load is as wide as both the bytes left and the guest
        // pointer's alignment allow, and host-side stores are unaligned.
        unsafe {
            let (s, d, left) = (src.add(i), dst.add(i), n - i);
            if left >= 8 && s.cast::<u64>().is_aligned() {
                d.cast::<u64>().write_unaligned(s.cast::<u64>().read_volatile());
                i += 8;
            } else if left >= 4 && s.cast::<u32>().is_aligned() {
                d.cast::<u32>().write_unaligned(s.cast::<u32>().read_volatile());
                i += 4;
            } else if left >= 2 && s.cast::<u16>().is_aligned() {
                d.cast::<u16>().write_unaligned(s.cast::<u16>().read_volatile());
                i += 2;
            } else {
                d.write(s.read_volatile());
                i += 1;
            }
        }
    }
}

/// Copies `n` bytes of the host buffer at `src` to guest memory at `dst`.
///
/// # Safety
/// As for [`copy_from_guest`].
#[inline(always)]
unsafe fn copy_to_guest(src: *const u8, dst: *mut u8, n: usize) {
    if n > VOLATILE_MAX {
        // SAFETY: the caller's contract.
        unsafe { core::ptr::copy_nonoverlapping(src, dst, n) };
        return;
    }
    // A used element or a status byte without the general loop.
    // SAFETY: as in `copy_from_guest`, with the guest on the store side;
    // each arm checks the guest side's alignment before its volatile store.
    unsafe {
        if n == 8 && dst.cast::<u64>().is_aligned() {
            dst.cast::<u64>().write_volatile(src.cast::<u64>().read_unaligned());
            return;
        }
        if n == 1 {
            dst.write_volatile(src.read());
            return;
        }
    }
    let mut i = 0;
    while i < n {
        // SAFETY: as in `copy_from_guest`, with the guest on the store side.
        unsafe {
            let (s, d, left) = (src.add(i), dst.add(i), n - i);
            if left >= 8 && d.cast::<u64>().is_aligned() {
                d.cast::<u64>().write_volatile(s.cast::<u64>().read_unaligned());
                i += 8;
            } else if left >= 4 && d.cast::<u32>().is_aligned() {
                d.cast::<u32>().write_volatile(s.cast::<u32>().read_unaligned());
                i += 4;
            } else if left >= 2 && d.cast::<u16>().is_aligned() {
                d.cast::<u16>().write_volatile(s.cast::<u16>().read_unaligned());
                i += 2;
            } else {
                d.write_volatile(s.read());
                i += 1;
            }
        }
    }
}

impl GuestMemory for GuestRam {
    #[inline]
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let dst = buf.as_mut_ptr();
        self.for_each_piece(addr, buf.len() as u64, |src, at, n| {
            // SAFETY: `src` is valid for `n` bytes (checked by
            // `for_each_piece`); `dst + at .. + n` lies inside `buf`; host
            // buffers never overlap guest RAM we own or were lent.
            unsafe { copy_from_guest(src.as_ptr(), dst.add(at), n) };
        })
    }

    #[inline]
    fn write(&self, addr: u64, data: &[u8]) -> Result<(), MemoryError> {
        let src = data.as_ptr();
        self.for_each_piece(addr, data.len() as u64, |dst, at, n| {
            // SAFETY: as in `read`, with the roles swapped.
            unsafe { copy_to_guest(src.add(at), dst.as_ptr(), n) };
        })
    }

    #[inline]
    fn check(&self, addr: u64, len: u64) -> Result<(), MemoryError> {
        // Fast path: inside the region holding `addr` (every buffer of a
        // well-behaved driver).
        if let Some(r) = self.region_of(addr)
            && len <= r.len - (addr - r.base)
        {
            return Ok(());
        }
        self.check_across(addr, len)
    }

    #[inline]
    fn load_u16(&self, addr: u64, order: Ordering) -> Result<u16, MemoryError> {
        match self.atomic_u16(addr) {
            // SAFETY: `atomic_u16` returned an aligned pointer into guest RAM
            // valid for 2 bytes; every concurrent access to ring indices in
            // this process goes through atomics too.
            Some(p) => Ok(u16::from_le(unsafe { AtomicU16::from_ptr(p) }.load(order))),
            None => {
                let mut b = [0; 2];
                self.read(addr, &mut b)?;
                if order != Ordering::Relaxed {
                    // See the trait's default.
                    fence(Ordering::Acquire);
                }
                Ok(u16::from_le_bytes(b))
            }
        }
    }

    #[inline]
    fn store_u16(&self, addr: u64, value: u16, order: Ordering) -> Result<(), MemoryError> {
        match self.atomic_u16(addr) {
            Some(p) => {
                // SAFETY: as in `load_u16`.
                unsafe { AtomicU16::from_ptr(p) }.store(value.to_le(), order);
                Ok(())
            }
            None => {
                if order != Ordering::Relaxed {
                    // See the trait's default.
                    fence(Ordering::Release);
                }
                self.write(addr, &value.to_le_bytes())
            }
        }
    }

    fn host_ptr(&self, addr: u64, len: u64) -> Result<NonNull<u8>, MemoryError> {
        self.check(addr, len)?;
        let r = self.region_of(addr).ok_or(MemoryError::OutOfBounds { addr, len })?;
        if len > r.len - (addr - r.base) {
            return Err(MemoryError::NotContiguous { addr, len });
        }
        // SAFETY: `addr - base < len` of the region, as `region_of` checked.
        Ok(unsafe { r.ptr.add((addr - r.base) as usize) })
    }
}

impl GuestRam {
    /// The host address of the `u16` at `addr` when it is aligned and inside
    /// one region (always the case for validated ring fields).
    #[inline]
    fn atomic_u16(&self, addr: u64) -> Option<*mut u16> {
        let r = self.region_of(addr)?;
        let off = addr - r.base;
        if r.len - off < 2 {
            return None;
        }
        // SAFETY: `off + 2 <= len`, so the pointer stays inside the region.
        let p = unsafe { r.ptr.as_ptr().add(off as usize) };
        p.cast::<u16>().is_aligned().then_some(p.cast())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_at_region_edges() {
        let ram = GuestRam::new(0x1000, 0x1000).unwrap();
        assert!(ram.check(0x1000, 0x1000).is_ok());
        assert!(ram.check(0x1fff, 1).is_ok());
        assert_eq!(ram.check(0x1fff, 2), Err(MemoryError::OutOfBounds { addr: 0x1fff, len: 2 }));
        assert_eq!(ram.check(0xfff, 1), Err(MemoryError::OutOfBounds { addr: 0xfff, len: 1 }));
        assert_eq!(ram.check(u64::MAX, 2), Err(MemoryError::Overflow { addr: u64::MAX, len: 2 }));
        let mut b = [0u8; 4];
        assert!(ram.read(0x1ffd, &mut b).is_err());
        assert!(ram.write(0x2000, &b).is_err());
        // A zero-length access anywhere touches nothing and is fine.
        assert!(ram.read(u64::MAX, &mut []).is_ok());
    }

    #[test]
    fn region_at_top_of_address_space() {
        let ram = GuestRam::new(u64::MAX - 0xfff, 0x1000).unwrap();
        ram.write_u16(u64::MAX - 1, 0xabcd).unwrap();
        assert_eq!(ram.read_u16(u64::MAX - 1).unwrap(), 0xabcd);
        assert!(ram.read_u16(u64::MAX).is_err());
        assert!(GuestRam::new(u64::MAX - 0xfff, 0x1001).is_err());
    }

    #[test]
    fn adjacent_regions_join_holes_do_not() {
        let ram =
            GuestRam::with_regions(&[(0x2000, 0x1000), (0x1000, 0x1000), (0x4000, 0x100)]).unwrap();
        ram.write_u64(0x1ffc, 0x1122_3344_5566_7788).unwrap();
        assert_eq!(ram.read_u64(0x1ffc).unwrap(), 0x1122_3344_5566_7788);
        assert_eq!(ram.read_u8_pair(0x2000), [0x44, 0x33]);
        assert!(ram.check(0x2ffc, 8).is_err(), "runs into the hole at 0x3000");
        assert!(ram.write_u64(0x3ffc, 1).is_err());
        assert_eq!(ram.read_u32(0x3ffc), Err(MemoryError::OutOfBounds { addr: 0x3ffc, len: 4 }));
        assert!(matches!(ram.host_ptr(0x1ffc, 8), Err(MemoryError::NotContiguous { .. })));
        assert!(ram.host_ptr(0x1000, 0x1000).is_ok());
    }

    #[test]
    fn construction_errors() {
        assert_eq!(GuestRam::with_regions(&[]).unwrap_err(), GuestRamError::Empty);
        assert_eq!(GuestRam::new(0, 0).unwrap_err(), GuestRamError::Empty);
        assert_eq!(
            GuestRam::with_regions(&[(0x1000, 0x1000), (0x1fff, 0x10)]).unwrap_err(),
            GuestRamError::Overlap { first: 0x1000, second: 0x1fff }
        );
    }

    #[test]
    fn atomics_and_fill() {
        let ram = GuestRam::new(0, 0x100).unwrap();
        ram.store_u16(0x10, 0x1234, Ordering::Release).unwrap();
        assert_eq!(ram.load_u16(0x10, Ordering::Acquire).unwrap(), 0x1234);
        // Misaligned falls back to copies and still works.
        ram.store_u16(0x21, 0x5678, Ordering::Release).unwrap();
        assert_eq!(ram.load_u16(0x21, Ordering::Acquire).unwrap(), 0x5678);
        ram.fill(0x40, 0x40, 0xaa).unwrap();
        assert_eq!(ram.read_u32(0x7c).unwrap(), 0xaaaa_aaaa);
        assert_eq!(ram.read_u8_pair(0x80), [0, 0]);
        assert!(ram.fill(0xf0, 0x11, 1).is_err());
        assert_eq!(ram.read_u8_pair(0xf0), [0, 0], "a refused fill writes nothing");
    }

    #[test]
    fn small_and_bulk_copies_at_every_alignment() {
        // Lengths on both sides of the volatile/bulk threshold, at every
        // alignment: each copy moves exactly its bytes, no neighbour.
        let ram = GuestRam::new(0x1000, 0x200).unwrap();
        let pattern: Vec<u8> = (1..=40u8).collect();
        for len in 0..=pattern.len() {
            for at in 0x1100..0x1108u64 {
                ram.fill(0x1100 - 8, 64, 0).unwrap();
                ram.write(at, &pattern[..len]).unwrap();
                let mut around = [0xffu8; 64];
                ram.read(0x1100 - 8, &mut around).unwrap();
                let start = (at - 0x1100 + 8) as usize;
                assert!(around[..start].iter().all(|&b| b == 0), "len {len} at {at:#x}: before");
                assert_eq!(&around[start..start + len], &pattern[..len], "len {len} at {at:#x}");
                assert!(
                    around[start + len..].iter().all(|&b| b == 0),
                    "len {len} at {at:#x}: after"
                );
                let mut back = [0u8; 40];
                ram.read(at, &mut back[..len]).unwrap();
                assert_eq!(&back[..len], &pattern[..len], "read back, len {len} at {at:#x}");
            }
        }
    }

    impl GuestRam {
        fn read_u8_pair(&self, addr: u64) -> [u8; 2] {
            let mut b = [0; 2];
            self.read(addr, &mut b).unwrap();
            b
        }
    }
}
