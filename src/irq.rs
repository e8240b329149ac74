//! Interrupt wiring: how a [`DeviceManager`](crate::DeviceManager) turns a
//! device's configured `irq` into the [`IrqLine`] the device drives.

use alloc::collections::BTreeMap;
use alloc::sync::Arc;

use crate::sync::Mutex;
use crate::virtio::RecordingIrq;

/// One guest interrupt line, implemented by the VMM (a GIC SPI, an IOAPIC
/// pin, a PLIC source). Devices drive it directly (the UART) or through a
/// transport's interrupt status (virtio-mmio).
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

/// Hands out the line for an interrupt number: implemented by the VMM over
/// its interrupt controller model (GIC, IOAPIC, PLIC).
pub trait InterruptController: Send + Sync {
    /// The line for `irq`, or `None` when the controller has no such line.
    fn line(&self, irq: u32) -> Option<Arc<dyn IrqLine>>;
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
