//! Where a queue notification goes: straight into the device on the
//! notifying vCPU ([`NotifyMode::Inline`]), or to a per-queue
//! [`QueueEvent`] that a worker waits on ([`NotifyMode::Deferred`]).
//!
//! The deferred model is the one KVM-based VMMs use: the VMM registers the
//! QueueNotify address with KVM as an ioeventfd (datamatch = queue index),
//! so a guest notify signals an eventfd without leaving the kernel, and a
//! worker thread blocked on that eventfd serves the queue with
//! [`MmioTransport::serve`](super::MmioTransport::serve) — outside any bus
//! read section, so a slow backend (an `fsync`) never holds up a vCPU or the
//! grace period of the bus. A QueueNotify write that does reach the
//! transport in deferred mode only calls [`QueueEvent::signal`]; a notify
//! that never reaches it (absorbed by the ioeventfd) loses nothing, because
//! the worker serves on the event alone.

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;

/// A per-queue notification signal supplied by the VMM (a KVM ioeventfd's
/// eventfd, say, or the ready-made [`CondvarEvent`]).
///
/// Signals coalesce: any number of [`signal`](Self::signal)s between two
/// [`wait`](Self::wait)s wake the waiter once. That is enough, because the
/// worker serves a queue until it is empty after every wake-up.
pub trait QueueEvent: Send + Sync {
    /// A notification for this queue arrived. Called by the transport on a
    /// QueueNotify write in deferred mode (on a vCPU thread, inside the
    /// bus's read section: must be quick and must not call back into the
    /// transport), and by the worker runtime to wake a worker for shutdown.
    fn signal(&self);

    /// Blocks until signalled at least once since the previous `wait`
    /// returned, consuming the pending signals. Only the `std` worker
    /// runtime ([`QueueWorkers`](super::QueueWorkers)) calls it; a VMM
    /// running its own event loop (epoll on the eventfds) never needs it.
    fn wait(&self);

    /// The queue became live (`true`: the driver set DRIVER_OK with the
    /// queue ready, or set QueueReady again) or stopped (`false`: QueueReady
    /// was cleared, or the device was reset). A VMM can register its
    /// ioeventfd on `true` and unregister it on `false`; registering it for
    /// the whole life of the device is fine too, since serving a stopped
    /// queue does nothing. Called under the transport's register lock: must
    /// not call back into the transport. The default does nothing.
    fn queue_state(&self, live: bool) {
        let _ = live;
    }
}

/// Where a transport sends QueueNotify writes; see the
/// [module docs](self).
#[derive(Clone, Default)]
pub enum NotifyMode {
    /// The notifying vCPU serves the queue itself, inside the bus's read
    /// section (the simple model, and the only one without threads).
    #[default]
    Inline,
    /// A notify for queue `i` signals `events[i]`, and whoever waits on it
    /// calls [`MmioTransport::serve`](super::MmioTransport::serve)`(i)`.
    /// Queues without an event (the vector is shorter) stay inline.
    Deferred(Vec<Arc<dyn QueueEvent>>),
}

impl fmt::Debug for NotifyMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NotifyMode::Inline => f.write_str("Inline"),
            NotifyMode::Deferred(events) => write!(f, "Deferred({} events)", events.len()),
        }
    }
}

#[cfg(feature = "std")]
pub use condvar::CondvarEvent;

#[cfg(feature = "std")]
mod condvar {
    use super::QueueEvent;

    /// A [`QueueEvent`] from a mutex and a condition variable: the event to
    /// use when nothing outside the process signals the queue (tests, VMMs
    /// whose notifies all arrive as register writes).
    ///
    /// # Example
    /// ```
    /// use vmio::virtio::{CondvarEvent, QueueEvent};
    ///
    /// let ev = CondvarEvent::new();
    /// ev.signal();
    /// ev.signal();
    /// ev.wait(); // returns at once: both signals are consumed
    /// assert!(!ev.is_signalled());
    /// ```
    #[derive(Debug, Default)]
    pub struct CondvarEvent {
        pending: std::sync::Mutex<bool>,
        cv: std::sync::Condvar,
    }

    impl CondvarEvent {
        /// An event with no signal pending.
        pub fn new() -> Self {
            Self::default()
        }

        /// Whether a signal is pending (not yet consumed by a `wait`).
        pub fn is_signalled(&self) -> bool {
            *self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
        }
    }

    impl QueueEvent for CondvarEvent {
        fn signal(&self) {
            let mut p = self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            *p = true;
            self.cv.notify_one();
        }

        fn wait(&self) {
            let mut p = self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            while !*p {
                p = self.cv.wait(p).unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            *p = false;
        }
    }
}
