//! virtio-blk test helpers: the request builder every test lays requests out
//! with, and the fault-injecting backend every test wraps its disk in.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};

use super::queue::{Buf, DriverError, GuestAlloc, GuestQueue};
use crate::memory::{GuestMemory, MemoryError};
use crate::virtio::blk::{
    BackendError, BackendFeatures, BlockBackend, RamDisk, RequestHeader, RequestType,
};

/// One virtio-blk request as a driver lays it out: a 16-byte header the
/// device reads, the data buffers, and a status byte the device writes
/// (preset to 0xff so a test sees whether the device wrote it).
///
/// # Example
/// ```
/// use vmio::GuestRam;
/// use vmio::testing::{BlkRequest, Buf, GuestAlloc, GuestQueue};
/// use vmio::virtio::blk::RequestType;
///
/// let ram = GuestRam::new(0, 0x10_0000)?;
/// let mut q = GuestQueue::new(16, 0x1000);
/// q.init(&ram)?;
/// let mut alloc = GuestAlloc::new(0x1_0000, 0x1_0000);
/// let data = alloc.alloc(512, 512);
/// let (head, status) = BlkRequest::new(RequestType::In, 8)
///     .data(&[Buf::writable(data, 512)])
///     .add(&ram, &mut alloc, &mut q)?;
/// # let _ = (head, status);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlkRequest {
    header: RequestHeader,
    data: Vec<Buf>,
}

impl BlkRequest {
    /// A request of `request_type` at `sector`, with no data buffers yet.
    pub fn new(request_type: RequestType, sector: u64) -> Self {
        BlkRequest { header: RequestHeader::new(request_type, sector), data: Vec::new() }
    }

    /// A request whose header carries the raw type `raw` (for unknown or
    /// unnegotiated types).
    pub fn raw(raw: u32, sector: u64) -> Self {
        Self::new(RequestType::from_raw(raw), sector)
    }

    /// Sets the data buffers, between header and status.
    #[must_use]
    pub fn data(mut self, data: &[Buf]) -> Self {
        self.data = data.to_vec();
        self
    }

    /// The header.
    pub fn header(&self) -> RequestHeader {
        self.header
    }

    /// Writes the header at `header` and 0xff at `status`, and returns the
    /// chain's buffers: header (readable), data, status (writable).
    ///
    /// # Errors
    /// A [`MemoryError`] when either address is not guest RAM.
    pub fn place<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        header: u64,
        status: u64,
    ) -> Result<Vec<Buf>, MemoryError> {
        mem.write(header, &self.header.to_bytes())?;
        mem.write(status, &[0xff])?;
        let mut bufs = Vec::with_capacity(self.data.len() + 2);
        bufs.push(Buf::readable(header, RequestHeader::LEN as u32));
        bufs.extend_from_slice(&self.data);
        bufs.push(Buf::writable(status, 1));
        Ok(bufs)
    }

    /// Takes room for the header and status from `alloc`, places the
    /// request there and makes it available on `q` (published); returns the
    /// chain's head and the address of its status byte.
    ///
    /// # Errors
    /// A [`DriverError`] when `q` is full or memory refused an access.
    pub fn add<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        alloc: &mut GuestAlloc,
        q: &mut GuestQueue,
    ) -> Result<(u16, u64), DriverError> {
        let header = alloc.alloc(RequestHeader::LEN as u64, 16);
        let status = alloc.alloc(1, 1);
        let bufs = self.place(mem, header, status).map_err(DriverError::Memory)?;
        Ok((q.add(mem, &bufs)?, status))
    }
}

/// A backend operation, as a [`FaultyDisk`] hook sees it before it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendOp {
    /// `read_at` (or a piece of a streamed read).
    Read {
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: u64,
    },
    /// `write_at` (or a piece of a streamed write).
    Write {
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: u64,
    },
    /// `flush`.
    Flush,
    /// `discard`.
    Discard {
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: u64,
    },
    /// `write_zeroes`.
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: u64,
    },
}

impl BackendOp {
    const fn index(self) -> usize {
        match self {
            BackendOp::Read { .. } => 0,
            BackendOp::Write { .. } => 1,
            BackendOp::Flush => 2,
            BackendOp::Discard { .. } => 3,
            BackendOp::WriteZeroes { .. } => 4,
        }
    }
}

type Hook = Box<dyn Fn(BackendOp) -> Result<(), BackendError> + Send + Sync>;

/// A disk that injects faults: wraps a backend (a [`RamDisk`] by default),
/// counts every operation, and runs a hook before each that may fail it
/// (return an error), delay or block it (wait on whatever the test
/// arranges), or record who called. The features it reports can be
/// overridden, to model backends that lack flush or discard.
///
/// Streamed reads and writes go through `read_at` / `write_at` piece by
/// piece, so the hook sees every piece.
///
/// # Example
/// ```
/// use vmio::testing::{BackendOp, FaultyDisk};
/// use vmio::virtio::blk::{BackendError, BlockBackend};
///
/// // Sector 13 is unreadable.
/// let disk = FaultyDisk::ram(1 << 20).on(|op| match op {
///     BackendOp::Read { offset, .. } if offset == 13 * 512 => {
///         Err(BackendError::Io { op: "read", os_error: Some(5) })
///     }
///     _ => Ok(()),
/// });
/// let mut buf = [0u8; 512];
/// assert!(disk.read_at(12 * 512, &mut buf).is_ok());
/// assert!(disk.read_at(13 * 512, &mut buf).is_err());
/// assert_eq!(disk.count(BackendOp::Read { offset: 0, len: 0 }), 2);
/// ```
pub struct FaultyDisk<B = RamDisk> {
    inner: B,
    features: Option<BackendFeatures>,
    hook: Hook,
    counts: [AtomicU64; 5],
}

impl<B> fmt::Debug for FaultyDisk<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultyDisk").field("features", &self.features).finish_non_exhaustive()
    }
}

impl FaultyDisk<RamDisk> {
    /// A fault-free RAM disk of `size` bytes, to be given a hook.
    pub fn ram(size: u64) -> Self {
        Self::new(RamDisk::new(size))
    }
}

impl<B: BlockBackend> FaultyDisk<B> {
    /// Wraps `inner`, with no hook yet (every operation passes).
    pub fn new(inner: B) -> Self {
        FaultyDisk { inner, features: None, hook: Box::new(|_| Ok(())), counts: Default::default() }
    }

    /// Runs `hook` before every operation; an `Err` fails the operation
    /// without touching the disk.
    #[must_use]
    pub fn on(
        mut self,
        hook: impl Fn(BackendOp) -> Result<(), BackendError> + Send + Sync + 'static,
    ) -> Self {
        self.hook = Box::new(hook);
        self
    }

    /// Reports `features` instead of the wrapped backend's (operations a
    /// backend does not claim still reach it if a device asks).
    #[must_use]
    pub fn with_features(mut self, features: BackendFeatures) -> Self {
        self.features = Some(features);
        self
    }

    /// The wrapped backend.
    pub fn inner(&self) -> &B {
        &self.inner
    }

    /// How many operations of `op`'s kind (its fields are ignored) were
    /// attempted, failed ones included.
    pub fn count(&self, op: BackendOp) -> u64 {
        // Relaxed: a statistic read after the operations it counts.
        self.counts[op.index()].load(Ordering::Relaxed)
    }

    fn enter(&self, op: BackendOp) -> Result<(), BackendError> {
        // Relaxed: see `count`.
        self.counts[op.index()].fetch_add(1, Ordering::Relaxed);
        (self.hook)(op)
    }
}

impl<B: BlockBackend> BlockBackend for FaultyDisk<B> {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn features(&self) -> BackendFeatures {
        self.features.unwrap_or_else(|| self.inner.features())
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        self.enter(BackendOp::Read { offset, len: buf.len() as u64 })?;
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), BackendError> {
        self.enter(BackendOp::Write { offset, len: data.len() as u64 })?;
        self.inner.write_at(offset, data)
    }
    fn flush(&self) -> Result<(), BackendError> {
        self.enter(BackendOp::Flush)?;
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.enter(BackendOp::Discard { offset, len })?;
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), BackendError> {
        self.enter(BackendOp::WriteZeroes { offset, len })?;
        self.inner.write_zeroes(offset, len, unmap)
    }
}
