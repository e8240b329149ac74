//! virtio-blk: a block device on virtio queues, with one lock per queue.
//!
//! [`VirtioBlk`] implements [`VirtioDevice`]; put it behind the virtio-mmio
//! transport to plug it into an MMIO bus. It serves the requests IN, OUT,
//! FLUSH, GET_ID, DISCARD and WRITE_ZEROES from a [`BlockBackend`]:
//! [`RamDisk`] (no_std) or [`FileDisk`] (std, Unix).
//!
//! # Features
//!
//! Each is offered only when [`BlkConfig`] asks for it and the backend can
//! serve it: VERSION_1, RING_EVENT_IDX, INDIRECT_DESC, SIZE_MAX, SEG_MAX,
//! BLK_SIZE, TOPOLOGY, FLUSH, CONFIG_WCE (only with FLUSH), RO (configured or
//! a read-only backend), MQ (more than one queue), DISCARD and WRITE_ZEROES
//! (backend support, never on a read-only disk).
//!
//! # Locking
//!
//! Each queue has its own lock, held while that queue's requests run; a
//! notify on queue k takes queue k's lock and nothing else. No device-wide
//! lock exists on the request path: the configuration is immutable and the
//! cache mode (`writeback`) is an atomic. [`activate`](VirtioDevice::activate)
//! and [`reset`](VirtioDevice::reset) take the queue locks one at a time, in
//! index order, never two at once. The backend's own locks (a [`RamDisk`]'s
//! chunk locks) are taken inside a queue lock, never the other way round.

mod backend;
mod request;

use alloc::boxed::Box;
use alloc::sync::Arc;
use core::fmt;
use core::sync::atomic::{AtomicU8, Ordering};

use arrayvec::ArrayVec;

use crate::sync::Mutex;
use crate::virtio::features::{
    VIRTIO_F_INDIRECT_DESC, VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1,
};
use crate::virtio::{
    ActivateError, Activation, DEFAULT_SEGMENTS, GuestMemory, Interrupt, InterruptCause,
    MAX_QUEUE_SIZE, PopError, QueueStop, SplitQueue, VirtioDevice, device_type,
};

#[cfg(all(feature = "std", unix))]
pub use backend::FileDisk;
pub use backend::{BackendError, BackendFeatures, BlockBackend, RamDisk, SECTOR_SIZE};
pub use request::{
    ID_LEN, MAX_DWZ_SEGMENTS, S_IOERR, S_OK, S_UNSUPP, T_DISCARD, T_FLUSH, T_GET_ID, T_IN, T_OUT,
    T_WRITE_ZEROES,
};

use request::{Context, Limits};

/// virtio-blk feature bits (virtio 1.2, 5.2.3).
pub mod features {
    /// `size_max` holds the largest single buffer.
    pub const VIRTIO_BLK_F_SIZE_MAX: u64 = 1 << 1;
    /// `seg_max` holds the most data buffers per request.
    pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
    /// The disk is read-only.
    pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
    /// `blk_size` holds the optimal block size.
    pub const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
    /// FLUSH requests are served.
    pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
    /// `topology` is valid.
    pub const VIRTIO_BLK_F_TOPOLOGY: u64 = 1 << 10;
    /// The driver may switch the cache between writeback and writethrough.
    pub const VIRTIO_BLK_F_CONFIG_WCE: u64 = 1 << 11;
    /// More than one request queue; `num_queues` says how many.
    pub const VIRTIO_BLK_F_MQ: u64 = 1 << 12;
    /// DISCARD requests are served.
    pub const VIRTIO_BLK_F_DISCARD: u64 = 1 << 13;
    /// WRITE_ZEROES requests are served.
    pub const VIRTIO_BLK_F_WRITE_ZEROES: u64 = 1 << 14;
}
use features::*;

/// Byte offsets of the fields of the virtio-blk configuration space.
pub mod config_offset {
    /// `capacity: u64`, in 512-byte sectors.
    pub const CAPACITY: usize = 0;
    /// `size_max: u32`.
    pub const SIZE_MAX: usize = 8;
    /// `seg_max: u32`.
    pub const SEG_MAX: usize = 12;
    /// `blk_size: u32`.
    pub const BLK_SIZE: usize = 20;
    /// `topology.physical_block_exp: u8`.
    pub const PHYSICAL_BLOCK_EXP: usize = 24;
    /// `topology.alignment_offset: u8`.
    pub const ALIGNMENT_OFFSET: usize = 25;
    /// `topology.min_io_size: u16`.
    pub const MIN_IO_SIZE: usize = 26;
    /// `topology.opt_io_size: u32`.
    pub const OPT_IO_SIZE: usize = 28;
    /// `writeback: u8`: 1 writeback, 0 writethrough.
    pub const WRITEBACK: usize = 32;
    /// `num_queues: u16`.
    pub const NUM_QUEUES: usize = 34;
    /// `max_discard_sectors: u32`.
    pub const MAX_DISCARD_SECTORS: usize = 36;
    /// `max_discard_seg: u32`.
    pub const MAX_DISCARD_SEG: usize = 40;
    /// `discard_sector_alignment: u32`.
    pub const DISCARD_SECTOR_ALIGNMENT: usize = 44;
    /// `max_write_zeroes_sectors: u32`.
    pub const MAX_WRITE_ZEROES_SECTORS: usize = 48;
    /// `max_write_zeroes_seg: u32`.
    pub const MAX_WRITE_ZEROES_SEG: usize = 52;
    /// `write_zeroes_may_unmap: u8`.
    pub const WRITE_ZEROES_MAY_UNMAP: usize = 56;
    /// Size of the configuration space (padded to 4 bytes).
    pub const LEN: usize = 60;
}

/// Most data buffers a request may have: the chain capacity the queue pops
/// into, less the header and status descriptors.
pub const MAX_SEG_MAX: u32 = DEFAULT_SEGMENTS as u32 - 2;

/// Bytes of each queue's host bounce buffer (allocated once, at
/// activation): requests larger than this take several backend calls.
const SCRATCH_LEN: usize = 64 * 1024;

/// Completions gathered before `used.idx` is published.
const USED_BATCH: usize = 32;

/// The disk's I/O geometry hints (`VIRTIO_BLK_F_TOPOLOGY`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Topology {
    /// log2 of logical blocks per physical block.
    pub physical_block_exp: u8,
    /// Offset of the first aligned logical block.
    pub alignment_offset: u8,
    /// Suggested minimum I/O size, in logical blocks.
    pub min_io_size: u16,
    /// Optimal (and maximum) I/O size, in logical blocks.
    pub opt_io_size: u32,
}

/// How a [`VirtioBlk`] presents itself. Start from [`BlkConfig::default`]
/// and change what you need; [`VirtioBlk::new`] checks the result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlkConfig {
    /// Request queues (1 ..= 1024); more than one offers MQ.
    pub num_queues: u16,
    /// QueueNumMax of every queue: a power of two ≤ 32768.
    pub queue_size: u16,
    /// Refuse writes even if the backend accepts them (offers RO).
    pub read_only: bool,
    /// Offer FLUSH (when the backend supports it).
    pub flush: bool,
    /// Offer CONFIG_WCE (requires FLUSH).
    pub config_wce: bool,
    /// Initial cache mode: writeback (`true`) or writethrough.
    pub writeback: bool,
    /// Offer DISCARD (when the backend supports it and the disk is writable).
    pub discard: bool,
    /// Offer WRITE_ZEROES (same conditions).
    pub write_zeroes: bool,
    /// Most data buffers per request (SEG_MAX), 1 ..= [`MAX_SEG_MAX`].
    pub seg_max: Option<u32>,
    /// Largest single buffer in bytes (SIZE_MAX), at least 512.
    pub size_max: Option<u32>,
    /// Block size to report (BLK_SIZE): a power of two ≥ 512.
    pub blk_size: Option<u32>,
    /// Topology to report (TOPOLOGY).
    pub topology: Option<Topology>,
    /// Largest discard segment in sectors (≥ 1).
    pub max_discard_sectors: u32,
    /// Most discard segments per request, 1 ..= [`MAX_DWZ_SEGMENTS`].
    pub max_discard_seg: u32,
    /// Discard alignment hint, in sectors.
    pub discard_sector_alignment: u32,
    /// Largest write-zeroes segment in sectors (≥ 1).
    pub max_write_zeroes_sectors: u32,
    /// Most write-zeroes segments per request, 1 ..= [`MAX_DWZ_SEGMENTS`].
    pub max_write_zeroes_seg: u32,
    /// Let write-zeroes with the unmap flag deallocate (if the backend can).
    pub write_zeroes_may_unmap: bool,
    /// Offer RING_EVENT_IDX.
    pub event_idx: bool,
    /// Offer INDIRECT_DESC.
    pub indirect_desc: bool,
    /// The GET_ID answer: up to 20 bytes, NUL-padded.
    pub id: [u8; ID_LEN],
}

impl Default for BlkConfig {
    fn default() -> Self {
        let mut id = [0u8; ID_LEN];
        id[..8].copy_from_slice(b"vmio-blk");
        BlkConfig {
            num_queues: 1,
            queue_size: 256,
            read_only: false,
            flush: true,
            config_wce: true,
            writeback: true,
            discard: true,
            write_zeroes: true,
            seg_max: Some(MAX_SEG_MAX),
            size_max: Some(1 << 20),
            blk_size: Some(512),
            topology: None,
            max_discard_sectors: 1 << 22,
            max_discard_seg: 16,
            discard_sector_alignment: 8,
            max_write_zeroes_sectors: 1 << 22,
            max_write_zeroes_seg: 16,
            write_zeroes_may_unmap: true,
            event_idx: true,
            indirect_desc: true,
            id,
        }
    }
}

impl BlkConfig {
    /// Sets the GET_ID string (truncated to 20 bytes, NUL-padded).
    #[must_use]
    pub fn with_id(mut self, id: &str) -> Self {
        self.id = [0; ID_LEN];
        let n = id.len().min(ID_LEN);
        self.id[..n].copy_from_slice(&id.as_bytes()[..n]);
        self
    }

    fn validate(&self) -> Result<(), BlkConfigError> {
        use BlkConfigError as E;
        if !(1..=1024).contains(&self.num_queues) {
            return Err(E::NumQueues(self.num_queues));
        }
        if !self.queue_size.is_power_of_two() || self.queue_size > MAX_QUEUE_SIZE {
            return Err(E::QueueSize(self.queue_size));
        }
        if let Some(n) = self.seg_max
            && (n == 0 || n > MAX_SEG_MAX)
        {
            return Err(E::SegMax(n));
        }
        if let Some(n) = self.size_max
            && n < SECTOR_SIZE as u32
        {
            return Err(E::SizeMax(n));
        }
        if let Some(n) = self.blk_size
            && (!n.is_power_of_two() || n < SECTOR_SIZE as u32)
        {
            return Err(E::BlkSize(n));
        }
        for (sectors, segs) in [
            (self.max_discard_sectors, self.max_discard_seg),
            (self.max_write_zeroes_sectors, self.max_write_zeroes_seg),
        ] {
            if sectors == 0 || segs == 0 || segs as usize > MAX_DWZ_SEGMENTS {
                return Err(E::DiscardLimits { sectors, segments: segs });
            }
        }
        if self.config_wce && !self.flush {
            return Err(E::WceWithoutFlush);
        }
        Ok(())
    }
}

/// A [`BlkConfig`] that cannot describe a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlkConfigError {
    /// `num_queues` is 0 or above 1024.
    NumQueues(u16),
    /// `queue_size` is not a power of two ≤ 32768.
    QueueSize(u16),
    /// `seg_max` is 0 or above [`MAX_SEG_MAX`].
    SegMax(u32),
    /// `size_max` is below one sector.
    SizeMax(u32),
    /// `blk_size` is not a power of two ≥ 512.
    BlkSize(u32),
    /// A discard / write-zeroes limit is 0, or allows more than
    /// [`MAX_DWZ_SEGMENTS`] segments.
    DiscardLimits {
        /// Sectors per segment.
        sectors: u32,
        /// Segments per request.
        segments: u32,
    },
    /// CONFIG_WCE asked for without FLUSH (the spec requires both).
    WceWithoutFlush,
    /// The backend holds no complete sector.
    EmptyDisk,
}

impl fmt::Display for BlkConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            BlkConfigError::NumQueues(n) => write!(f, "{n} queues (must be 1 to 1024)"),
            BlkConfigError::QueueSize(n) => {
                write!(f, "queue size {n} is not a power of two up to 32768")
            }
            BlkConfigError::SegMax(n) => write!(f, "seg_max {n} (must be 1 to {MAX_SEG_MAX})"),
            BlkConfigError::SizeMax(n) => write!(f, "size_max {n} is below one sector"),
            BlkConfigError::BlkSize(n) => write!(f, "blk_size {n} is not a power of two >= 512"),
            BlkConfigError::DiscardLimits { sectors, segments } => write!(
                f,
                "discard/write-zeroes limits {sectors} sectors x {segments} segments \
                 (need >= 1 of each, at most {MAX_DWZ_SEGMENTS} segments)"
            ),
            BlkConfigError::WceWithoutFlush => f.write_str("CONFIG_WCE requires FLUSH"),
            BlkConfigError::EmptyDisk => f.write_str("the backend holds no complete sector"),
        }
    }
}
impl core::error::Error for BlkConfigError {}

/// A queue the driver activated, with everything its requests need, so that
/// processing it touches nothing shared but the backend.
struct ActiveQueue {
    queue: SplitQueue,
    mem: Arc<dyn GuestMemory>,
    irq: Arc<dyn Interrupt>,
    limits: Limits,
    /// CONFIG_WCE was negotiated: the driver controls the cache mode.
    wce: bool,
    scratch: Box<[u8]>,
}

/// Keeps each queue's lock on its own cache lines, so vCPUs working on
/// different queues never bounce a line between them.
#[repr(align(128))]
struct Padded<T>(T);

/// A virtio-blk device over a [`BlockBackend`].
///
/// # Example
/// ```
/// use vmio::virtio::VirtioDevice;
/// use vmio::virtio::blk::{BlkConfig, RamDisk, VirtioBlk, features::VIRTIO_BLK_F_MQ};
///
/// let config = BlkConfig { num_queues: 4, ..BlkConfig::default() }.with_id("disk0");
/// let blk = VirtioBlk::new(RamDisk::new(64 << 20), config)?;
/// assert_eq!(blk.num_queues(), 4);
/// assert_ne!(blk.features() & VIRTIO_BLK_F_MQ, 0);
/// assert_eq!(blk.capacity(), (64 << 20) / 512);
/// # Ok::<(), vmio::virtio::blk::BlkConfigError>(())
/// ```
pub struct VirtioBlk<B> {
    backend: B,
    config: BlkConfig,
    offered: u64,
    /// The configuration space except `writeback`, which lives below.
    config_space: [u8; config_offset::LEN],
    /// Current cache mode, 1 writeback / 0 writethrough. Relaxed everywhere:
    /// it is a single byte with no data published through it; a request
    /// racing with the driver's switch may see either mode, as on hardware.
    writeback: AtomicU8,
    /// The backend implements flush (fixed for its lifetime).
    can_flush: bool,
    queues: Box<[Padded<Mutex<Option<ActiveQueue>>>]>,
}

impl<B> fmt::Debug for VirtioBlk<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VirtioBlk")
            .field("capacity", &self.capacity())
            .field("features", &format_args!("{:#x}", self.offered))
            .field("num_queues", &self.config.num_queues)
            .finish_non_exhaustive()
    }
}

impl<B: BlockBackend> VirtioBlk<B> {
    /// A device serving `backend` as `config` describes.
    ///
    /// # Errors
    /// [`BlkConfigError`] when `config` is inconsistent or the backend is
    /// smaller than one sector.
    pub fn new(backend: B, config: BlkConfig) -> Result<Self, BlkConfigError> {
        config.validate()?;
        if backend.size() < SECTOR_SIZE {
            return Err(BlkConfigError::EmptyDisk);
        }
        let offered = offered_features(&config, backend.features());
        let may_unmap = config.write_zeroes_may_unmap && backend.features().write_zeroes_unmap;
        let config_space = config_bytes(&config, backend.size() / SECTOR_SIZE, offered, may_unmap);
        let queues = (0..config.num_queues).map(|_| Padded(Mutex::new(None))).collect();
        Ok(VirtioBlk {
            writeback: AtomicU8::new(u8::from(config.writeback)),
            can_flush: backend.features().flush,
            backend,
            config,
            offered,
            config_space,
            queues,
        })
    }
}

impl<B> VirtioBlk<B> {
    /// The disk size in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        u64::from_le_bytes(self.config_space[..8].try_into().expect("8 bytes"))
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The configuration the device was built with.
    pub fn config(&self) -> &BlkConfig {
        &self.config
    }

    /// Whether the cache is in writeback mode (the driver may switch it
    /// with CONFIG_WCE).
    pub fn writeback(&self) -> bool {
        self.writeback.load(Ordering::Relaxed) != 0
    }
}

impl<B: BlockBackend> VirtioBlk<B> {
    /// Serves one queue until it is empty (or `stop` is requested),
    /// holding that queue's lock only.
    ///
    /// Notifications are off while the queue drains (the driver need not
    /// exit for buffers we are about to find), then back on, and the ring is
    /// checked once more: a buffer the driver added after the last pop but
    /// before notifications came back was not notified, and is found here.
    fn process_queue(&self, index: u16, active: &mut ActiveQueue, stop: &QueueStop) {
        let ActiveQueue { queue, mem, irq, limits, wce, scratch } = active;
        let mem: &dyn GuestMemory = &**mem;
        if queue.is_broken() {
            return;
        }
        let first_used = queue.next_used();
        let mut used = ArrayVec::<(u16, u32), USED_BATCH>::new();
        let mut failed = queue.disable_notification(mem).is_err();
        while !failed {
            if stop.is_requested() {
                // Stopping or resetting: leave the rest in the ring, but
                // with notifications on, as a resumed queue expects them.
                let _ = queue.enable_notification(mem);
                break;
            }
            let head_len = match queue.pop(mem) {
                Ok(Some(chain)) => {
                    let writethrough = self.writethrough(limits.flush, *wce);
                    let mut cx = Context {
                        mem,
                        backend: &self.backend,
                        limits,
                        id: &self.config.id,
                        writethrough,
                        scratch,
                    };
                    (chain.head(), request::process(&chain, &mut cx).used_len)
                }
                Ok(None) => {
                    // Drained: publish, then notifications back on and one
                    // more look (the re-check that keeps a notify from
                    // being lost).
                    if !used.is_empty() {
                        failed = queue.push_batch(mem, &used).is_err();
                        used.clear();
                        if failed {
                            break;
                        }
                    }
                    match queue.enable_notification(mem) {
                        Ok(false) => break,
                        Ok(true) => {
                            failed = queue.disable_notification(mem).is_err();
                            continue;
                        }
                        Err(_) => {
                            failed = true;
                            break;
                        }
                    }
                }
                Err(PopError::Chain { head, error }) => {
                    // Malformed beyond finding a status byte: hand the
                    // buffers back untouched and go on with the queue.
                    log::debug!("virtio-blk queue {index}: chain {head}: {error}");
                    (head, 0)
                }
                Err(PopError::Queue(e)) => {
                    log::warn!("virtio-blk queue {index} stopped: {e}");
                    failed = true;
                    break;
                }
            };
            used.push(head_len);
            if used.is_full() {
                // Whatever the outcome, these heads are not pushed twice.
                failed = queue.push_batch(mem, &used).is_err();
                used.clear();
            }
        }
        // Requests executed before a ring-breaking entry still complete:
        // a broken queue takes back the chains popped before the break.
        if !used.is_empty() && queue.push_batch(mem, &used).is_err() {
            failed = true;
        }
        if queue.is_broken() {
            // No interrupt suppression to consult on a broken ring: tell the
            // driver about what was published, then about the breakage.
            if queue.next_used() != first_used {
                irq.raise(InterruptCause::UsedBuffer { queue: index });
            }
            irq.needs_reset();
            return;
        }
        match queue.needs_interrupt(mem) {
            Ok(true) => irq.raise(InterruptCause::UsedBuffer { queue: index }),
            Ok(false) => {}
            Err(_) => failed = true,
        }
        if failed {
            irq.needs_reset();
        }
    }

    /// Whether a write must be followed by a flush before it completes.
    fn writethrough(&self, flush_negotiated: bool, wce: bool) -> bool {
        if !self.can_flush {
            return false;
        }
        // A driver that cannot flush must get durable writes; one that chose
        // writethrough through CONFIG_WCE likewise.
        !flush_negotiated || (wce && self.writeback.load(Ordering::Relaxed) == 0)
    }
}

/// Feature bits to offer for `config` over a backend with `backend`.
fn offered_features(config: &BlkConfig, backend: BackendFeatures) -> u64 {
    let read_only = config.read_only || backend.read_only;
    let flush = config.flush && backend.flush;
    let mut f = VIRTIO_F_VERSION_1;
    for (on, bit) in [
        (config.event_idx, VIRTIO_F_RING_EVENT_IDX),
        (config.indirect_desc, VIRTIO_F_INDIRECT_DESC),
        (config.size_max.is_some(), VIRTIO_BLK_F_SIZE_MAX),
        (config.seg_max.is_some(), VIRTIO_BLK_F_SEG_MAX),
        (config.blk_size.is_some(), VIRTIO_BLK_F_BLK_SIZE),
        (config.topology.is_some(), VIRTIO_BLK_F_TOPOLOGY),
        (flush, VIRTIO_BLK_F_FLUSH),
        (flush && config.config_wce, VIRTIO_BLK_F_CONFIG_WCE),
        (read_only, VIRTIO_BLK_F_RO),
        (config.num_queues > 1, VIRTIO_BLK_F_MQ),
        (config.discard && backend.discard && !read_only, VIRTIO_BLK_F_DISCARD),
        (config.write_zeroes && backend.write_zeroes && !read_only, VIRTIO_BLK_F_WRITE_ZEROES),
    ] {
        if on {
            f |= bit;
        }
    }
    f
}

/// The configuration space as the spec lays it out (little-endian). Fields
/// of features not offered stay zero.
fn config_bytes(
    config: &BlkConfig,
    capacity: u64,
    offered: u64,
    may_unmap: bool,
) -> [u8; config_offset::LEN] {
    use config_offset as o;
    let mut c = [0u8; o::LEN];
    let mut put = |at: usize, bytes: &[u8]| c[at..at + bytes.len()].copy_from_slice(bytes);
    put(o::CAPACITY, &capacity.to_le_bytes());
    if let Some(n) = config.size_max {
        put(o::SIZE_MAX, &n.to_le_bytes());
    }
    if let Some(n) = config.seg_max {
        put(o::SEG_MAX, &n.to_le_bytes());
    }
    if let Some(n) = config.blk_size {
        put(o::BLK_SIZE, &n.to_le_bytes());
    }
    if let Some(t) = config.topology {
        put(o::PHYSICAL_BLOCK_EXP, &[t.physical_block_exp]);
        put(o::ALIGNMENT_OFFSET, &[t.alignment_offset]);
        put(o::MIN_IO_SIZE, &t.min_io_size.to_le_bytes());
        put(o::OPT_IO_SIZE, &t.opt_io_size.to_le_bytes());
    }
    put(o::NUM_QUEUES, &config.num_queues.to_le_bytes());
    if offered & VIRTIO_BLK_F_DISCARD != 0 {
        put(o::MAX_DISCARD_SECTORS, &config.max_discard_sectors.to_le_bytes());
        put(o::MAX_DISCARD_SEG, &config.max_discard_seg.to_le_bytes());
        put(o::DISCARD_SECTOR_ALIGNMENT, &config.discard_sector_alignment.to_le_bytes());
    }
    if offered & VIRTIO_BLK_F_WRITE_ZEROES != 0 {
        put(o::MAX_WRITE_ZEROES_SECTORS, &config.max_write_zeroes_sectors.to_le_bytes());
        put(o::MAX_WRITE_ZEROES_SEG, &config.max_write_zeroes_seg.to_le_bytes());
        put(o::WRITE_ZEROES_MAY_UNMAP, &[u8::from(may_unmap)]);
    }
    c
}

impl<B: BlockBackend> VirtioDevice for VirtioBlk<B> {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn features(&self) -> u64 {
        self.offered
    }

    fn num_queues(&self) -> u16 {
        self.config.num_queues
    }

    fn max_queue_size(&self, _queue: u16) -> u16 {
        self.config.queue_size
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            let at = offset.checked_add(i as u64).and_then(|a| usize::try_from(a).ok());
            *byte = match at {
                Some(config_offset::WRITEBACK) => self.writeback.load(Ordering::Relaxed),
                Some(a) if a < config_offset::LEN => self.config_space[a],
                _ => 0,
            };
        }
    }

    fn write_config(&self, offset: u64, data: &[u8]) {
        // `writeback` is the only writable field, and only with CONFIG_WCE.
        if offset == config_offset::WRITEBACK as u64
            && data.len() == 1
            && self.offered & VIRTIO_BLK_F_CONFIG_WCE != 0
        {
            self.writeback.store(u8::from(data[0] != 0), Ordering::Relaxed);
        }
    }

    fn activate(&self, activation: Activation) -> Result<(), ActivateError> {
        let Activation { queues, memory, interrupt, features } = activation;
        if queues.first().is_none_or(Option::is_none) {
            return Err(ActivateError::MissingQueue(0));
        }
        let backend = self.backend.features();
        let limits = Limits {
            size: self.capacity() * SECTOR_SIZE,
            seg_max: self.config.seg_max.filter(|_| features & VIRTIO_BLK_F_SEG_MAX != 0),
            size_max: self.config.size_max.filter(|_| features & VIRTIO_BLK_F_SIZE_MAX != 0),
            // Offered RO binds the device whether or not the driver took it.
            read_only: self.offered & VIRTIO_BLK_F_RO != 0,
            flush: features & VIRTIO_BLK_F_FLUSH != 0,
            discard: (features & VIRTIO_BLK_F_DISCARD != 0)
                .then_some((self.config.max_discard_sectors, self.config.max_discard_seg)),
            write_zeroes: (features & VIRTIO_BLK_F_WRITE_ZEROES != 0).then_some((
                self.config.max_write_zeroes_sectors,
                self.config.max_write_zeroes_seg,
                self.config.write_zeroes_may_unmap && backend.write_zeroes_unmap,
            )),
        };
        let wce = features & VIRTIO_BLK_F_CONFIG_WCE != 0;
        for (slot, queue) in self.queues.iter().zip(queues) {
            let active = queue.map(|queue| ActiveQueue {
                queue,
                mem: memory.clone(),
                irq: interrupt.clone(),
                limits,
                wce,
                scratch: alloc::vec![0u8; SCRATCH_LEN].into_boxed_slice(),
            });
            *slot.0.lock() = active;
        }
        Ok(())
    }

    fn serve(&self, queue: u16, stop: &QueueStop) {
        let Some(slot) = self.queues.get(usize::from(queue)) else {
            return;
        };
        let mut guard = slot.0.lock();
        if let Some(active) = guard.as_mut() {
            self.process_queue(queue, active, stop);
        }
    }

    fn reset(&self) {
        // Taking each lock waits for a serve in progress on that queue.
        for slot in self.queues.iter() {
            drop(slot.0.lock().take());
        }
        self.writeback.store(u8::from(self.config.writeback), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Buf, GuestAlloc, GuestQueue};
    use crate::virtio::{GuestRam, IrqEvent, RecordingIrq};
    use alloc::vec;
    use alloc::vec::Vec;
    use core::sync::atomic::AtomicU32;

    const RAM_BASE: u64 = 0x8000_0000;
    const RAM_SIZE: u64 = 4 << 20;
    const QSIZE: u16 = 128;

    /// A driver for one or more queues, talking to the device directly
    /// (the transport is covered by the integration tests).
    struct Rig<B: BlockBackend> {
        blk: VirtioBlk<B>,
        mem: Arc<GuestRam>,
        irq: Arc<RecordingIrq>,
        queues: Vec<GuestQueue>,
        alloc: GuestAlloc,
        features: u64,
    }

    impl<B: BlockBackend> Rig<B> {
        fn new(backend: B, config: BlkConfig) -> Self {
            let blk = VirtioBlk::new(backend, config).unwrap();
            let mem = Arc::new(GuestRam::new(RAM_BASE, RAM_SIZE).unwrap());
            let n = blk.num_queues();
            let mut queues = Vec::new();
            for q in 0..n {
                let base = RAM_BASE + u64::from(q) * 0x1_0000;
                let mut gq = GuestQueue::new(QSIZE, base);
                gq.init(&*mem).unwrap();
                queues.push(gq);
            }
            let alloc = GuestAlloc::new(RAM_BASE + (1 << 20), 3 << 20);
            Rig { blk, mem, irq: Arc::new(RecordingIrq::new()), queues, alloc, features: 0 }
        }

        fn activate(&mut self, features: u64) {
            self.features = features;
            let queues = self
                .queues
                .iter()
                .map(|gq| Some(SplitQueue::new(gq.config(), features, &*self.mem).unwrap()))
                .collect();
            self.blk
                .activate(Activation {
                    queues,
                    memory: self.mem.clone(),
                    interrupt: self.irq.clone(),
                    features,
                })
                .unwrap();
        }

        /// Adds a request and returns (head, status address).
        fn add(&mut self, q: usize, kind: u32, sector: u64, data: &[Buf]) -> (u16, u64) {
            let hdr = self.alloc.alloc(16, 16);
            let mut h = [0u8; 16];
            h[..4].copy_from_slice(&kind.to_le_bytes());
            h[8..].copy_from_slice(&sector.to_le_bytes());
            self.mem.write(hdr, &h).unwrap();
            let status = self.alloc.alloc(1, 1);
            self.mem.write(status, &[0xff]).unwrap();
            let mut bufs = vec![Buf::readable(hdr, 16)];
            bufs.extend_from_slice(data);
            bufs.push(Buf::writable(status, 1));
            let head = self.queues[q].add(&*self.mem, &bufs).unwrap();
            (head, status)
        }

        /// Runs one request to completion on queue `q`: (status, used len).
        fn request(&mut self, q: usize, kind: u32, sector: u64, data: &[Buf]) -> (u8, u32) {
            let (head, status) = self.add(q, kind, sector, data);
            self.blk.serve(q as u16, &QueueStop::new());
            let (id, len) = self.queues[q].pop_used(&*self.mem).unwrap().expect("completed");
            assert_eq!(id, u32::from(head));
            (self.mem.read_u8(status), len)
        }

        fn buffer(&mut self, data: &[u8]) -> u64 {
            let at = self.alloc.alloc(data.len() as u64, 16);
            self.mem.write(at, data).unwrap();
            at
        }
    }

    trait ReadU8 {
        fn read_u8(&self, addr: u64) -> u8;
    }
    impl ReadU8 for GuestRam {
        fn read_u8(&self, addr: u64) -> u8 {
            let mut b = [0];
            self.read(addr, &mut b).unwrap();
            b[0]
        }
    }

    fn config_u32(blk: &impl VirtioDevice, offset: usize) -> u32 {
        let mut b = [0u8; 4];
        blk.read_config(offset as u64, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn features_follow_config_and_backend() {
        let all = VirtioBlk::new(
            RamDisk::new(1 << 20),
            BlkConfig { num_queues: 2, ..Default::default() },
        )
        .unwrap()
        .features();
        for bit in [
            VIRTIO_F_VERSION_1,
            VIRTIO_F_RING_EVENT_IDX,
            VIRTIO_F_INDIRECT_DESC,
            VIRTIO_BLK_F_SIZE_MAX,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_CONFIG_WCE,
            VIRTIO_BLK_F_MQ,
            VIRTIO_BLK_F_DISCARD,
            VIRTIO_BLK_F_WRITE_ZEROES,
        ] {
            assert_ne!(all & bit, 0, "bit {}", bit.trailing_zeros());
        }
        assert_eq!(all & (VIRTIO_BLK_F_RO | VIRTIO_BLK_F_TOPOLOGY), 0);

        // Nothing optional: only VERSION_1.
        let bare = BlkConfig {
            flush: false,
            config_wce: false,
            discard: false,
            write_zeroes: false,
            seg_max: None,
            size_max: None,
            blk_size: None,
            event_idx: false,
            indirect_desc: false,
            ..Default::default()
        };
        let f = VirtioBlk::new(RamDisk::new(1 << 20), bare).unwrap().features();
        assert_eq!(f, VIRTIO_F_VERSION_1);

        // A read-only backend: RO, and nothing that writes.
        let f = VirtioBlk::new(RamDisk::new(1 << 20).read_only(), BlkConfig::default())
            .unwrap()
            .features();
        assert_ne!(f & VIRTIO_BLK_F_RO, 0);
        assert_eq!(f & (VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES), 0);

        // A backend without flush or discard: neither offered, nor WCE.
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
                Err(BackendError::Unsupported)
            }
        }
        let cfg = BlkConfig { topology: Some(Topology::default()), ..Default::default() };
        let f = VirtioBlk::new(Plain(RamDisk::new(1 << 20)), cfg).unwrap().features();
        let missing = VIRTIO_BLK_F_FLUSH
            | VIRTIO_BLK_F_CONFIG_WCE
            | VIRTIO_BLK_F_DISCARD
            | VIRTIO_BLK_F_WRITE_ZEROES
            | VIRTIO_BLK_F_MQ;
        assert_eq!(f & missing, 0);
        assert_ne!(f & VIRTIO_BLK_F_TOPOLOGY, 0);
    }

    #[test]
    fn config_is_validated() {
        let disk = || RamDisk::new(1 << 20);
        let bad = [
            (BlkConfig { num_queues: 0, ..Default::default() }, BlkConfigError::NumQueues(0)),
            (BlkConfig { queue_size: 100, ..Default::default() }, BlkConfigError::QueueSize(100)),
            (BlkConfig { seg_max: Some(0), ..Default::default() }, BlkConfigError::SegMax(0)),
            (BlkConfig { seg_max: Some(63), ..Default::default() }, BlkConfigError::SegMax(63)),
            (BlkConfig { size_max: Some(100), ..Default::default() }, BlkConfigError::SizeMax(100)),
            (
                BlkConfig { blk_size: Some(1000), ..Default::default() },
                BlkConfigError::BlkSize(1000),
            ),
            (
                BlkConfig { max_discard_seg: 65, ..Default::default() },
                BlkConfigError::DiscardLimits { sectors: 1 << 22, segments: 65 },
            ),
            (
                BlkConfig { max_write_zeroes_sectors: 0, ..Default::default() },
                BlkConfigError::DiscardLimits { sectors: 0, segments: 16 },
            ),
            (BlkConfig { flush: false, ..Default::default() }, BlkConfigError::WceWithoutFlush),
        ];
        for (cfg, want) in bad {
            assert_eq!(VirtioBlk::new(disk(), cfg).unwrap_err(), want);
        }
        assert_eq!(
            VirtioBlk::new(RamDisk::new(100), BlkConfig::default()).unwrap_err(),
            BlkConfigError::EmptyDisk
        );
    }

    #[test]
    fn config_space_layout() {
        use config_offset as o;
        let cfg = BlkConfig {
            num_queues: 3,
            seg_max: Some(30),
            size_max: Some(65536),
            blk_size: Some(4096),
            topology: Some(Topology {
                physical_block_exp: 3,
                alignment_offset: 1,
                min_io_size: 8,
                opt_io_size: 256,
            }),
            max_discard_sectors: 1000,
            max_discard_seg: 4,
            discard_sector_alignment: 8,
            max_write_zeroes_sectors: 2000,
            max_write_zeroes_seg: 5,
            ..Default::default()
        };
        // 5 GiB: capacity needs both 32-bit halves.
        let blk = VirtioBlk::new(Sized5G, cfg).unwrap();
        let cap = (5u64 << 30) / 512;
        assert_eq!(config_u32(&blk, o::CAPACITY), cap as u32);
        assert_eq!(config_u32(&blk, o::CAPACITY + 4), (cap >> 32) as u32);
        let mut whole = [0u8; 8];
        blk.read_config(0, &mut whole);
        assert_eq!(u64::from_le_bytes(whole), cap);
        assert_eq!(config_u32(&blk, o::SIZE_MAX), 65536);
        assert_eq!(config_u32(&blk, o::SEG_MAX), 30);
        assert_eq!(config_u32(&blk, o::BLK_SIZE), 4096);
        let mut topo = [0u8; 8];
        blk.read_config(o::PHYSICAL_BLOCK_EXP as u64, &mut topo);
        assert_eq!(topo, [3, 1, 8, 0, 0, 1, 0, 0]);
        let mut two = [0u8; 2];
        blk.read_config(o::NUM_QUEUES as u64, &mut two);
        assert_eq!(u16::from_le_bytes(two), 3);
        assert_eq!(config_u32(&blk, o::MAX_DISCARD_SECTORS), 1000);
        assert_eq!(config_u32(&blk, o::MAX_DISCARD_SEG), 4);
        assert_eq!(config_u32(&blk, o::DISCARD_SECTOR_ALIGNMENT), 8);
        assert_eq!(config_u32(&blk, o::MAX_WRITE_ZEROES_SECTORS), 2000);
        assert_eq!(config_u32(&blk, o::MAX_WRITE_ZEROES_SEG), 5);
        assert_eq!(config_u32(&blk, o::WRITE_ZEROES_MAY_UNMAP), 1);
        // Past the end reads zero, including offsets that would overflow.
        assert_eq!(config_u32(&blk, o::LEN), 0);
        let mut b = [0xffu8; 4];
        blk.read_config(u64::MAX - 1, &mut b);
        assert_eq!(b, [0; 4]);

        // writeback: 1 by default, writable with CONFIG_WCE, other fields not.
        assert_eq!(config_u32(&blk, o::WRITEBACK) & 0xff, 1);
        blk.write_config(o::WRITEBACK as u64, &[0]);
        assert_eq!(config_u32(&blk, o::WRITEBACK) & 0xff, 0);
        assert!(!blk.writeback());
        blk.write_config(o::CAPACITY as u64, &[1, 2, 3, 4]);
        blk.write_config(o::WRITEBACK as u64, &[1, 1]);
        assert_eq!(config_u32(&blk, o::CAPACITY), cap as u32);
        assert!(!blk.writeback(), "a 2-byte write is not the 1-byte field");
        blk.reset();
        assert!(blk.writeback(), "reset restores the configured mode");

        // Without WCE the field is read-only.
        let cfg = BlkConfig { config_wce: false, ..Default::default() };
        let blk = VirtioBlk::new(RamDisk::new(1 << 20), cfg).unwrap();
        blk.write_config(o::WRITEBACK as u64, &[0]);
        assert!(blk.writeback());
    }

    /// A 5 GiB disk of zeroes that stores nothing.
    struct Sized5G;
    impl BlockBackend for Sized5G {
        fn size(&self) -> u64 {
            5 << 30
        }
        fn features(&self) -> BackendFeatures {
            BackendFeatures {
                flush: true,
                discard: true,
                write_zeroes: true,
                write_zeroes_unmap: true,
                ..Default::default()
            }
        }
        fn read_at(&self, _: u64, b: &mut [u8]) -> Result<(), BackendError> {
            b.fill(0);
            Ok(())
        }
        fn write_at(&self, _: u64, _: &[u8]) -> Result<(), BackendError> {
            Ok(())
        }
        fn flush(&self) -> Result<(), BackendError> {
            Ok(())
        }
    }

    fn all_features(blk: &impl VirtioDevice) -> u64 {
        blk.features()
    }

    #[test]
    fn requests_flow_through_queues_and_interrupt() {
        let mut rig =
            Rig::new(RamDisk::new(1 << 20), BlkConfig { num_queues: 2, ..Default::default() });
        rig.activate(all_features(&rig.blk));
        let data: Vec<u8> = (0..8192u32).map(|i| (i * 31 + 7) as u8).collect();
        let buf = rig.buffer(&data);
        assert_eq!(rig.request(0, T_OUT, 16, &[Buf::readable(buf, 8192)]), (S_OK, 1));
        assert_eq!(rig.irq.used_count(0), 1);
        let back = rig.buffer(&[0u8; 8192]);
        // Read on the other queue, split over two buffers.
        let r = rig.request(
            1,
            T_IN,
            16,
            &[Buf::writable(back, 4096), Buf::writable(back + 4096, 4096)],
        );
        assert_eq!(r, (S_OK, 8193));
        assert_eq!(rig.irq.used_count(1), 1);
        let mut got = vec![0u8; 8192];
        rig.mem.read(back, &mut got).unwrap();
        assert_eq!(got, data);

        let id = rig.buffer(&[0u8; 20]);
        assert_eq!(rig.request(0, T_GET_ID, 0, &[Buf::writable(id, 20)]), (S_OK, 21));
        let mut got = [0u8; 20];
        rig.mem.read(id, &mut got).unwrap();
        assert_eq!(&got[..9], b"vmio-blk\0");
        assert_eq!(rig.request(0, T_FLUSH, 0, &[]).0, S_OK);
        assert_eq!(rig.request(0, 99, 0, &[]).0, S_UNSUPP);
        assert_eq!(rig.request(0, T_IN, 1 << 11, &[Buf::writable(back, 512)]).0, S_IOERR);
    }

    #[test]
    fn batches_complete_in_one_pass() {
        let mut rig = Rig::new(RamDisk::new(1 << 20), BlkConfig::default());
        rig.activate(VIRTIO_F_VERSION_1);
        let buf = rig.buffer(&[0u8; 512]);
        let mut heads = Vec::new();
        for i in 0..40 {
            heads.push(rig.add(0, T_IN, i, &[Buf::writable(buf, 512)]));
        }
        rig.blk.serve(0, &QueueStop::new());
        let mut done = Vec::new();
        while let Some((id, len)) = rig.queues[0].pop_used(&*rig.mem).unwrap() {
            assert_eq!(len, 513);
            done.push(id as u16);
        }
        assert_eq!(done, heads.iter().map(|h| h.0).collect::<Vec<_>>());
        for (_, status) in heads {
            assert_eq!(rig.mem.read_u8(status), S_OK);
        }
        // More than USED_BATCH completions, one interrupt: the driver sees
        // them all when it is woken.
        assert_eq!(rig.irq.used_count(0), 1);
    }

    #[test]
    fn malformed_chain_goes_back_with_len_zero_and_queue_goes_on() {
        let mut rig = Rig::new(RamDisk::new(1 << 20), BlkConfig::default());
        rig.activate(VIRTIO_F_VERSION_1);
        let buf = rig.buffer(&[0u8; 512]);
        // A chain pointing outside guest RAM: the queue rejects it whole.
        let head = rig.queues[0]
            .add(&*rig.mem, &[Buf::readable(0x10, 16), Buf::writable(buf, 1)])
            .unwrap();
        rig.blk.serve(0, &QueueStop::new());
        assert_eq!(rig.queues[0].pop_used(&*rig.mem).unwrap(), Some((u32::from(head), 0)));
        assert_eq!(rig.mem.read_u8(buf), 0, "nothing written");
        // The next request is served normally.
        assert_eq!(rig.request(0, T_IN, 0, &[Buf::writable(buf, 512)]), (S_OK, 513));
        assert!(!rig.irq.events().contains(&IrqEvent::NeedsReset));
    }

    #[test]
    fn broken_ring_asks_for_reset() {
        let mut rig = Rig::new(RamDisk::new(1 << 20), BlkConfig::default());
        rig.activate(VIRTIO_F_VERSION_1);
        // avail.idx jumps further ahead than the queue holds.
        rig.queues[0].set_avail_idx(&*rig.mem, QSIZE + 5).unwrap();
        rig.blk.serve(0, &QueueStop::new());
        assert!(rig.irq.events().contains(&IrqEvent::NeedsReset));
        // Later notifies stay quiet, and a reset + reactivation recovers.
        let before = rig.irq.events().len();
        rig.blk.serve(0, &QueueStop::new());
        assert_eq!(rig.irq.events().len(), before);
        rig.blk.reset();
        rig.queues[0].init(&*rig.mem).unwrap();
        rig.activate(VIRTIO_F_VERSION_1);
        let buf = rig.buffer(&[0u8; 512]);
        assert_eq!(rig.request(0, T_IN, 0, &[Buf::writable(buf, 512)]).0, S_OK);
    }

    #[test]
    fn notify_before_activation_or_after_reset_does_nothing() {
        let mut rig =
            Rig::new(RamDisk::new(1 << 20), BlkConfig { num_queues: 2, ..Default::default() });
        let buf = rig.buffer(&[0u8; 512]);
        rig.add(0, T_IN, 0, &[Buf::writable(buf, 512)]);
        rig.blk.serve(0, &QueueStop::new());
        rig.blk.serve(7, &QueueStop::new()); // no such queue
        assert_eq!(rig.queues[0].used_idx(&*rig.mem).unwrap(), 0);
        rig.activate(VIRTIO_F_VERSION_1);
        rig.blk.reset();
        rig.blk.serve(0, &QueueStop::new());
        assert_eq!(rig.queues[0].used_idx(&*rig.mem).unwrap(), 0);
        assert!(rig.irq.events().is_empty());
    }

    #[test]
    fn activation_needs_queue_zero() {
        let rig =
            Rig::new(RamDisk::new(1 << 20), BlkConfig { num_queues: 2, ..Default::default() });
        let q1 = SplitQueue::new(rig.queues[1].config(), 0, &*rig.mem).unwrap();
        let err = rig.blk.activate(Activation {
            queues: vec![None, Some(q1)],
            memory: rig.mem.clone(),
            interrupt: rig.irq.clone(),
            features: VIRTIO_F_VERSION_1,
        });
        assert_eq!(err.unwrap_err(), ActivateError::MissingQueue(0));
    }

    /// RAM disk counting flushes, failing reads of sector 13.
    struct Counting {
        disk: RamDisk,
        flushes: AtomicU32,
    }
    impl BlockBackend for Counting {
        fn size(&self) -> u64 {
            self.disk.size()
        }
        fn features(&self) -> BackendFeatures {
            self.disk.features()
        }
        fn read_at(&self, o: u64, b: &mut [u8]) -> Result<(), BackendError> {
            if o == 13 * 512 {
                return Err(BackendError::Io { op: "read", os_error: Some(5) });
            }
            self.disk.read_at(o, b)
        }
        fn write_at(&self, o: u64, b: &[u8]) -> Result<(), BackendError> {
            self.disk.write_at(o, b)
        }
        fn flush(&self) -> Result<(), BackendError> {
            self.flushes.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    }

    #[test]
    fn cache_mode_and_backend_errors() {
        let backend = Counting { disk: RamDisk::new(1 << 20), flushes: AtomicU32::new(0) };
        let mut rig = Rig::new(backend, BlkConfig::default());
        let f = all_features(&rig.blk);
        rig.activate(f);
        let flushes = |rig: &Rig<Counting>| rig.blk.backend().flushes.load(Ordering::Relaxed);
        let buf = rig.buffer(&[7u8; 512]);
        assert_eq!(rig.request(0, T_OUT, 0, &[Buf::readable(buf, 512)]).0, S_OK);
        assert_eq!(flushes(&rig), 0, "writeback: no flush per write");
        rig.blk.write_config(config_offset::WRITEBACK as u64, &[0]);
        assert_eq!(rig.request(0, T_OUT, 0, &[Buf::readable(buf, 512)]).0, S_OK);
        assert_eq!(flushes(&rig), 1, "writethrough: one flush per write");

        // A backend read error is IOERR for that request only.
        assert_eq!(rig.request(0, T_IN, 13, &[Buf::writable(buf, 512)]), (S_IOERR, 1));
        assert_eq!(rig.request(0, T_IN, 12, &[Buf::writable(buf, 512)]), (S_OK, 513));

        // A driver that did not negotiate FLUSH gets writethrough.
        rig.blk.reset();
        rig.blk.backend().flushes.store(0, Ordering::Relaxed);
        for q in &mut rig.queues {
            q.init(&*rig.mem).unwrap();
        }
        rig.activate(VIRTIO_F_VERSION_1);
        assert_eq!(rig.request(0, T_OUT, 0, &[Buf::readable(buf, 512)]).0, S_OK);
        assert_eq!(flushes(&rig), 1);
        assert_eq!(rig.request(0, T_FLUSH, 0, &[]).0, S_UNSUPP, "FLUSH not negotiated");
    }

    #[test]
    fn event_idx_and_indirect_requests() {
        let mut rig = Rig::new(RamDisk::new(1 << 20), BlkConfig::default());
        rig.activate(all_features(&rig.blk));
        let data = [0x3cu8; 1024];
        let buf = rig.buffer(&data);
        // An indirect chain.
        let hdr = rig.buffer(&{
            let mut h = [0u8; 16];
            h[..4].copy_from_slice(&T_OUT.to_le_bytes());
            h[8..].copy_from_slice(&4u64.to_le_bytes());
            h
        });
        let status = rig.buffer(&[0xff]);
        let table = rig.alloc.alloc(48, 16);
        let bufs = [Buf::readable(hdr, 16), Buf::readable(buf, 1024), Buf::writable(status, 1)];
        let head = rig.queues[0].add_indirect(&*rig.mem, table, &bufs).unwrap();
        // Ask for an interrupt only after two completions.
        rig.queues[0].set_used_event(&*rig.mem, 1).unwrap();
        rig.blk.serve(0, &QueueStop::new());
        assert_eq!(rig.mem.read_u8(status), S_OK);
        assert_eq!(rig.irq.used_count(0), 0, "used_event not crossed");
        assert_eq!(rig.queues[0].pop_used(&*rig.mem).unwrap(), Some((u32::from(head), 1)));
        let back = rig.buffer(&[0u8; 1024]);
        assert_eq!(rig.request(0, T_IN, 4, &[Buf::writable(back, 1024)]), (S_OK, 1025));
        assert_eq!(rig.irq.used_count(0), 1);
        let mut got = [0u8; 1024];
        rig.mem.read(back, &mut got).unwrap();
        assert_eq!(got, data);
    }
}
