//! virtio: guest memory, interrupts, split virtqueues, the virtio-mmio
//! transport, and the [`VirtioDevice`] trait devices implement.
//!
//! The layers, bottom up:
//! - [`GuestMemory`] / [`GuestRam`] — bounds-checked guest physical memory.
//! - [`Interrupt`] / [`IrqLine`] — how a device raises its interrupt, and the
//!   line the VMM wires it to.
//! - [`SplitQueue`] — one split virtqueue, validated against hostile drivers.
//! - [`VirtioDevice`] — what a device (virtio-blk, …) implements: identity,
//!   features, config space, queues, serve, reset.
//! - the virtio-mmio transport, a [`Device`](crate::Device) on the MMIO bus
//!   that runs the register file and status machine for a `VirtioDevice`,
//!   and routes queue notifications ([`NotifyMode`]): served inline on the
//!   notifying vCPU, or handed to a per-queue [`QueueEvent`] that a worker
//!   ([`QueueWorkers`] with `std`, or the VMM's own event loop) waits on
//!   before calling [`MmioTransport::serve`] outside any bus read section.
//!
//! # Locking
//!
//! A transport keeps its register state (status, feature windows, queue
//! addresses being programmed) behind one lock of its own and never holds it
//! while a queue is processed. Each queue has a serve lock in the transport,
//! held for the whole of one [`VirtioDevice::serve`] call, so a queue is
//! served by one thread at a time and stopping it (QueueReady = 0, reset)
//! waits for the serve in progress; a device keeps each activated
//! [`SplitQueue`] behind its own lock too. A notify on queue k takes queue
//! k's locks only. Lock order: transport registers → queue k's serve lock →
//! device internals; a device never calls back into its transport.
//!
//! # Queue lifecycle
//!
//! A queue is *live* from DRIVER_OK (if the driver set it ready) until the
//! driver writes QueueReady = 0 or resets the device; only a live queue is
//! served, so the device never touches a virtqueue whose QueueReady reads 0
//! (virtio 1.2, 4.2.2.1). Stopping a queue, or resetting the device, asks a
//! serve in progress to end after the request it is executing
//! ([`QueueStop`]), waits for it, and publishes the completions of the
//! requests that ran: work in flight is **completed, never torn**, and
//! requests not yet started stay in the ring (cancelled by a reset, found
//! again when a stopped queue is set ready again).

pub mod blk;
pub mod irq;
pub mod memory;
pub mod mmio;
pub mod notify;
pub mod queue;
#[cfg(feature = "std")]
pub mod worker;

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::{AtomicBool, Ordering};

pub use irq::{
    INT_CONFIG_CHANGE, INT_USED_BUFFER, Interrupt, InterruptCause, InterruptStatus, IrqEvent,
    IrqLine, RecordingIrq, Trigger,
};
pub use memory::{GuestMemory, GuestRam, GuestRamError, MemoryError};
pub use mmio::{MmioTransport, QUEUE_NOTIFY_OFFSET};
#[cfg(feature = "std")]
pub use notify::CondvarEvent;
pub use notify::{NotifyMode, QueueEvent};
pub use queue::{
    Chain, ChainError, DEFAULT_SEGMENTS, DescriptorChain, MAX_QUEUE_SIZE, PopError, QueueArea,
    QueueConfig, QueueError, Segment, SplitQueue,
};
#[cfg(feature = "std")]
pub use worker::QueueWorkers;

/// Feature bits defined by the virtio spec for every device type.
pub mod features {
    /// The driver may use indirect descriptor tables.
    pub const VIRTIO_F_INDIRECT_DESC: u64 = 1 << 28;
    /// `used_event` / `avail_event` suppress interrupts and notifications.
    pub const VIRTIO_F_RING_EVENT_IDX: u64 = 1 << 29;
    /// virtio 1.x (not legacy); a modern device must offer it.
    pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
    /// The device sits behind an IOMMU.
    pub const VIRTIO_F_ACCESS_PLATFORM: u64 = 1 << 33;
    /// Packed virtqueues.
    pub const VIRTIO_F_RING_PACKED: u64 = 1 << 34;
    /// Buffers are used in the order they were made available.
    pub const VIRTIO_F_IN_ORDER: u64 = 1 << 35;
    /// Platform-specific memory ordering.
    pub const VIRTIO_F_ORDER_PLATFORM: u64 = 1 << 36;
    /// Single-root I/O virtualization.
    pub const VIRTIO_F_SR_IOV: u64 = 1 << 37;
    /// The driver passes extra data with notifications.
    pub const VIRTIO_F_NOTIFICATION_DATA: u64 = 1 << 38;
    /// The driver passes config data with notifications.
    pub const VIRTIO_F_NOTIF_CONFIG_DATA: u64 = 1 << 39;
    /// Individual queues can be reset.
    pub const VIRTIO_F_RING_RESET: u64 = 1 << 40;
}

/// Bits of the device status register.
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest knows how to drive the device.
    pub const DRIVER: u32 = 2;
    /// The driver is set up and ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    /// The guest gave up on the device.
    pub const FAILED: u32 = 128;
}

/// virtio device type numbers (the DeviceID register).
pub mod device_type {
    /// Network card.
    pub const NET: u32 = 1;
    /// Block device.
    pub const BLOCK: u32 = 2;
    /// Console.
    pub const CONSOLE: u32 = 3;
    /// Entropy source.
    pub const RNG: u32 = 4;
    /// Memory balloon.
    pub const BALLOON: u32 = 5;
    /// SCSI host.
    pub const SCSI: u32 = 8;
    /// 9P transport.
    pub const NINE_P: u32 = 9;
    /// Socket device.
    pub const VSOCK: u32 = 19;
}

/// Everything a device receives when the driver sets DRIVER_OK.
pub struct Activation {
    /// One entry per queue index (`num_queues` of them): the validated queue
    /// if the driver set it ready, `None` if it left it unused (Linux leaves
    /// queues beyond its CPU count unused).
    pub queues: Vec<Option<SplitQueue>>,
    /// The guest's memory.
    pub memory: Arc<dyn GuestMemory>,
    /// The device's interrupt.
    pub interrupt: Arc<dyn Interrupt>,
    /// The negotiated feature bits.
    pub features: u64,
}

impl fmt::Debug for Activation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Activation")
            .field("queues", &self.queues)
            .field("features", &format_args!("{:#x}", self.features))
            .finish_non_exhaustive()
    }
}

/// Why a device refused to activate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActivateError {
    /// A queue the device cannot work without was not set ready.
    MissingQueue(u16),
    /// The negotiated features are a combination the device cannot serve.
    Features(u64),
    /// The device failed for a reason of its own.
    Failed(&'static str),
}

impl fmt::Display for ActivateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ActivateError::MissingQueue(q) => write!(f, "queue {q} was not set up"),
            ActivateError::Features(v) => write!(f, "cannot work with features {v:#x}"),
            ActivateError::Failed(why) => f.write_str(why),
        }
    }
}
impl core::error::Error for ActivateError {}

/// Asks a [`VirtioDevice::serve`] in progress to end early: the transport
/// sets it when the queue is being stopped or the device reset, and clears
/// it once the serve has returned.
///
/// A device checks [`is_requested`](Self::is_requested) between requests:
/// it finishes the request it is executing, publishes what it completed,
/// and returns without starting the next one.
#[derive(Debug, Default)]
pub struct QueueStop(AtomicBool);

impl QueueStop {
    /// Not requested.
    pub const fn new() -> Self {
        QueueStop(AtomicBool::new(false))
    }

    /// Asks the serve to stop.
    pub fn request(&self) {
        // Relaxed: a hint polled by the serving thread; the transport's
        // serve lock, taken right after, is what orders the two threads.
        self.0.store(true, Ordering::Relaxed);
    }

    /// Withdraws the request.
    pub fn clear(&self) {
        // Relaxed: see `request`.
        self.0.store(false, Ordering::Relaxed);
    }

    /// Whether the serve should stop after its current request.
    pub fn is_requested(&self) -> bool {
        // Relaxed: see `request`.
        self.0.load(Ordering::Relaxed)
    }
}

/// A virtio device, independent of its transport.
///
/// Every method takes `&self`: different queues are served on different
/// threads at once (vCPUs, or workers), so the device keeps each queue
/// behind its own lock (see the [module docs](self#locking)). Config-space
/// calls come
/// from the transport with offsets relative to the start of the device
/// configuration and 1-, 2- or 4-byte aligned widths.
pub trait VirtioDevice: Send + Sync {
    /// The virtio device type ([`device_type`]).
    fn device_type(&self) -> u32;

    /// The vendor id reported to the driver. Drivers match on the device
    /// type, not the vendor, so the default reports none (0).
    fn vendor_id(&self) -> u32 {
        0
    }

    /// Feature bits the device offers; must include
    /// [`VIRTIO_F_VERSION_1`](features::VIRTIO_F_VERSION_1). Ring features
    /// (INDIRECT_DESC, RING_EVENT_IDX) are implemented by [`SplitQueue`] and
    /// are the device's to offer or not.
    fn features(&self) -> u64;

    /// How many virtqueues the device has.
    fn num_queues(&self) -> u16;

    /// The largest size queue `queue` may have (QueueNumMax; a power of two
    /// ≤ [`MAX_QUEUE_SIZE`]).
    fn max_queue_size(&self, queue: u16) -> u16;

    /// Reads `data.len()` bytes of device configuration at `offset`. Bytes
    /// past the end of the configuration read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes device configuration at `offset`; read-only or unknown fields
    /// ignore the write.
    fn write_config(&self, offset: u64, data: &[u8]);

    /// The driver set DRIVER_OK: start serving the queues. Must not block on
    /// guest activity.
    ///
    /// # Errors
    /// [`ActivateError`] when the device cannot run with this setup; the
    /// transport then reports DEVICE_NEEDS_RESET.
    fn activate(&self, activation: Activation) -> Result<(), ActivateError>;

    /// Serves queue `queue` until it is empty: pops and executes requests,
    /// publishes their completions, re-enables notifications and checks the
    /// ring once more (a driver that added buffers while notifications were
    /// off did not notify), and raises the used-buffer interrupt if the
    /// driver wants one. Stops early, after the request in progress, when
    /// `stop` is requested.
    ///
    /// The transport calls it for a live queue only (below
    /// [`num_queues`](Self::num_queues), after activation, QueueReady set),
    /// never for the same queue on two threads at once, and possibly on a
    /// worker thread rather than a vCPU.
    fn serve(&self, queue: u16, stop: &QueueStop);

    /// The driver cleared QueueReady of an activated queue after DRIVER_OK:
    /// the queue will not be served until [`queue_started`](Self::queue_started).
    /// The serve in progress, if any, has returned. The default does
    /// nothing (the queue's state stays as it is).
    fn queue_stopped(&self, queue: u16) {
        let _ = queue;
    }

    /// The driver set QueueReady again on a queue it had stopped: serving
    /// resumes where it left off. The default does nothing.
    fn queue_started(&self, queue: u16) {
        let _ = queue;
    }

    /// The driver reset the device: drop the queues and memory handed over by
    /// [`activate`](Self::activate), wait for in-progress queue work to end,
    /// and return to the state before activation.
    fn reset(&self);
}
