//! [`RamDisk`]: a disk held in lazily committed memory, one lock per chunk.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::alloc::Layout;
use core::fmt;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, Ordering};

use super::{BackendError, BackendFeatures, BlockBackend, SECTOR_SIZE, check_range};
use crate::memory::ZeroedPages;

/// Size of one independently locked piece of a [`RamDisk`]: a page, so a
/// 4 KiB-aligned request takes exactly one lock.
const CHUNK: usize = 4096;

/// Most chunk locks a [`RamDisk`] keeps; chunk `i` uses lock `i % n`. Each
/// lock has a cache line of its own, so vCPUs locking different chunks do
/// not pull a shared line back and forth, and the set stays small enough
/// (64 KiB) to live in cache whatever the disk size.
const LOCK_STRIPES: usize = 1024;

/// A disk held in memory.
///
/// The bytes live in one page-aligned, zero-filled block that costs nothing
/// until written: on Linux with `std` an anonymous mapping whose pages the
/// kernel provides on first write (a 1 GiB disk is created in microseconds
/// and is resident only where it was written; reading an unwritten sector
/// returns zeroes from the kernel's shared zero page), without `std` an
/// `alloc_zeroed` block. The price of laziness: the first write to a page
/// also takes the page fault that provides it (the kernel zeroes a page,
/// under that chunk's lock), and memory is committed then, not at creation,
/// so a host out of memory fails on that write (the kernel's OOM handling),
/// not in `new`; [`MAX_RAM_DISK`](crate::MAX_RAM_DISK) bounds what a
/// configured disk can take.
///
/// Each 4 KiB chunk has its own lock, so requests from different queues
/// touching different chunks never contend; a request spanning chunks takes
/// their locks one after another, never two at once, so no lock ordering is
/// needed. Requests on disjoint chunks copy straight between guest memory
/// and the disk
/// ([`read_to`](BlockBackend::read_to) / [`write_from`](BlockBackend::write_from)).
///
/// # Example
/// ```
/// use vmio::virtio::blk::{BlockBackend, RamDisk};
///
/// let disk = RamDisk::new(1 << 20);
/// disk.write_at(4096, b"hello")?;
/// let mut buf = [0u8; 5];
/// disk.read_at(4096, &mut buf)?;
/// assert_eq!(&buf, b"hello");
/// # Ok::<(), vmio::virtio::blk::BackendError>(())
/// ```
pub struct RamDisk {
    /// `size` bytes (page-aligned); chunk `i` is only touched under
    /// `locks[i % locks.len()]`. Dangling when `size` is 0.
    data: NonNull<u8>,
    /// The memory behind `data` (`None` when `size` is 0), freed on drop.
    _pages: Option<ZeroedPages>,
    locks: Box<[ChunkLock]>,
    size: u64,
    read_only: bool,
}

/// The lock of a stripe of [`RamDisk`] chunks: held for at most one 4 KiB
/// copy, so a spin lock, alone on its cache line. Its unlock is a plain release store (no locked instruction),
/// which lets the copy's stores drain in the background instead of stalling
/// the vCPU, unlike a futex mutex's unlock, which must also learn whether
/// anyone sleeps.
#[repr(align(64))]
struct ChunkLock(AtomicBool);

/// Holds a [`ChunkLock`]; unlocks on drop.
struct ChunkGuard<'a>(&'a ChunkLock);

impl ChunkLock {
    const fn new() -> Self {
        ChunkLock(AtomicBool::new(false))
    }

    fn lock(&self) -> ChunkGuard<'_> {
        #[cfg(feature = "std")]
        let mut spins = 0u32;
        // Acquire pairs with the Release in `ChunkGuard::drop`: the previous
        // holder's writes to the chunk are visible once we own it.
        while self
            .0
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            // Spin on a plain load so waiters do not bounce the line.
            while self.0.load(Ordering::Relaxed) {
                core::hint::spin_loop();
                #[cfg(feature = "std")]
                {
                    spins = spins.wrapping_add(1);
                    if spins.is_multiple_of(1024) {
                        // The holder was preempted mid-copy: let it run.
                        std::thread::yield_now();
                    }
                }
            }
        }
        ChunkGuard(self)
    }
}

impl Drop for ChunkGuard<'_> {
    fn drop(&mut self) {
        // Release publishes our writes to the chunk to the next holder.
        self.0.0.store(false, Ordering::Release);
    }
}

// SAFETY: the bytes behind `data` are owned by the disk and only reached
// through `with_chunk`, which holds the chunk's stripe lock for the whole
// borrow;
// so sharing or sending the disk never lets two threads touch the same bytes
// at once.
unsafe impl Send for RamDisk {}
// SAFETY: see `Send`.
unsafe impl Sync for RamDisk {}

impl fmt::Debug for RamDisk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RamDisk")
            .field("size", &self.size)
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

impl RamDisk {
    /// A zero-filled writable disk of `size` bytes, rounded down to whole
    /// sectors.
    ///
    /// # Panics
    /// If `size` does not fit in the host's address space, or the host is
    /// out of memory.
    pub fn new(size: u64) -> Self {
        let size = size - size % SECTOR_SIZE;
        let bytes = usize::try_from(size).expect("a RAM disk must fit in host memory");
        // Page-aligned (a chunk is a page), so a 4 KiB-aligned request is
        // one chunk and one lock.
        let pages = (bytes > 0).then(|| {
            ZeroedPages::new(bytes).unwrap_or_else(|| {
                let layout = Layout::from_size_align(bytes, CHUNK).unwrap_or(Layout::new::<u8>());
                alloc::alloc::handle_alloc_error(layout)
            })
        });
        let data = pages.as_ref().map_or(NonNull::dangling(), ZeroedPages::as_ptr);
        let stripes = bytes.div_ceil(CHUNK).clamp(1, LOCK_STRIPES);
        let locks = (0..stripes).map(|_| ChunkLock::new()).collect::<Vec<_>>();
        RamDisk { data, _pages: pages, locks: locks.into_boxed_slice(), size, read_only: false }
    }

    /// A disk holding a copy of `image`, padded with zeroes to whole sectors.
    pub fn from_image(image: &[u8]) -> Self {
        let disk = RamDisk::new((image.len() as u64).next_multiple_of(SECTOR_SIZE));
        for (i, piece) in image.chunks(CHUNK).enumerate() {
            disk.with_chunk(i, |chunk| chunk[..piece.len()].copy_from_slice(piece));
        }
        disk
    }

    /// The same disk, refusing every write from now on.
    #[must_use]
    pub fn read_only(mut self) -> Self {
        self.read_only = true;
        self
    }

    /// Runs `f` on chunk `index` (shorter than [`CHUNK`] at the end of a disk
    /// that is not a whole number of pages), holding its lock.
    fn with_chunk<R>(&self, index: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
        let start = index * CHUNK;
        // `size` fits in usize (checked in `new`); callers pass chunks of
        // checked ranges, so `start < size`.
        assert!(start < self.size as usize, "chunk {index} is past the disk");
        let len = CHUNK.min(self.size as usize - start);
        let _guard = self.locks[index % self.locks.len()].lock();
        // SAFETY: `[start, start + len)` lies inside the allocation, and
        // every access to chunk `index` goes through this function under the
        // same stripe lock, held until `f` returns: this is the only borrow
        // of those bytes anywhere.
        let chunk = unsafe { core::slice::from_raw_parts_mut(self.data.as_ptr().add(start), len) };
        f(chunk)
    }

    /// Visits the chunks covering `[offset, offset + len)` in order, passing
    /// each chunk, the range inside it, and the range inside the caller's
    /// buffer. One chunk lock is held at a time.
    fn for_each_chunk(
        &self,
        offset: u64,
        len: usize,
        mut f: impl FnMut(&mut [u8], core::ops::Range<usize>, core::ops::Range<usize>),
    ) {
        // The caller checked the range against `size`, which fits in usize.
        let mut pos = usize::try_from(offset).expect("range checked against the disk size");
        let mut done = 0;
        while done < len {
            let (index, start) = (pos / CHUNK, pos % CHUNK);
            let n = (CHUNK - start).min(len - done);
            self.with_chunk(index, |chunk| f(chunk, start..start + n, done..done + n));
            pos += n;
            done += n;
        }
    }

    /// Zeroes a checked range.
    fn zero_range(&self, offset: u64, len: u64) {
        let len = usize::try_from(len).expect("range checked against the disk size");
        self.for_each_chunk(offset, len, |chunk, inner, _| chunk[inner].fill(0));
    }

    fn check_write(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        if self.read_only {
            return Err(BackendError::ReadOnly);
        }
        check_range(offset, len, self.size)
    }
}

impl BlockBackend for RamDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn features(&self) -> BackendFeatures {
        BackendFeatures {
            read_only: self.read_only,
            // Nothing is cached: every completed write is already as durable
            // as memory gets, so flushing is trivially correct.
            flush: true,
            discard: true,
            write_zeroes: true,
            // Zeroing in place is all a RAM disk can do either way.
            write_zeroes_unmap: false,
        }
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        check_range(offset, buf.len() as u64, self.size)?;
        self.for_each_chunk(offset, buf.len(), |chunk, inner, outer| {
            buf[outer].copy_from_slice(&chunk[inner]);
        });
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), BackendError> {
        self.check_write(offset, buf.len() as u64)?;
        self.for_each_chunk(offset, buf.len(), |chunk, inner, outer| {
            chunk[inner].copy_from_slice(&buf[outer]);
        });
        Ok(())
    }

    fn flush(&self) -> Result<(), BackendError> {
        Ok(())
    }

    fn read_to(
        &self,
        offset: u64,
        len: u64,
        _scratch: &mut [u8],
        sink: &mut dyn FnMut(&[u8]) -> bool,
    ) -> Result<(), BackendError> {
        check_range(offset, len, self.size)?;
        let len = usize::try_from(len).expect("range checked against the disk size");
        let mut ok = true;
        // Straight from the chunk, under its lock: no intermediate copy.
        self.for_each_chunk(offset, len, |chunk, inner, _| ok = ok && sink(&chunk[inner]));
        if ok { Ok(()) } else { Err(BackendError::Aborted) }
    }

    fn write_from(
        &self,
        offset: u64,
        len: u64,
        _scratch: &mut [u8],
        source: &mut dyn FnMut(&mut [u8]) -> bool,
    ) -> Result<(), BackendError> {
        self.check_write(offset, len)?;
        let len = usize::try_from(len).expect("range checked against the disk size");
        let mut ok = true;
        // `source` fills the chunk itself, under its lock.
        self.for_each_chunk(offset, len, |chunk, inner, _| ok = ok && source(&mut chunk[inner]));
        if ok { Ok(()) } else { Err(BackendError::Aborted) }
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.check_write(offset, len)?;
        self.zero_range(offset, len);
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> Result<(), BackendError> {
        self.check_write(offset, len)?;
        self.zero_range(offset, len);
        Ok(())
    }
}
