//! A small worker runtime (`std`): one thread per queue that waits on the
//! queue's [`QueueEvent`] and serves the queue, outside any bus read
//! section.
//!
//! This is the Firecracker / Cloud Hypervisor / crosvm model in its
//! simplest form: the notify (a register write, or a KVM ioeventfd that
//! never exits to userspace) wakes the queue's worker; the worker runs the
//! requests, blocking I/O included, and raises the completion interrupt
//! through the transport's [`IrqLine`](crate::IrqLine) (which a KVM VMM
//! implements with an irqfd write). A VMM with an event loop of its own
//! (epoll over the eventfds) can skip this module and call
//! [`MmioTransport::serve`] itself.
//!
//! # Shutdown, reset and unplug
//!
//! - [`QueueWorkers::shutdown`] (also on drop) puts the transport back in
//!   [`NotifyMode::Inline`], wakes every worker, lets each serve its queue
//!   one last time (so a notify signalled just before is not lost) and joins
//!   them. A request is never left half-done: a serve always runs to the
//!   end of the request it is executing and publishes its completion.
//! - A device reset (Status = 0) needs nothing from the workers: the
//!   transport stops every queue, waiting for the serve in progress to
//!   finish the request it is executing and publish what completed;
//!   requests not yet started are cancelled with the rings they sit in. The
//!   workers keep waiting and serve again once the driver re-initializes
//!   the device.
//! - Unplug: [`IoBus::unregister`](crate::IoBus::unregister) and
//!   [`Unplug::wait`](crate::Unplug::wait) never wait for a worker (serves
//!   run outside the bus), then shut the workers down before freeing what
//!   the device uses.

use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, Ordering};
use std::io;
use std::thread::JoinHandle;

use super::notify::{NotifyMode, QueueEvent};
use super::{MmioTransport, VirtioDevice};

/// One thread per queue serving a [`MmioTransport`] in deferred mode; see
/// the [module docs](self).
///
/// # Example
/// ```
/// use std::sync::Arc;
/// use vmio::virtio::{CondvarEvent, GuestRam, MmioTransport, QueueEvent, QueueWorkers};
/// use vmio::virtio::{RecordingIrq, Trigger};
/// use vmio::testing::EchoDevice;
///
/// let ram = Arc::new(GuestRam::new(0x8000_0000, 0x10_0000)?);
/// let dev = Arc::new(MmioTransport::new(
///     EchoDevice::new(2), ram, Arc::new(RecordingIrq::new()), Trigger::Edge));
/// let events: Vec<Arc<dyn QueueEvent>> =
///     (0..2).map(|_| Arc::new(CondvarEvent::new()) as _).collect();
/// let workers = QueueWorkers::spawn(dev.clone(), events)?;
/// assert_eq!(workers.len(), 2);
/// drop(workers); // stops, wakes and joins the threads
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct QueueWorkers {
    stop: Arc<AtomicBool>,
    events: Vec<Arc<dyn QueueEvent>>,
    threads: Vec<JoinHandle<()>>,
    /// Puts the transport back in inline mode at shutdown.
    inline: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl core::fmt::Debug for QueueWorkers {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("QueueWorkers").field("threads", &self.threads.len()).finish_non_exhaustive()
    }
}

impl QueueWorkers {
    /// Puts `transport` in deferred mode with `events` (one per queue,
    /// `events.len() == transport.num_queues()`) and spawns one thread per
    /// queue that waits on its event and calls
    /// [`transport.serve(q)`](MmioTransport::serve).
    ///
    /// # Errors
    /// [`io::ErrorKind::InvalidInput`] when the number of events differs
    /// from the number of queues; the error of
    /// [`std::thread::Builder::spawn`] when a thread cannot be created (the
    /// threads already started are shut down and the transport is left
    /// inline).
    pub fn spawn<D: VirtioDevice + 'static>(
        transport: Arc<MmioTransport<D>>,
        events: Vec<Arc<dyn QueueEvent>>,
    ) -> io::Result<QueueWorkers> {
        if events.len() != usize::from(transport.num_queues()) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                alloc::format!(
                    "{} queue events for {} queues",
                    events.len(),
                    transport.num_queues()
                ),
            ));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let t = transport.clone();
        let mut workers = QueueWorkers {
            stop: stop.clone(),
            events: events.clone(),
            threads: Vec::with_capacity(events.len()),
            inline: Some(Box::new(move || t.set_notify_mode(NotifyMode::Inline))),
        };
        for (q, event) in events.iter().enumerate() {
            let (transport, event, stop) = (transport.clone(), event.clone(), stop.clone());
            // Queue indices fit: there are `num_queues()` (a u16) events.
            let q = q as u16;
            let thread = std::thread::Builder::new().name(alloc::format!("vmio-queue-{q}")).spawn(
                move || {
                    loop {
                        event.wait();
                        transport.serve(q);
                        // Acquire pairs with the Release in `stop`: checked
                        // after the serve, so the wake-up that carries the
                        // stop request still serves what was signalled
                        // before it.
                        if stop.load(Ordering::Acquire) {
                            break;
                        }
                    }
                },
            );
            match thread {
                Ok(t) => workers.threads.push(t),
                // Dropping `workers` stops the threads started so far.
                Err(e) => return Err(e),
            }
        }
        // Only now: had a spawn failed, notifies would have gone to events
        // nobody waits on.
        transport.set_notify_mode(NotifyMode::Deferred(events));
        Ok(workers)
    }

    /// How many worker threads run.
    pub fn len(&self) -> usize {
        self.threads.len()
    }

    /// Whether no worker runs (a device without queues).
    pub fn is_empty(&self) -> bool {
        self.threads.is_empty()
    }

    /// Puts the transport back in inline mode, wakes every worker, lets it
    /// serve its queue a last time and joins it. Also what dropping does.
    ///
    /// # Panics
    /// Re-raises the panic of a worker thread that panicked (a device bug).
    pub fn shutdown(mut self) {
        self.stop_and_join(true);
    }

    fn stop_and_join(&mut self, propagate: bool) {
        // First inline: from here on a notify that reaches the transport is
        // served by the vCPU, and the workers' last serve below picks up any
        // signal given before the switch.
        if let Some(inline) = self.inline.take() {
            inline();
        }
        // Release pairs with the Acquire in the worker loop.
        self.stop.store(true, Ordering::Release);
        for ev in &self.events {
            ev.signal();
        }
        let mut panic = None;
        for t in self.threads.drain(..) {
            if let Err(p) = t.join() {
                panic.get_or_insert(p);
            }
        }
        if let Some(p) = panic
            && propagate
        {
            std::panic::resume_unwind(p);
        }
    }
}

impl Drop for QueueWorkers {
    fn drop(&mut self) {
        // No second panic while unwinding: a worker's panic is reported by
        // `shutdown`, not by drop.
        self.stop_and_join(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_can_live_in_shared_vmm_state() {
        fn shared<T: Send + Sync>() {}
        shared::<QueueWorkers>();
        shared::<MmioTransport<crate::testing::EchoDevice>>();
    }
}
