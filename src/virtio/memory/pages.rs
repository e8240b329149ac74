//! Zero-filled host memory that costs nothing until it is touched: the
//! backing of [`GuestRam`](super::GuestRam)'s own regions and of
//! [`RamDisk`](crate::virtio::blk::RamDisk).
//!
//! On Linux with `std`, an anonymous private mapping (`mmap` with
//! `MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE`): every page reads as zero
//! from the kernel's shared zero page and gets a frame of its own on its
//! first write, so creating a 1 GiB disk or guest RAM is one system call and
//! takes no memory until written, and `MAP_NORESERVE` keeps the untouched
//! part out of the commit charge. Elsewhere (`no_std`, other hosts, Miri), a
//! page-aligned `alloc_zeroed`: correct everywhere, but whether untouched
//! pages are free then depends on the allocator (Rust's system allocator
//! zeroes page-aligned blocks by hand, touching every page).

#[cfg(not(all(feature = "std", target_os = "linux", not(miri))))]
use core::alloc::Layout;
use core::fmt;
use core::ptr::NonNull;

/// The least alignment of [`ZeroedPages`]: a 4 KiB page (8-byte alignment,
/// which ring fields need for their atomics, follows).
pub(crate) const PAGE_ALIGN: usize = 4096;

/// `len` zero bytes of host memory, at least [`PAGE_ALIGN`]-aligned, owned
/// (freed on drop) and reached only through raw pointers by its owner.
pub(crate) struct ZeroedPages {
    ptr: NonNull<u8>,
    len: usize,
    /// How to give the memory back.
    #[cfg(not(all(feature = "std", target_os = "linux", not(miri))))]
    layout: Layout,
}

// SAFETY: `ZeroedPages` is a uniquely owned block of plain bytes, like a
// `Box<[u8]>`; it hands out only a raw pointer, and its owners say how they
// synchronize accesses through it.
unsafe impl Send for ZeroedPages {}
// SAFETY: `&ZeroedPages` offers nothing but the pointer and the length.
unsafe impl Sync for ZeroedPages {}

impl fmt::Debug for ZeroedPages {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ZeroedPages").field("ptr", &self.ptr).field("len", &self.len).finish()
    }
}

impl ZeroedPages {
    /// `len` zero bytes; `None` when `len` is 0 or the host refuses.
    pub(crate) fn new(len: usize) -> Option<Self> {
        if len == 0 {
            return None;
        }
        Self::map(len)
    }

    #[cfg(all(feature = "std", target_os = "linux", not(miri)))]
    fn map(len: usize) -> Option<Self> {
        // SAFETY: a fresh anonymous mapping (no address hint, no file)
        // aliases nothing; the result is checked before use.
        let raw = unsafe {
            libc::mmap(
                core::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return None;
        }
        // Mappings are page-aligned, and host pages are at least 4 KiB.
        debug_assert!(raw.cast::<u8>().align_offset(PAGE_ALIGN) == 0);
        Some(ZeroedPages { ptr: NonNull::new(raw.cast())?, len })
    }

    #[cfg(not(all(feature = "std", target_os = "linux", not(miri))))]
    fn map(len: usize) -> Option<Self> {
        let layout = Layout::from_size_align(len, PAGE_ALIGN).ok()?;
        // SAFETY: `len` is not 0, so the layout has a non-zero size.
        let raw = unsafe { alloc::alloc::alloc_zeroed(layout) };
        Some(ZeroedPages { ptr: NonNull::new(raw)?, len, layout })
    }

    /// The first byte.
    #[inline]
    pub(crate) fn as_ptr(&self) -> NonNull<u8> {
        self.ptr
    }
}

impl Drop for ZeroedPages {
    fn drop(&mut self) {
        #[cfg(all(feature = "std", target_os = "linux", not(miri)))]
        {
            // SAFETY: `ptr`/`len` is exactly the mapping made in `map`, and
            // it is unmapped once, here, when no owner can reach it any more.
            let rc = unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
            // Only fails for arguments that are not a mapping, which ours
            // is; nothing sensible to do in a destructor otherwise.
            debug_assert_eq!(rc, 0, "munmap of our own mapping");
        }
        #[cfg(not(all(feature = "std", target_os = "linux", not(miri))))]
        {
            // SAFETY: allocated in `map` with this very layout, freed once.
            unsafe { alloc::alloc::dealloc(self.ptr.as_ptr(), self.layout) };
        }
    }
}

/// Resident-set checks for the two owners live in `tests/lazy_memory.rs`
/// (a process of their own, so nothing else moves the figure); here, the
/// contents and the alignment.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroed_aligned_writable() {
        assert!(ZeroedPages::new(0).is_none());
        let p = ZeroedPages::new(3 * PAGE_ALIGN + 5).unwrap();
        assert_eq!(p.as_ptr().as_ptr().align_offset(PAGE_ALIGN), 0);
        for i in [0, 1, PAGE_ALIGN, 3 * PAGE_ALIGN + 4] {
            // SAFETY: `i < len`; nothing else accesses the block.
            unsafe {
                assert_eq!(p.as_ptr().add(i).read(), 0);
                p.as_ptr().add(i).write(0xa5);
                assert_eq!(p.as_ptr().add(i).read(), 0xa5);
            }
        }
    }
}
