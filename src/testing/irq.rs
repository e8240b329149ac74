//! Interrupt test doubles: a line and a controller that record what they
//! were asked to do.

use alloc::collections::BTreeMap;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::irq::{InterruptController, IrqLine};
use crate::sync::Mutex;
use crate::virtio::{Interrupt, InterruptCause};

/// One call recorded by [`RecordingIrq`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IrqEvent {
    /// [`Interrupt::raise`] was called.
    Raised(InterruptCause),
    /// [`Interrupt::needs_reset`] was called.
    NeedsReset,
    /// [`IrqLine::pulse`] was called.
    Pulse,
    /// [`IrqLine::set_level`] was called.
    Level(bool),
}

/// Records every interrupt, for tests: usable both as a device's
/// [`Interrupt`] (no transport in between) and as the VMM's [`IrqLine`]
/// (behind an [`InterruptStatus`](crate::virtio::InterruptStatus)).
///
/// # Example
/// ```
/// use vmio::testing::RecordingIrq;
/// use vmio::virtio::{Interrupt, InterruptCause};
///
/// let irq = RecordingIrq::new();
/// irq.raise(InterruptCause::UsedBuffer { queue: 1 });
/// assert_eq!(irq.used_count(1), 1);
/// assert_eq!(irq.used_count(0), 0);
/// ```
#[derive(Debug, Default)]
pub struct RecordingIrq {
    events: Mutex<Vec<IrqEvent>>,
    pulses: AtomicUsize,
    level: AtomicBool,
}

impl RecordingIrq {
    /// Nothing recorded, line low.
    pub fn new() -> Self {
        Self::default()
    }

    /// Everything recorded so far, oldest first.
    pub fn events(&self) -> Vec<IrqEvent> {
        self.events.lock().clone()
    }

    /// Returns and forgets everything recorded so far.
    pub fn take(&self) -> Vec<IrqEvent> {
        core::mem::take(&mut *self.events.lock())
    }

    /// How many used-buffer interrupts were raised for `queue`.
    pub fn used_count(&self, queue: u16) -> usize {
        let used = IrqEvent::Raised(InterruptCause::UsedBuffer { queue });
        self.events.lock().iter().filter(|&&e| e == used).count()
    }

    /// How many config-change interrupts were raised.
    pub fn config_count(&self) -> usize {
        let cfg = IrqEvent::Raised(InterruptCause::ConfigChange);
        self.events.lock().iter().filter(|&&e| e == cfg).count()
    }

    /// Whether [`Interrupt::needs_reset`] was called.
    pub fn needs_reset_seen(&self) -> bool {
        self.events.lock().contains(&IrqEvent::NeedsReset)
    }

    /// How many edges were delivered.
    pub fn pulses(&self) -> usize {
        // Relaxed: a counter read by the test thread after the fact.
        self.pulses.load(Ordering::Relaxed)
    }

    /// The level of the line (level-triggered use).
    pub fn level(&self) -> bool {
        // Relaxed: a flag read by the test thread after the fact.
        self.level.load(Ordering::Relaxed)
    }
}

impl Interrupt for RecordingIrq {
    fn raise(&self, cause: InterruptCause) {
        self.events.lock().push(IrqEvent::Raised(cause));
    }
    fn needs_reset(&self) {
        self.events.lock().push(IrqEvent::NeedsReset);
        self.raise(InterruptCause::ConfigChange);
    }
}

impl IrqLine for RecordingIrq {
    fn pulse(&self) {
        // Relaxed: see `pulses`.
        self.pulses.fetch_add(1, Ordering::Relaxed);
        self.events.lock().push(IrqEvent::Pulse);
    }
    fn set_level(&self, asserted: bool) {
        // Relaxed: see `level`.
        self.level.store(asserted, Ordering::Relaxed);
        self.events.lock().push(IrqEvent::Level(asserted));
    }
}

/// An [`InterruptController`] whose every line is a [`RecordingIrq`], for
/// tests.
#[derive(Debug, Default)]
pub struct RecordingController {
    lines: Mutex<BTreeMap<u32, Arc<RecordingIrq>>>,
}

impl RecordingController {
    /// A controller with no lines handed out yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The recording behind line `irq` (created on first use).
    pub fn recording(&self, irq: u32) -> Arc<RecordingIrq> {
        self.lines.lock().entry(irq).or_default().clone()
    }
}

impl InterruptController for RecordingController {
    fn line(&self, irq: u32) -> Option<Arc<dyn IrqLine>> {
        Some(self.recording(irq))
    }
}
