//! Interrupt wiring: the guest interrupt line a device drives, and how a
//! [`DeviceManager`](crate::DeviceManager) turns a device's configured `irq`
//! into one. Transport-specific interrupt state (virtio-mmio's
//! InterruptStatus register) builds on this, in
//! [`virtio`](crate::virtio::InterruptStatus).

use alloc::sync::Arc;

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
