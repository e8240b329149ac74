//! virtio: guest memory, interrupts, split virtqueues, the virtio-mmio
//! transport, and the [`VirtioDevice`] trait devices implement.
//!
//! The layers, bottom up:
//! - [`Interrupt`] / [`InterruptStatus`] — how a device raises its
//!   interrupt, and the register that drives the VMM's
//!   [`IrqLine`](crate::IrqLine). Devices reach guest memory through
//!   [`crate::GuestMemory`].
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
mod interrupt;
mod mmio;
mod notify;
mod queue;
mod serve;
pub mod spec;
#[cfg(feature = "std")]
mod worker;

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::{AtomicBool, Ordering};

pub use interrupt::{Interrupt, InterruptCause, InterruptStatus, Trigger};
pub use mmio::MmioTransport;
#[cfg(feature = "std")]
pub use notify::CondvarEvent;
pub use notify::{NotifyMode, QueueEvent};
pub use queue::{
    Chain, ChainError, DEFAULT_SEGMENTS, DescriptorChain, PopError, QueueArea, QueueConfig,
    QueueError, Segment, SplitQueue,
};
#[cfg(feature = "std")]
pub use worker::QueueWorkers;

use crate::memory::GuestMemory;
pub(crate) use serve::{ChainHandler, serve_queue};

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
#[non_exhaustive]
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
    /// The virtio device type ([`spec::device_type`]).
    fn device_type(&self) -> u32;

    /// The vendor id reported to the driver. Drivers match on the device
    /// type, not the vendor, so the default reports none (0).
    fn vendor_id(&self) -> u32 {
        0
    }

    /// Feature bits the device offers; must include
    /// [`VIRTIO_F_VERSION_1`](spec::features::VIRTIO_F_VERSION_1). Ring features
    /// (INDIRECT_DESC, RING_EVENT_IDX) are implemented by [`SplitQueue`] and
    /// are the device's to offer or not.
    fn features(&self) -> u64;

    /// How many virtqueues the device has.
    fn num_queues(&self) -> u16;

    /// The largest size queue `queue` may have (QueueNumMax; a power of two
    /// ≤ [`MAX_QUEUE_SIZE`](spec::ring::MAX_QUEUE_SIZE)).
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

impl<T: VirtioDevice + ?Sized> VirtioDevice for Arc<T> {
    fn device_type(&self) -> u32 {
        (**self).device_type()
    }
    fn vendor_id(&self) -> u32 {
        (**self).vendor_id()
    }
    fn features(&self) -> u64 {
        (**self).features()
    }
    fn num_queues(&self) -> u16 {
        (**self).num_queues()
    }
    fn max_queue_size(&self, queue: u16) -> u16 {
        (**self).max_queue_size(queue)
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        (**self).read_config(offset, data)
    }
    fn write_config(&self, offset: u64, data: &[u8]) {
        (**self).write_config(offset, data)
    }
    fn activate(&self, activation: Activation) -> Result<(), ActivateError> {
        (**self).activate(activation)
    }
    fn serve(&self, queue: u16, stop: &QueueStop) {
        (**self).serve(queue, stop)
    }
    fn queue_stopped(&self, queue: u16) {
        (**self).queue_stopped(queue)
    }
    fn queue_started(&self, queue: u16) {
        (**self).queue_started(queue)
    }
    fn reset(&self) {
        (**self).reset()
    }
}
