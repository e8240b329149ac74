//! Where a block device's bytes live: the [`BlockBackend`] trait, an
//! in-memory disk ([`RamDisk`], no_std) and a file-backed disk ([`FileDisk`],
//! std on Unix).
//!
//! Every method takes `&self`: the device calls a backend from several
//! queues at once, one vCPU thread per queue, and each backend is responsible
//! for its own internal locking. Offsets and lengths are in bytes; the device
//! has already checked that they are whole 512-byte sectors inside the disk,
//! but backends check again and answer [`BackendError::OutOfRange`] rather
//! than trusting it.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::alloc::Layout;
use core::fmt;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, Ordering};

use crate::virtio::memory::ZeroedPages;

/// Size of the virtio-blk sector, the unit of `capacity` and request sectors.
pub const SECTOR_SIZE: u64 = 512;

/// What a backend can do beyond reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BackendFeatures {
    /// Writes are refused; the device offers `VIRTIO_BLK_F_RO`.
    pub read_only: bool,
    /// [`BlockBackend::flush`] makes every completed write durable (a
    /// backend without a cache implements it as a no-op), so the device may
    /// offer `VIRTIO_BLK_F_FLUSH` and `VIRTIO_BLK_F_CONFIG_WCE`.
    pub flush: bool,
    /// [`BlockBackend::discard`] is implemented.
    pub discard: bool,
    /// [`BlockBackend::write_zeroes`] is implemented.
    pub write_zeroes: bool,
    /// `write_zeroes` may deallocate the range (`unmap`) when asked to.
    pub write_zeroes_unmap: bool,
}

/// Why a backend operation failed. The device turns every one of these into
/// `VIRTIO_BLK_S_IOERR` (or `UNSUPP` for [`BackendError::Unsupported`]) for
/// the request concerned and carries on with the next one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendError {
    /// The byte range does not lie inside the disk.
    OutOfRange {
        /// First byte of the request.
        offset: u64,
        /// Length of the request in bytes.
        len: u64,
        /// Size of the disk in bytes.
        size: u64,
    },
    /// The backend is read-only and the operation would modify it.
    ReadOnly,
    /// The backend does not implement this operation.
    Unsupported,
    /// The caller's sink or source in [`BlockBackend::read_to`] /
    /// [`BlockBackend::write_from`] refused to go on (a guest buffer turned
    /// out not to be guest RAM).
    Aborted,
    /// The underlying storage failed.
    Io {
        /// The operation that failed (`"read"`, `"write"`, `"flush"`, ...).
        op: &'static str,
        /// The OS error number, when there is one.
        os_error: Option<i32>,
    },
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            BackendError::OutOfRange { offset, len, size } => {
                write!(f, "{len} bytes at offset {offset:#x} do not fit in a disk of {size} bytes")
            }
            BackendError::ReadOnly => f.write_str("the disk is read-only"),
            BackendError::Unsupported => f.write_str("operation not supported by the backend"),
            BackendError::Aborted => f.write_str("the transfer was abandoned by its caller"),
            BackendError::Io { op, os_error: Some(code) } => {
                write!(f, "{op} failed (os error {code})")
            }
            BackendError::Io { op, os_error: None } => write!(f, "{op} failed"),
        }
    }
}
impl core::error::Error for BackendError {}

#[cfg(feature = "std")]
impl BackendError {
    fn io(op: &'static str, err: &std::io::Error) -> Self {
        BackendError::Io { op, os_error: err.raw_os_error() }
    }
}

/// Storage behind a virtio-blk device.
///
/// Implementations must be safe to call from several threads at once (one
/// per queue). Concurrent operations on overlapping ranges may interleave in
/// any order, as on real hardware, but must never corrupt bytes outside the
/// ranges concerned.
pub trait BlockBackend: Send + Sync {
    /// Size of the disk in bytes; a multiple of [`SECTOR_SIZE`].
    fn size(&self) -> u64;

    /// What the backend supports; constant for the backend's lifetime.
    fn features(&self) -> BackendFeatures;

    /// Fills `buf` with the bytes starting at `offset`.
    ///
    /// # Errors
    /// [`BackendError::OutOfRange`] if the range leaves the disk;
    /// [`BackendError::Io`] if the storage fails.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError>;

    /// Stores `buf` at `offset`.
    ///
    /// # Errors
    /// [`BackendError::ReadOnly`], [`BackendError::OutOfRange`] or
    /// [`BackendError::Io`].
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), BackendError>;

    /// Makes every write completed so far durable.
    ///
    /// # Errors
    /// [`BackendError::Io`] if the storage cannot sync.
    fn flush(&self) -> Result<(), BackendError>;

    /// Streams the `len` bytes at `offset` to `sink`, in order, in pieces of
    /// any size; `sink` returns `false` to stop.
    ///
    /// The default reads through `scratch` (any non-zero length) with
    /// [`read_at`](Self::read_at); a backend holding its bytes in memory
    /// hands out its own storage instead and saves a copy.
    ///
    /// # Errors
    /// As for [`read_at`](Self::read_at); [`BackendError::Aborted`] when
    /// `sink` stopped.
    fn read_to(
        &self,
        offset: u64,
        len: u64,
        scratch: &mut [u8],
        sink: &mut dyn FnMut(&[u8]) -> bool,
    ) -> Result<(), BackendError> {
        check_range(offset, len, self.size())?;
        let step = scratch.len().max(1) as u64;
        let mut done = 0;
        while done < len {
            let n = (len - done).min(step) as usize;
            self.read_at(offset + done, &mut scratch[..n])?;
            if !sink(&scratch[..n]) {
                return Err(BackendError::Aborted);
            }
            done += n as u64;
        }
        Ok(())
    }

    /// Stores `len` bytes at `offset`, asking `source` to fill them in order,
    /// in pieces of any size; `source` returns `false` to stop (the range's
    /// contents are then unspecified).
    ///
    /// The default fills `scratch` (any non-zero length) and calls
    /// [`write_at`](Self::write_at); a backend holding its bytes in memory
    /// lets `source` fill its storage directly.
    ///
    /// # Errors
    /// As for [`write_at`](Self::write_at); [`BackendError::Aborted`] when
    /// `source` stopped.
    fn write_from(
        &self,
        offset: u64,
        len: u64,
        scratch: &mut [u8],
        source: &mut dyn FnMut(&mut [u8]) -> bool,
    ) -> Result<(), BackendError> {
        check_range(offset, len, self.size())?;
        let step = scratch.len().max(1) as u64;
        let mut done = 0;
        while done < len {
            let n = (len - done).min(step) as usize;
            if !source(&mut scratch[..n]) {
                return Err(BackendError::Aborted);
            }
            self.write_at(offset + done, &scratch[..n])?;
            done += n as u64;
        }
        Ok(())
    }

    /// Tells the backend that `len` bytes at `offset` are no longer needed;
    /// their contents are unspecified afterwards.
    ///
    /// # Errors
    /// [`BackendError::Unsupported`] unless [`BackendFeatures::discard`];
    /// otherwise as [`BlockBackend::write_at`].
    fn discard(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        let _ = (offset, len);
        Err(BackendError::Unsupported)
    }

    /// Makes `len` bytes at `offset` read back as zeroes; with `unmap` the
    /// backend may also deallocate them.
    ///
    /// # Errors
    /// [`BackendError::Unsupported`] unless [`BackendFeatures::write_zeroes`];
    /// otherwise as [`BlockBackend::write_at`].
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), BackendError> {
        let _ = (offset, len, unmap);
        Err(BackendError::Unsupported)
    }
}

/// A shared backend: several devices (or a device and the VMM's own
/// inspection) may hold the same disk.
impl<B: BlockBackend + ?Sized> BlockBackend for alloc::sync::Arc<B> {
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn features(&self) -> BackendFeatures {
        (**self).features()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        (**self).read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), BackendError> {
        (**self).write_at(offset, buf)
    }
    fn flush(&self) -> Result<(), BackendError> {
        (**self).flush()
    }
    fn read_to(
        &self,
        offset: u64,
        len: u64,
        scratch: &mut [u8],
        sink: &mut dyn FnMut(&[u8]) -> bool,
    ) -> Result<(), BackendError> {
        (**self).read_to(offset, len, scratch, sink)
    }
    fn write_from(
        &self,
        offset: u64,
        len: u64,
        scratch: &mut [u8],
        source: &mut dyn FnMut(&mut [u8]) -> bool,
    ) -> Result<(), BackendError> {
        (**self).write_from(offset, len, scratch, source)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        (**self).discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), BackendError> {
        (**self).write_zeroes(offset, len, unmap)
    }
}

/// Checks that `[offset, offset + len)` lies inside a disk of `size` bytes.
fn check_range(offset: u64, len: u64, size: u64) -> Result<(), BackendError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(BackendError::OutOfRange { offset, len, size }),
    }
}

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

#[cfg(all(feature = "std", unix))]
pub use file::FileDisk;

#[cfg(all(feature = "std", unix))]
mod file {
    use core::sync::atomic::{AtomicBool, Ordering};
    use std::fs::{File, OpenOptions};
    use std::io;
    use std::os::unix::fs::FileExt;
    use std::path::Path;

    use super::{BackendError, BackendFeatures, BlockBackend, SECTOR_SIZE, check_range};

    /// Zeroes written per call when a range cannot be punched out.
    static ZEROES: [u8; 64 * 1024] = [0; 64 * 1024];

    /// A disk stored in a host file (or block device), accessed with
    /// positional reads and writes so queues never share a file offset.
    ///
    /// `flush` is `sync_data`. Discard and write-zeroes-with-unmap punch a
    /// hole (`fallocate(PUNCH_HOLE | KEEP_SIZE)`) on Linux; where the OS or
    /// the file system cannot, the range is overwritten with zeroes instead,
    /// which gives the same contents without releasing space.
    ///
    /// The disk size is the file's length when opened, rounded down to whole
    /// sectors; a trailing partial sector is never touched.
    ///
    /// # Example
    /// ```
    /// use vmio::virtio::blk::{BlockBackend, FileDisk};
    ///
    /// let path = std::env::temp_dir().join(format!("vmio-doc-{}.img", std::process::id()));
    /// std::fs::File::create(&path)?.set_len(1 << 20)?;
    /// let disk = FileDisk::open(&path, false)?;
    /// disk.write_at(512, b"persisted")?;
    /// disk.flush()?;
    /// assert_eq!(disk.size(), 1 << 20);
    /// # std::fs::remove_file(&path)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[derive(Debug)]
    pub struct FileDisk {
        file: File,
        size: u64,
        read_only: bool,
        /// Cleared the first time the file system refuses to punch a hole, so
        /// later discards go straight to writing zeroes. Relaxed: it is only
        /// a hint, and either path leaves the same contents.
        pub(super) punch_hole: AtomicBool,
    }

    impl FileDisk {
        /// Opens the file at `path`, read-only or read-write.
        ///
        /// # Errors
        /// Whatever opening the file or reading its length returns.
        pub fn open(path: impl AsRef<Path>, read_only: bool) -> io::Result<Self> {
            let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
            FileDisk::from_file(file, read_only)
        }

        /// Uses an already open file. `read_only` must be set if the file was
        /// not opened for writing.
        ///
        /// # Errors
        /// Whatever reading the file's length returns.
        pub fn from_file(file: File, read_only: bool) -> io::Result<Self> {
            let len = file.metadata()?.len();
            Ok(FileDisk {
                file,
                size: len - len % SECTOR_SIZE,
                read_only,
                punch_hole: AtomicBool::new(cfg!(target_os = "linux")),
            })
        }

        /// The underlying file.
        pub fn file(&self) -> &File {
            &self.file
        }

        fn check_write(&self, offset: u64, len: u64) -> Result<(), BackendError> {
            if self.read_only {
                return Err(BackendError::ReadOnly);
            }
            check_range(offset, len, self.size)
        }

        fn write_zero_bytes(&self, mut offset: u64, len: u64) -> Result<(), BackendError> {
            let end = offset + len;
            while offset < end {
                let n = (end - offset).min(ZEROES.len() as u64) as usize;
                self.file
                    .write_all_at(&ZEROES[..n], offset)
                    .map_err(|e| BackendError::io("write zeroes", &e))?;
                offset += n as u64;
            }
            Ok(())
        }

        /// Deallocates a checked range, or zeroes it where that is impossible.
        fn punch(&self, offset: u64, len: u64) -> Result<(), BackendError> {
            if len == 0 {
                return Ok(());
            }
            #[cfg(target_os = "linux")]
            if self.punch_hole.load(Ordering::Relaxed) {
                match punch_hole(&self.file, offset, len) {
                    Ok(()) => return Ok(()),
                    Err(e) if is_unsupported(&e) => self.punch_hole.store(false, Ordering::Relaxed),
                    Err(e) => return Err(BackendError::io("punch hole", &e)),
                }
            }
            self.write_zero_bytes(offset, len)
        }
    }

    /// `fallocate(PUNCH_HOLE | KEEP_SIZE)`: frees the blocks, keeps the file
    /// length, and later reads of the range return zeroes.
    #[cfg(target_os = "linux")]
    fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let (Ok(off), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        };
        // SAFETY: `fallocate` takes a file descriptor and plain integers and
        // touches no memory of ours; the descriptor stays open because `file`
        // is borrowed for the duration of the call.
        let ret = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                len,
            )
        };
        if ret == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
    }

    /// Errors meaning "this file (system) cannot punch holes", as opposed to
    /// an I/O failure.
    #[cfg(target_os = "linux")]
    fn is_unsupported(e: &io::Error) -> bool {
        matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::ENODEV))
    }

    impl BlockBackend for FileDisk {
        fn size(&self) -> u64 {
            self.size
        }

        fn features(&self) -> BackendFeatures {
            BackendFeatures {
                read_only: self.read_only,
                flush: true,
                discard: !self.read_only,
                write_zeroes: !self.read_only,
                write_zeroes_unmap: !self.read_only,
            }
        }

        fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
            check_range(offset, buf.len() as u64, self.size)?;
            self.file.read_exact_at(buf, offset).map_err(|e| BackendError::io("read", &e))
        }

        fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), BackendError> {
            self.check_write(offset, buf.len() as u64)?;
            self.file.write_all_at(buf, offset).map_err(|e| BackendError::io("write", &e))
        }

        fn flush(&self) -> Result<(), BackendError> {
            if self.read_only {
                return Ok(());
            }
            self.file.sync_data().map_err(|e| BackendError::io("flush", &e))
        }

        fn discard(&self, offset: u64, len: u64) -> Result<(), BackendError> {
            self.check_write(offset, len)?;
            self.punch(offset, len)
        }

        fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), BackendError> {
            self.check_write(offset, len)?;
            if unmap { self.punch(offset, len) } else { self.write_zero_bytes(offset, len) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the behaviour every writable backend must share.
    fn exercise(disk: &dyn BlockBackend) {
        let size = disk.size();
        assert!(size >= 64 * 1024 && size.is_multiple_of(SECTOR_SIZE));

        // Fresh disks read as zeroes.
        let mut buf = alloc::vec![0xffu8; 8192];
        disk.read_at(0, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));

        // A write spanning a chunk boundary reads back whole and leaves its
        // neighbours alone.
        let pattern: Vec<u8> = (0..6000u32).map(|i| (i * 7 + 3) as u8).collect();
        disk.write_at(3 * 512, &pattern).unwrap();
        let mut back = alloc::vec![0u8; 6000];
        disk.read_at(3 * 512, &mut back).unwrap();
        assert_eq!(back, pattern);
        let mut around = [0xaau8; 512];
        disk.read_at(2 * 512, &mut around).unwrap();
        assert!(around.iter().all(|&b| b == 0));

        // Out-of-range accesses are refused, including offset overflow.
        let mut one = [0u8; 512];
        assert!(matches!(disk.read_at(size, &mut one), Err(BackendError::OutOfRange { .. })));
        assert!(matches!(disk.read_at(size - 256, &mut one), Err(BackendError::OutOfRange { .. })));
        assert!(matches!(disk.write_at(u64::MAX - 10, &one), Err(BackendError::OutOfRange { .. })));
        assert!(matches!(disk.discard(size - 512, 1024), Err(BackendError::OutOfRange { .. })));
        // ... and did not disturb the last sector.
        disk.write_at(size - 512, &[9u8; 512]).unwrap();
        disk.read_at(size - 512, &mut one).unwrap();
        assert_eq!(one, [9u8; 512]);

        // The last byte of the disk is reachable.
        disk.read_at(size - 1, &mut one[..1]).unwrap();
        assert_eq!(one[0], 9);

        // Write zeroes with and without unmap, and discard, leave zeroes
        // (discarded contents are unspecified by the spec; both of ours zero).
        for (i, op) in [0u8, 1, 2].into_iter().enumerate() {
            let at = 16 * 1024 * (i as u64 + 1);
            disk.write_at(at, &[0x5a; 8192]).unwrap();
            match op {
                0 => disk.write_zeroes(at + 512, 4096 + 1024, false).unwrap(),
                1 => disk.write_zeroes(at + 512, 4096 + 1024, true).unwrap(),
                _ => disk.discard(at + 512, 4096 + 1024).unwrap(),
            }
            let mut got = [0u8; 8192];
            disk.read_at(at, &mut got).unwrap();
            assert!(got[..512].iter().all(|&b| b == 0x5a), "op {op}: head kept");
            assert!(got[512..512 + 5120].iter().all(|&b| b == 0), "op {op}: range zeroed");
            assert!(got[512 + 5120..].iter().all(|&b| b == 0x5a), "op {op}: tail kept");
        }
        disk.flush().unwrap();
    }

    #[test]
    fn ram_disk_behaves_like_a_disk() {
        let disk = RamDisk::new(256 * 1024 + 100);
        assert_eq!(disk.size(), 256 * 1024);
        exercise(&disk);
    }

    #[test]
    fn ram_disk_streams_straight_from_and_to_its_chunks() {
        let disk = RamDisk::new(64 * 1024 + 512);
        assert_eq!(disk.size(), 64 * 1024 + 512);
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 253) as u8).collect();
        let mut from = &data[..];
        let mut pieces = Vec::new();
        disk.write_from(1536, 10_000 - 10_000 % 512, &mut [], &mut |piece: &mut [u8]| {
            pieces.push(piece.len());
            let (head, rest) = from.split_at(piece.len());
            piece.copy_from_slice(head);
            from = rest;
            true
        })
        .unwrap();
        // Pieces follow the chunk boundaries: 2560 to the first, then pages.
        assert_eq!(pieces, [2560, 4096, 3072]);
        let mut back = Vec::new();
        disk.read_to(1536, 9728, &mut [], &mut |piece: &[u8]| {
            back.extend_from_slice(piece);
            true
        })
        .unwrap();
        assert_eq!(back, data[..9728]);
        // A sink or source that stops turns into Aborted.
        let stop = disk.read_to(0, 8192, &mut [], &mut |_: &[u8]| false);
        assert_eq!(stop, Err(BackendError::Aborted));
        let stop = disk.write_from(0, 8192, &mut [], &mut |_: &mut [u8]| false);
        assert_eq!(stop, Err(BackendError::Aborted));
        // The partial last chunk is reachable and bounded.
        disk.write_at(64 * 1024, &[3; 512]).unwrap();
        assert!(disk.write_at(64 * 1024 + 512, &[3; 1]).is_err());
    }

    #[test]
    fn default_streaming_goes_through_scratch() {
        // A backend with only the required methods: the trait's defaults
        // must stream through the caller's scratch in scratch-sized pieces.
        struct Plain(RamDisk);
        impl BlockBackend for Plain {
            fn size(&self) -> u64 {
                self.0.size()
            }
            fn features(&self) -> BackendFeatures {
                BackendFeatures::default()
            }
            fn read_at(&self, o: u64, b: &mut [u8]) -> Result<(), BackendError> {
                self.0.read_at(o, b)
            }
            fn write_at(&self, o: u64, b: &[u8]) -> Result<(), BackendError> {
                self.0.write_at(o, b)
            }
            fn flush(&self) -> Result<(), BackendError> {
                Ok(())
            }
        }
        let disk = Plain(RamDisk::new(64 * 1024));
        let mut scratch = [0u8; 1000];
        let mut n = 0u8;
        let mut sizes = Vec::new();
        disk.write_from(512, 2560, &mut scratch, &mut |p: &mut [u8]| {
            sizes.push(p.len());
            for b in p.iter_mut() {
                *b = n;
                n = n.wrapping_add(1);
            }
            true
        })
        .unwrap();
        assert_eq!(sizes, [1000, 1000, 560]);
        let mut back = Vec::new();
        disk.read_to(512, 2560, &mut scratch, &mut |p: &[u8]| {
            back.extend_from_slice(p);
            true
        })
        .unwrap();
        assert!(back.iter().enumerate().all(|(i, &b)| b == i as u8));
        assert_eq!(disk.discard(0, 512), Err(BackendError::Unsupported));
        assert_eq!(disk.write_zeroes(0, 512, false), Err(BackendError::Unsupported));
        let mut s = [0u8; 8];
        assert!(matches!(
            disk.read_to(65536 - 512, 1024, &mut s, &mut |_: &[u8]| true),
            Err(BackendError::OutOfRange { .. })
        ));
    }

    #[test]
    fn ram_disk_image_and_read_only() {
        let image: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        let disk = RamDisk::from_image(&image).read_only();
        assert_eq!(disk.size(), 5120);
        assert!(disk.features().read_only);
        let mut back = alloc::vec![0u8; 5120];
        disk.read_at(0, &mut back).unwrap();
        assert_eq!(&back[..5000], &image[..]);
        assert!(back[5000..].iter().all(|&b| b == 0));
        assert_eq!(disk.write_at(0, &[0; 512]), Err(BackendError::ReadOnly));
        assert_eq!(disk.discard(0, 512), Err(BackendError::ReadOnly));
        assert_eq!(disk.write_zeroes(0, 512, false), Err(BackendError::ReadOnly));
        disk.read_at(0, &mut back[..512]).unwrap();
        assert_eq!(&back[..512], &image[..512]);
    }

    #[cfg(all(feature = "std", unix))]
    mod file_disk {
        use super::*;
        use core::sync::atomic::Ordering;
        use std::path::PathBuf;

        /// A sparse temporary file removed on drop.
        struct TempImage(PathBuf);
        impl TempImage {
            fn new(tag: &str, len: u64) -> Self {
                let path = std::env::temp_dir()
                    .join(std::format!("vmio-backend-{tag}-{}.img", std::process::id()));
                std::fs::File::create(&path).unwrap().set_len(len).unwrap();
                TempImage(path)
            }
        }
        impl Drop for TempImage {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }

        #[test]
        fn file_disk_behaves_like_a_disk() {
            let img = TempImage::new("rw", 256 * 1024 + 77);
            let disk = FileDisk::open(&img.0, false).unwrap();
            assert_eq!(disk.size(), 256 * 1024);
            assert!(disk.features().flush && disk.features().discard);
            exercise(&disk);
            // Writes reached the file itself.
            drop(disk);
            let bytes = std::fs::read(&img.0).unwrap();
            assert_eq!(&bytes[256 * 1024 - 512..256 * 1024], &[9u8; 512][..]);
        }

        #[test]
        fn file_disk_read_only_refuses_writes() {
            let img = TempImage::new("ro", 64 * 1024);
            std::fs::write(&img.0, [7u8; 64 * 1024]).unwrap();
            let disk = FileDisk::open(&img.0, true).unwrap();
            let f = disk.features();
            assert!(f.read_only && !f.discard && !f.write_zeroes);
            assert_eq!(disk.write_at(0, &[0; 512]), Err(BackendError::ReadOnly));
            assert_eq!(disk.discard(0, 512), Err(BackendError::ReadOnly));
            disk.flush().unwrap();
            let mut b = [0u8; 512];
            disk.read_at(0, &mut b).unwrap();
            assert_eq!(b, [7; 512]);
        }

        #[cfg(target_os = "linux")]
        #[test]
        fn file_disk_discard_releases_blocks_where_supported() {
            use std::os::unix::fs::MetadataExt;
            let img = TempImage::new("punch", 4 << 20);
            let disk = FileDisk::open(&img.0, false).unwrap();
            disk.write_at(0, &alloc::vec![0x11u8; 4 << 20]).unwrap();
            disk.flush().unwrap();
            let before = std::fs::metadata(&img.0).unwrap().blocks();
            disk.discard(1 << 20, 2 << 20).unwrap();
            let after = std::fs::metadata(&img.0).unwrap().blocks();
            if disk.punch_hole.load(Ordering::Relaxed) {
                // The file system punched: at least most of 2 MiB came back.
                assert!(after + 3000 <= before, "blocks {before} -> {after}");
            } else {
                assert_eq!(after, before);
            }
            let mut b = alloc::vec![0xffu8; 2 << 20];
            disk.read_at(1 << 20, &mut b).unwrap();
            assert!(b.iter().all(|&x| x == 0));
            assert_eq!(std::fs::metadata(&img.0).unwrap().len(), 4 << 20, "size kept");
        }
    }
}
