//! Device interrupts as KVM irqfds: each IOAPIC pin a device uses gets an
//! `EventFd` registered with `KVM_IRQFD`, so raising an interrupt is one
//! `write(2)` from whatever thread the device runs on (a vCPU, a queue
//! worker) and KVM injects it without the VMM's vCPU loop noticing.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;
use vmio::{InterruptController, IrqLine};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::mptable::IOAPIC_PINS;

/// One IOAPIC pin behind an irqfd.
///
/// The MP table declares every pin edge-triggered (ISA default), and an
/// irqfd write is an edge: KVM raises and lowers the pin. So `pulse` and an
/// assertion both write the eventfd; a deassertion has nothing to do.
pub struct IrqfdLine {
    fd: EventFd,
    pulses: AtomicU64,
}

impl IrqfdLine {
    /// Interrupts delivered so far.
    pub fn pulses(&self) -> u64 {
        // Relaxed: a statistic, read after the threads that count it joined.
        self.pulses.load(Ordering::Relaxed)
    }
}

impl IrqLine for IrqfdLine {
    fn pulse(&self) {
        // Relaxed: a statistic; the eventfd write is the synchronization.
        self.pulses.fetch_add(1, Ordering::Relaxed);
        // The counter saturates only after 2^64 - 2 unread pulses; KVM
        // consumes it at once. A failed write has nowhere to be reported
        // from a device thread, and the guest then sees a lost interrupt,
        // which its driver's timeout handles.
        let _ = self.fd.write(1);
    }
}

/// Hands out one irqfd-backed line per IOAPIC pin, created and registered
/// with KVM on first use and shared by every device (or successive
/// hot-plugged devices) on that pin.
pub struct IrqfdController {
    vm: Arc<VmFd>,
    lines: Mutex<BTreeMap<u32, Arc<IrqfdLine>>>,
}

impl IrqfdController {
    /// A controller injecting into `vm`'s in-kernel IOAPIC.
    pub fn new(vm: Arc<VmFd>) -> Self {
        IrqfdController { vm, lines: Mutex::new(BTreeMap::new()) }
    }

    /// Interrupts delivered per pin, for the report.
    pub fn pulses(&self) -> Vec<(u32, u64)> {
        let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        lines.iter().map(|(&irq, l)| (irq, l.pulses())).collect()
    }
}

impl InterruptController for IrqfdController {
    fn line(&self, irq: u32) -> Option<Arc<dyn IrqLine>> {
        if irq >= u32::from(IOAPIC_PINS) {
            return None;
        }
        let mut lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(line) = lines.get(&irq) {
            return Some(line.clone());
        }
        let fd = EventFd::new(EFD_NONBLOCK).ok()?;
        if let Err(e) = self.vm.register_irqfd(&fd, irq) {
            eprintln!("kvm_vmm: KVM_IRQFD for GSI {irq}: {e}");
            return None;
        }
        let line = Arc::new(IrqfdLine { fd, pulses: AtomicU64::new(0) });
        lines.insert(irq, line.clone());
        Some(line)
    }
}
