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
mod config;
mod request;

use alloc::boxed::Box;
use alloc::sync::Arc;
use core::fmt;
use core::sync::atomic::{AtomicU8, Ordering};

use crate::memory::GuestMemory;
use crate::sync::Mutex;
use crate::virtio::spec::blk::features::{VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD};
use crate::virtio::spec::blk::features::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_WRITE_ZEROES,
};
use crate::virtio::spec::blk::{SECTOR_SIZE, config_offset};
use crate::virtio::spec::device_type;
use crate::virtio::{
    ActivateError, Activation, Chain, ChainError, ChainHandler, DescriptorChain, Interrupt,
    QueueStop, SplitQueue, VirtioDevice, serve_queue,
};

#[cfg(all(feature = "std", unix))]
pub use backend::FileDisk;
pub use backend::{BackendError, BackendFeatures, BlockBackend, RamDisk};
pub use config::{BlkConfig, BlkConfigError, MAX_SEG_MAX, Topology};
pub use request::{MAX_DWZ_SEGMENTS, RequestHeader, RequestType};

use config::{config_bytes, offered_features};
use request::{Context, Limits};

/// Bytes of each queue's host bounce buffer (allocated once, at
/// activation): requests larger than this take several backend calls.
const SCRATCH_LEN: usize = 64 * 1024;

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
    /// The chain every pop refills: about 1 KiB that stays put instead of
    /// being moved out of the queue per request.
    chain: Chain,
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
/// use vmio::virtio::blk::{BlkConfig, RamDisk, VirtioBlk};
/// use vmio::virtio::spec::blk::features::VIRTIO_BLK_F_MQ;
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
    /// holding that queue's lock only: the crate's one serving loop, with
    /// each chain run as a virtio-blk request.
    fn process_queue(&self, index: u16, active: &mut ActiveQueue, stop: &QueueStop) {
        let ActiveQueue { queue, mem, irq, limits, wce, scratch, chain } = active;
        let mut handler =
            BlkHandler { blk: self, mem: &**mem, limits, wce: *wce, scratch, queue: index };
        if let Err(e) = serve_queue(queue, &**mem, &**irq, index, stop, chain, &mut handler) {
            log::warn!("virtio-blk queue {index} stopped: {e}");
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

/// Runs each popped chain as a virtio-blk request.
struct BlkHandler<'a, B> {
    blk: &'a VirtioBlk<B>,
    mem: &'a dyn GuestMemory,
    limits: &'a Limits,
    wce: bool,
    scratch: &'a mut [u8],
    queue: u16,
}

impl<B: BlockBackend, const N: usize> ChainHandler<N> for BlkHandler<'_, B> {
    #[inline]
    fn handle(&mut self, chain: &DescriptorChain<N>) -> u32 {
        // Per request: the driver may switch the cache mode between two.
        let writethrough = self.blk.writethrough(self.limits.flush, self.wce);
        let mut cx = Context {
            mem: self.mem,
            backend: &self.blk.backend,
            limits: self.limits,
            id: &self.blk.config.id,
            writethrough,
            scratch: self.scratch,
        };
        request::process(chain, &mut cx).used_len
    }

    fn rejected(&mut self, head: u16, error: ChainError) {
        log::debug!("virtio-blk queue {}: chain {head}: {error}", self.queue);
    }
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
                chain: Chain::new(),
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
    use crate::GuestRam;
    use crate::testing::{BackendOp, BlkRequest, Buf, FaultyDisk, GuestAlloc, GuestQueue};
    use crate::testing::{IrqEvent, RecordingIrq};
    use crate::virtio::spec::blk::features::*;
    use crate::virtio::spec::blk::{S_IOERR, S_OK, S_UNSUPP, T_FLUSH, T_GET_ID, T_IN, T_OUT};
    use crate::virtio::spec::features::*;
    use alloc::vec;
    use alloc::vec::Vec;
    use core::cell::Cell;

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
            BlkRequest::raw(kind, sector)
                .data(data)
                .add(&*self.mem, &mut self.alloc, &mut self.queues[q])
                .unwrap()
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
        let cfg = BlkConfig { topology: Some(Topology::default()), ..Default::default() };
        let plain = FaultyDisk::ram(1 << 20).with_features(BackendFeatures::default());
        let f = VirtioBlk::new(plain, cfg).unwrap().features();
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

    /// A serve issues one full fence (re-arming notifications and deciding
    /// on the interrupt share it), whatever the batch and with or without
    /// EVENT_IDX: a lost fence risks a lost wake-up, an extra one costs
    /// every notify.
    #[cfg(feature = "std")]
    #[test]
    fn a_serve_fences_once() {
        use crate::virtio::queue::full_fences;
        for features in [VIRTIO_F_VERSION_1, VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX] {
            let mut rig = Rig::new(RamDisk::new(1 << 20), BlkConfig::default());
            rig.activate(features);
            let buf = rig.buffer(&[0u8; 512]);
            for batch in [1, 5] {
                for i in 0..batch {
                    rig.add(0, T_IN, i, &[Buf::writable(buf, 512)]);
                }
                let before = full_fences();
                rig.blk.serve(0, &QueueStop::new());
                assert_eq!(full_fences() - before, 1, "batch {batch}, features {features:#x}");
                while rig.queues[0].pop_used(&*rig.mem).unwrap().is_some() {}
            }
        }
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

    /// A RAM disk whose sector 13 is unreadable.
    fn sector_13_unreadable() -> FaultyDisk {
        FaultyDisk::ram(1 << 20).on(|op| match op {
            BackendOp::Read { offset, .. } if offset == 13 * 512 => {
                Err(BackendError::Io { op: "read", os_error: Some(5) })
            }
            _ => Ok(()),
        })
    }

    #[test]
    fn cache_mode_and_backend_errors() {
        let mut rig = Rig::new(sector_13_unreadable(), BlkConfig::default());
        let f = all_features(&rig.blk);
        rig.activate(f);
        let flushes_before = Cell::new(0);
        let flushes = |rig: &Rig<FaultyDisk>| {
            rig.blk.backend().count(BackendOp::Flush) - flushes_before.get()
        };
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
        flushes_before.set(rig.blk.backend().count(BackendOp::Flush));
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
        let (hdr, status) = (rig.alloc.alloc(16, 16), rig.alloc.alloc(1, 1));
        let bufs = BlkRequest::raw(T_OUT, 4)
            .data(&[Buf::readable(buf, 1024)])
            .place(&*rig.mem, hdr, status)
            .unwrap();
        let table = rig.alloc.alloc(48, 16);
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
