//! Interrupts: how a virtio device tells its driver that buffers were used
//! or that its configuration changed.
//!
//! Two traits split the job:
//! - [`Interrupt`] is what a device calls: "raise a used-buffer interrupt for
//!   queue k", "raise a config-change interrupt", "I need a reset".
//! - [`IrqLine`] (the crate-wide trait, re-exported here) is what the VMM
//!   implements: one guest interrupt line (a GIC SPI, an IOAPIC pin, a PLIC
//!   source), pulsed for edge-triggered wiring or driven high/low for
//!   level-triggered wiring.
//!
//! [`InterruptStatus`] sits between them for transports that have an
//! InterruptStatus register (virtio-mmio): it keeps the pending bits until
//! the driver acknowledges them and drives the line accordingly.
//! [`RecordingIrq`] implements both traits and records every call, for tests.

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};

pub use crate::irq::IrqLine;
use crate::sync::Mutex;

/// Why a device interrupts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InterruptCause {
    /// The device put buffers in the used ring of `queue`.
    UsedBuffer {
        /// Index of the queue.
        queue: u16,
    },
    /// The device configuration space changed (or the device needs a reset).
    ConfigChange,
}

impl InterruptCause {
    /// The bit this cause sets in the virtio-mmio InterruptStatus register.
    pub const fn status_bit(self) -> u32 {
        match self {
            InterruptCause::UsedBuffer { .. } => INT_USED_BUFFER,
            InterruptCause::ConfigChange => INT_CONFIG_CHANGE,
        }
    }
}

/// InterruptStatus bit 0: a used buffer notification is pending.
pub const INT_USED_BUFFER: u32 = 1;
/// InterruptStatus bit 1: a configuration change notification is pending.
pub const INT_CONFIG_CHANGE: u32 = 2;

/// The interrupt of one virtio device, as the device sees it.
///
/// Implementations are called from whatever thread processes a queue, so
/// they must be cheap and must not call back into the device.
pub trait Interrupt: Send + Sync {
    /// Raises an interrupt for `cause`.
    fn raise(&self, cause: InterruptCause);

    /// Reports an error the device cannot recover from without a reset
    /// (a queue the guest corrupted beyond repair): the transport sets
    /// DEVICE_NEEDS_RESET in its status register and raises a
    /// config-change interrupt. The default only raises the interrupt.
    fn needs_reset(&self) {
        self.raise(InterruptCause::ConfigChange);
    }
}

/// How an interrupt line is wired to the guest's interrupt controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Trigger {
    /// One pulse per interrupt (MSI-like, or an edge-triggered pin).
    #[default]
    Edge,
    /// The line stays asserted while any InterruptStatus bit is set, and is
    /// lowered when the driver acknowledges the last one.
    Level,
}

/// The InterruptStatus register of a transport plus the line it drives.
///
/// [`raise`](Interrupt::raise) sets a bit and signals the line;
/// [`ack`](Self::ack) clears bits and, for level triggering, lowers the line
/// once nothing is pending. Also carries the two other pieces of transport
/// state a device may change from a queue thread: the DEVICE_NEEDS_RESET
/// flag and the config generation counter. Everything is atomic: a device
/// raising from a queue thread never contends with register accesses, except
/// for the short level-update lock under [`Trigger::Level`].
///
/// # Raised from a worker, acknowledged by a vCPU
///
/// A worker thread may raise while a vCPU reads or acknowledges the
/// register; no interrupt is lost and the line never disagrees with the
/// bits for long:
/// - raise = `fetch_or` of the bit (Release: the used ring written before is
///   visible to whoever sees the bit), *then* the line is signalled, so an
///   interrupt always finds its bit set (or already acknowledged together
///   with the ring entries it announced: a spurious interrupt, harmless);
/// - ack = `fetch_and` of the bits (Acquire: the ring entries published
///   before the acknowledged raise are visible to the driver's next look);
/// - under [`Trigger::Level`] both then re-read the whole register and drive
///   the line from it under one small lock, so whichever of a racing raise
///   and ack drives it last drives it from the value after both: never low
///   with a bit pending, never left high with nothing pending. An edge line
///   (an irqfd, say) needs no lock: every raise pulses.
///
/// [`reset`](Self::reset) clears the bits; the transport first stops every
/// queue (waiting for serves in progress), so no worker raises into a reset
/// device.
pub struct InterruptStatus {
    status: AtomicU32,
    /// Interrupts are delivered only while the driver has set DRIVER_OK.
    enabled: AtomicBool,
    needs_reset: AtomicBool,
    generation: AtomicU32,
    line: Arc<dyn IrqLine>,
    trigger: Trigger,
    /// Serializes "read status, drive the level" so that a racing raise and
    /// ack cannot leave the line low with a bit pending (or high without).
    level: Mutex<()>,
}

impl core::fmt::Debug for InterruptStatus {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("InterruptStatus")
            .field("status", &self.status())
            .field("needs_reset", &self.needs_reset_pending())
            .field("trigger", &self.trigger)
            .finish_non_exhaustive()
    }
}

impl InterruptStatus {
    /// A register with nothing pending, driving `line` with `trigger`.
    /// Interrupts are held back until [`set_enabled`](Self::set_enabled).
    pub fn new(line: Arc<dyn IrqLine>, trigger: Trigger) -> Self {
        InterruptStatus {
            status: AtomicU32::new(0),
            enabled: AtomicBool::new(false),
            needs_reset: AtomicBool::new(false),
            generation: AtomicU32::new(0),
            line,
            trigger,
            level: Mutex::new(()),
        }
    }

    /// The pending bits ([`INT_USED_BUFFER`], [`INT_CONFIG_CHANGE`]).
    pub fn status(&self) -> u32 {
        // Acquire pairs with the AcqRel `fetch_or` in `raise`: a driver that
        // sees the bit also sees the used ring the device published before.
        self.status.load(Ordering::Acquire)
    }

    /// Clears the acknowledged `bits`; lowers a level-triggered line when
    /// nothing is left pending.
    pub fn ack(&self, bits: u32) {
        // Relaxed would do for the bits alone; AcqRel keeps the ack ordered
        // with the ring reads the driver makes afterwards.
        self.status.fetch_and(!bits, Ordering::AcqRel);
        if self.trigger == Trigger::Level {
            self.update_level();
        }
    }

    /// Whether the device reported that it needs a reset.
    pub fn needs_reset_pending(&self) -> bool {
        // Relaxed: a status flag read by the driver, no data hangs off it.
        self.needs_reset.load(Ordering::Relaxed)
    }

    /// The config generation: changes with every config-change interrupt.
    pub fn config_generation(&self) -> u32 {
        // Acquire pairs with the Release increment in `raise`: config bytes
        // written before the bump are visible once the new value is seen.
        self.generation.load(Ordering::Acquire)
    }

    /// Bumps the config generation without an interrupt (the device changed
    /// its configuration before DRIVER_OK, say).
    pub fn bump_config_generation(&self) {
        // Release: config bytes written before are visible with the new value.
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Lets interrupts through (`true`, at DRIVER_OK) or drops them
    /// (`false`, before DRIVER_OK and after a reset).
    pub fn set_enabled(&self, on: bool) {
        // Release/Acquire with `raise`: a device thread that sees `true`
        // also sees the activation that preceded it.
        self.enabled.store(on, Ordering::Release);
    }

    /// Device reset: nothing pending, no reset request, interrupts held back,
    /// level line lowered.
    pub fn reset(&self) {
        self.set_enabled(false);
        // Relaxed: the reset happens under the transport's register lock,
        // which orders it with the driver's next register access.
        self.needs_reset.store(false, Ordering::Relaxed);
        self.status.store(0, Ordering::Release);
        if self.trigger == Trigger::Level {
            self.update_level();
        }
    }

    fn update_level(&self) {
        let _g = self.level.lock();
        self.line.set_level(self.status() != 0);
    }
}

impl Interrupt for InterruptStatus {
    fn raise(&self, cause: InterruptCause) {
        // The generation moves even while interrupts are held back: a
        // driver reading config before DRIVER_OK must see the change.
        if cause == InterruptCause::ConfigChange {
            self.bump_config_generation();
        }
        // Acquire pairs with the Release in `set_enabled`.
        if !self.enabled.load(Ordering::Acquire) {
            return;
        }
        // AcqRel: Release publishes the used ring written before this raise
        // to whoever reads the bit; Acquire orders us after earlier acks.
        self.status.fetch_or(cause.status_bit(), Ordering::AcqRel);
        match self.trigger {
            Trigger::Edge => self.line.pulse(),
            Trigger::Level => self.update_level(),
        }
    }

    fn needs_reset(&self) {
        // Relaxed: the config-change interrupt below carries the ordering.
        self.needs_reset.store(true, Ordering::Relaxed);
        self.raise(InterruptCause::ConfigChange);
    }
}

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
/// (behind an [`InterruptStatus`]).
///
/// # Example
/// ```
/// use vmio::virtio::{Interrupt, InterruptCause, RecordingIrq};
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edge_pulses_per_raise_and_bits_stay_until_ack() {
        let line = Arc::new(RecordingIrq::new());
        let st = InterruptStatus::new(line.clone(), Trigger::Edge);
        st.raise(InterruptCause::UsedBuffer { queue: 0 });
        let g0 = st.config_generation();
        st.raise(InterruptCause::ConfigChange);
        assert_eq!(st.status(), 0, "held back before DRIVER_OK");
        assert_eq!(line.pulses(), 0);
        assert_ne!(st.config_generation(), g0, "generation moves anyway");
        st.set_enabled(true);
        st.raise(InterruptCause::UsedBuffer { queue: 0 });
        st.raise(InterruptCause::UsedBuffer { queue: 3 });
        assert_eq!(line.pulses(), 2);
        assert_eq!(st.status(), INT_USED_BUFFER);
        let g = st.config_generation();
        st.raise(InterruptCause::ConfigChange);
        assert_eq!(st.status(), INT_USED_BUFFER | INT_CONFIG_CHANGE);
        assert_ne!(st.config_generation(), g);
        st.ack(INT_USED_BUFFER);
        assert_eq!(st.status(), INT_CONFIG_CHANGE);
        st.reset();
        assert_eq!(st.status(), 0);
    }

    #[test]
    fn level_follows_pending_bits() {
        let line = Arc::new(RecordingIrq::new());
        let st = InterruptStatus::new(line.clone(), Trigger::Level);
        st.set_enabled(true);
        st.raise(InterruptCause::UsedBuffer { queue: 0 });
        assert!(line.level());
        st.raise(InterruptCause::ConfigChange);
        st.ack(INT_USED_BUFFER);
        assert!(line.level(), "config bit still pending");
        st.ack(INT_CONFIG_CHANGE);
        assert!(!line.level());
        assert_eq!(line.pulses(), 0);
    }

    /// Workers raise (after "publishing" a used entry) while a vCPU acks;
    /// once the workers are done and the vCPU sees no interrupt pending, it
    /// must have consumed every publication: a lost interrupt (line low
    /// with a bit pending, or a bit cleared without its entries being
    /// visible) leaves some unconsumed.
    #[cfg(feature = "std")]
    fn raise_vs_ack(trigger: Trigger) {
        extern crate std;
        use core::sync::atomic::AtomicU64;
        use std::thread;

        #[derive(Default)]
        struct Line {
            level: AtomicBool,
            pulses: AtomicU64,
        }
        impl IrqLine for Line {
            fn pulse(&self) {
                // Release pairs with the vCPU's Acquire load of `pulses`.
                self.pulses.fetch_add(1, Ordering::Release);
            }
            fn set_level(&self, asserted: bool) {
                // Release/Acquire as for `pulses`.
                self.level.store(asserted, Ordering::Release);
            }
        }

        const WORKERS: u64 = 2;
        let per = if cfg!(miri) { 200 } else { 50_000 };
        let line = Arc::new(Line::default());
        let st = Arc::new(InterruptStatus::new(line.clone(), trigger));
        st.set_enabled(true);
        let published = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicBool::new(false));
        let workers: Vec<_> = (0..WORKERS)
            .map(|w| {
                let (st, published) = (st.clone(), published.clone());
                thread::spawn(move || {
                    for _ in 0..per {
                        // Relaxed: the raise's Release publishes it.
                        published.fetch_add(1, Ordering::Relaxed);
                        st.raise(InterruptCause::UsedBuffer { queue: w as u16 });
                    }
                })
            })
            .collect();
        let vcpu = {
            let (st, line, published, done) =
                (st.clone(), line.clone(), published.clone(), done.clone());
            thread::spawn(move || {
                let mut consumed = 0;
                let mut handled = 0;
                loop {
                    // Acquire: `done` is set after the workers joined.
                    let finished = done.load(Ordering::Acquire);
                    let pending = match trigger {
                        Trigger::Level => line.level.load(Ordering::Acquire),
                        Trigger::Edge => line.pulses.load(Ordering::Acquire) != handled,
                    };
                    if pending {
                        handled = line.pulses.load(Ordering::Acquire);
                        let bits = st.status();
                        if bits != 0 {
                            st.ack(bits);
                        }
                        // Relaxed: ordered after the ack's Acquire.
                        consumed = published.load(Ordering::Relaxed);
                    } else if finished {
                        return consumed;
                    }
                }
            })
        };
        for w in workers {
            w.join().unwrap();
        }
        done.store(true, Ordering::Release);
        let consumed = vcpu.join().unwrap();
        assert_eq!(consumed, WORKERS * per, "{trigger:?}: an interrupt was lost");
        assert_eq!(st.status(), 0);
        assert!(!line.level.load(Ordering::Acquire), "line left high with nothing pending");
    }

    #[cfg(feature = "std")]
    #[test]
    fn level_raise_from_workers_while_vcpu_acks() {
        raise_vs_ack(Trigger::Level);
    }

    #[cfg(feature = "std")]
    #[test]
    fn edge_raise_from_workers_while_vcpu_acks() {
        raise_vs_ack(Trigger::Edge);
    }

    #[test]
    fn needs_reset_sets_flag_and_config_interrupt() {
        let line = Arc::new(RecordingIrq::new());
        let st = InterruptStatus::new(line.clone(), Trigger::Edge);
        st.set_enabled(true);
        st.needs_reset();
        assert!(st.needs_reset_pending());
        assert_eq!(st.status(), INT_CONFIG_CHANGE);
        st.reset();
        assert!(!st.needs_reset_pending());
    }
}
