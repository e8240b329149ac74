//! How a [`VirtioBlk`](super::VirtioBlk) presents itself: [`BlkConfig`],
//! its validation, the features it offers and the configuration space it
//! shows the driver.

use core::fmt;

use super::backend::BackendFeatures;
use super::request::MAX_DWZ_SEGMENTS;
use crate::virtio::queue::DEFAULT_SEGMENTS;
use crate::virtio::spec::blk::features::*;
use crate::virtio::spec::blk::{ID_LEN, SECTOR_SIZE, config_offset};
use crate::virtio::spec::features::{
    VIRTIO_F_INDIRECT_DESC, VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1,
};
use crate::virtio::spec::ring::MAX_QUEUE_SIZE;

/// Most data buffers a request may have: the chain capacity the queue pops
/// into, less the header and status descriptors.
pub const MAX_SEG_MAX: u32 = DEFAULT_SEGMENTS as u32 - 2;

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

/// How a [`VirtioBlk`](super::VirtioBlk) presents itself. Start from [`BlkConfig::default`]
/// and change what you need; [`VirtioBlk::new`](super::VirtioBlk::new) checks the result.
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

    pub(super) fn validate(&self) -> Result<(), BlkConfigError> {
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
#[non_exhaustive]
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

/// Feature bits to offer for `config` over a backend with `backend`.
pub(super) fn offered_features(config: &BlkConfig, backend: BackendFeatures) -> u64 {
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
pub(super) fn config_bytes(
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
