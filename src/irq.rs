//! Interrupt lines as devices see them.

use alloc::collections::BTreeMap;
use alloc::sync::Arc;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::sync::Mutex;

/// One guest interrupt line, implemented by the VMM (a GIC SPI, an IOAPIC
/// pin, a PLIC source).
pub trait IrqLine: Send + Sync {
    /// Delivers one edge-triggered interrupt.
    fn pulse(&self);

    /// Drives a level-triggered line: `true` asserts, `false` deasserts.
    /// The default pulses on assertion, for VMMs that only have edges.
    fn set_level(&self, asserted: bool) {
        if asserted {
            self.pulse();
        }
    }
}

/// Records what a device did with its line, for tests.
#[derive(Debug, Default)]
pub struct RecordingInterrupt {
    level: AtomicBool,
    raised: AtomicU64,
}

impl RecordingInterrupt {
    /// A line that is low and was never raised.
    pub const fn new() -> Self {
        RecordingInterrupt { level: AtomicBool::new(false), raised: AtomicU64::new(0) }
    }

    /// The current level.
    pub fn level(&self) -> bool {
        // Relaxed: a test observer; the device's own lock orders its writes.
        self.level.load(Ordering::Relaxed)
    }

    /// How many low-to-high transitions and pulses happened.
    pub fn raised(&self) -> u64 {
        // Relaxed: as above.
        self.raised.load(Ordering::Relaxed)
    }
}

impl IrqLine for RecordingInterrupt {
    fn pulse(&self) {
        // Relaxed: a counter read after the fact.
        self.raised.fetch_add(1, Ordering::Relaxed);
    }

    fn set_level(&self, level: bool) {
        // Relaxed: only counts and the latest value are observed.
        if level && !self.level.swap(level, Ordering::Relaxed) {
            self.raised.fetch_add(1, Ordering::Relaxed);
        } else {
            self.level.store(level, Ordering::Relaxed);
        }
    }
}

/// Hands out the line for an interrupt number: how a
/// [`DeviceManager`](crate::DeviceManager) wires each device's `irq`.
pub trait InterruptController: Send + Sync {
    /// The line for `irq`, or `None` when the controller has no such line.
    fn line(&self, irq: u32) -> Option<Arc<dyn IrqLine>>;
}

/// An [`InterruptController`] whose every line is a [`RecordingInterrupt`],
/// for tests.
#[derive(Debug, Default)]
pub struct RecordingController {
    lines: Mutex<BTreeMap<u32, Arc<RecordingInterrupt>>>,
}

impl RecordingController {
    /// A controller with no lines handed out yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The recording behind line `irq` (created on first use).
    pub fn recording(&self, irq: u32) -> Arc<RecordingInterrupt> {
        self.lines.lock().entry(irq).or_default().clone()
    }
}

impl InterruptController for RecordingController {
    fn line(&self, irq: u32) -> Option<Arc<dyn IrqLine>> {
        Some(self.recording(irq))
    }
}
