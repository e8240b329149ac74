//! A small virtio device for exercising transports and queues: every chain's
//! readable bytes are copied into its writable buffers.

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::sync::Mutex;
use crate::virtio::features::{
    VIRTIO_F_INDIRECT_DESC, VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1,
};
use crate::virtio::{
    ActivateError, Activation, GuestMemory, Interrupt, InterruptCause, PopError, QueueStop,
    SplitQueue, VirtioDevice,
};

/// Device type the echo device reports (a vendor-specific placeholder).
pub const ECHO_DEVICE_TYPE: u32 = 0x7e57;
/// Bytes of the echo device's configuration space: 8 read-only bytes
/// (`b"vmioecho"`) then 8 writable bytes.
pub const ECHO_CONFIG_LEN: usize = 16;

/// One activated queue with what it needs to run: processing takes only
/// this queue's lock.
struct QueueCtx {
    queue: SplitQueue,
    memory: Arc<dyn GuestMemory>,
    irq: Arc<dyn Interrupt>,
}

/// A virtio device that echoes each request: the readable part of a chain
/// is copied into its writable part (as far as it fits), and the chain is
/// returned with the number of bytes copied. Malformed chains come back
/// with length 0; a broken queue reports DEVICE_NEEDS_RESET.
///
/// Each queue sits behind its own lock, as a real multi-queue device's do.
pub struct EchoDevice {
    num_queues: u16,
    max_size: u16,
    features: u64,
    config: Mutex<[u8; ECHO_CONFIG_LEN]>,
    queues: Vec<Mutex<Option<QueueCtx>>>,
    completed: AtomicU64,
    rejected: AtomicU64,
    last_error: Mutex<Option<PopError>>,
}

impl core::fmt::Debug for EchoDevice {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("EchoDevice")
            .field("num_queues", &self.num_queues)
            .field("completed", &self.completed())
            .field("rejected", &self.rejected())
            .finish_non_exhaustive()
    }
}

impl EchoDevice {
    /// `num_queues` queues of up to 256 entries, offering VERSION_1,
    /// INDIRECT_DESC and RING_EVENT_IDX.
    pub fn new(num_queues: u16) -> Self {
        Self::with_features(
            num_queues,
            256,
            VIRTIO_F_VERSION_1 | VIRTIO_F_INDIRECT_DESC | VIRTIO_F_RING_EVENT_IDX,
        )
    }

    /// Chooses the queue size limit and offered features.
    pub fn with_features(num_queues: u16, max_size: u16, features: u64) -> Self {
        let mut config = [0u8; ECHO_CONFIG_LEN];
        config[..8].copy_from_slice(b"vmioecho");
        EchoDevice {
            num_queues,
            max_size,
            features,
            config: Mutex::new(config),
            queues: (0..num_queues).map(|_| Mutex::new(None)).collect(),
            completed: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            last_error: Mutex::new(None),
        }
    }

    /// Chains served.
    pub fn completed(&self) -> u64 {
        // Relaxed: a statistic.
        self.completed.load(Ordering::Relaxed)
    }

    /// Malformed chains returned with length 0.
    pub fn rejected(&self) -> u64 {
        // Relaxed: a statistic.
        self.rejected.load(Ordering::Relaxed)
    }

    /// The last pop error seen on any queue.
    pub fn last_error(&self) -> Option<PopError> {
        *self.last_error.lock()
    }

    /// Whether queue `q` is active (set up and not broken).
    pub fn queue_active(&self, q: u16) -> bool {
        self.queues.get(usize::from(q)).is_some_and(|m| m.lock().is_some())
    }

    fn drain(&self, q: u16, ctx: &mut QueueCtx, stop: &QueueStop) -> Result<(), PopError> {
        let mem = &*ctx.memory;
        let mut buf = [0u8; 512];
        loop {
            while !stop.is_requested()
                && let Some(res) = ctx.queue.pop(mem).transpose()
            {
                match res {
                    Ok(chain) => {
                        let total = chain.readable_len().min(chain.writable_len());
                        let mut done = 0u32;
                        while done < total {
                            let n = (total - done).min(buf.len() as u32) as usize;
                            let ok = chain
                                .read_at(mem, u64::from(done), &mut buf[..n])
                                .and_then(|_| chain.write_at(mem, u64::from(done), &buf[..n]));
                            if ok.is_err() {
                                break;
                            }
                            done += n as u32;
                        }
                        ctx.queue.push(mem, chain.head(), done)?;
                        // Relaxed: a statistic.
                        self.completed.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(PopError::Chain { head, error }) => {
                        *self.last_error.lock() = Some(PopError::Chain { head, error });
                        ctx.queue.push(mem, head, 0)?;
                        // Relaxed: a statistic.
                        self.rejected.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => return Err(e),
                }
            }
            // Stopping: the rest stays in the ring. Otherwise the re-check.
            if stop.is_requested() || !ctx.queue.enable_notification(mem)? {
                break;
            }
        }
        if ctx.queue.needs_interrupt(mem)? {
            ctx.irq.raise(InterruptCause::UsedBuffer { queue: q });
        }
        Ok(())
    }
}

impl VirtioDevice for EchoDevice {
    fn device_type(&self) -> u32 {
        ECHO_DEVICE_TYPE
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn num_queues(&self) -> u16 {
        self.num_queues
    }

    fn max_queue_size(&self, _queue: u16) -> u16 {
        self.max_size
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cfg = self.config.lock();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| cfg.get(o.checked_add(i)?))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&self, offset: u64, data: &[u8]) {
        let mut cfg = self.config.lock();
        for (i, &b) in data.iter().enumerate() {
            let Some(o) = usize::try_from(offset).ok().and_then(|o| o.checked_add(i)) else {
                return;
            };
            // The first 8 bytes are read-only.
            if (8..ECHO_CONFIG_LEN).contains(&o) {
                cfg[o] = b;
            }
        }
    }

    fn activate(&self, activation: Activation) -> Result<(), ActivateError> {
        if activation.queues.iter().all(Option::is_none) {
            return Err(ActivateError::MissingQueue(0));
        }
        for (slot, q) in self.queues.iter().zip(activation.queues) {
            *slot.lock() = q.map(|queue| QueueCtx {
                queue,
                memory: activation.memory.clone(),
                irq: activation.interrupt.clone(),
            });
        }
        Ok(())
    }

    fn serve(&self, queue: u16, stop: &QueueStop) {
        let Some(slot) = self.queues.get(usize::from(queue)) else { return };
        let mut guard = slot.lock();
        let Some(ctx) = guard.as_mut() else { return };
        if let Err(e) = self.drain(queue, ctx, stop) {
            *self.last_error.lock() = Some(e);
            ctx.irq.needs_reset();
            *guard = None;
        }
    }

    fn reset(&self) {
        for q in &self.queues {
            *q.lock() = None;
        }
    }
}
