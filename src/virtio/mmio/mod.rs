//! The virtio-mmio transport, version 2: a [`Device`] on the MMIO bus that
//! runs the register file and status machine for a [`VirtioDevice`].
//!
//! Its design notes are on [`MmioTransport`].

mod registers;

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, Ordering};

use super::interrupt::{InterruptStatus, Trigger};
use super::notify::{NotifyMode, QueueEvent};
use super::queue::QueueConfig;
use super::spec::mmio as regs;
use super::spec::status::DEVICE_NEEDS_RESET;
use super::{QueueStop, VirtioDevice};
use crate::addr::Width;
use crate::device::{Access, Device, DeviceError};
use crate::irq::IrqLine;
use crate::memory::GuestMemory;
use crate::sync::Mutex;

/// What the driver programmed for one queue.
#[derive(Debug, Clone, Copy, Default)]
struct QueueRegs {
    config: QueueConfig,
    /// QueueReady as last written (what a read returns).
    ready: bool,
    /// The device received this queue at DRIVER_OK.
    activated: bool,
}

/// The serving side of one queue, on cache lines of its own so that
/// workers (or vCPUs) on different queues never share one.
///
/// Lock order: the register lock, then `serving`, then the device's own
/// locks; `event` is a leaf (only [`QueueEvent`] methods run under it).
#[repr(align(128))]
struct QueueGate {
    /// Whether the queue is live (may be served). Held for the whole of a
    /// serve, so stopping the queue waits for the serve in progress.
    serving: Mutex<bool>,
    /// `serving`'s value, readable without the lock (fast paths only).
    live: AtomicBool,
    /// Asks a serve in progress to end after its current request.
    stop: QueueStop,
    /// Deferred mode: a notify signals `event` instead of serving.
    deferred: AtomicBool,
    event: Mutex<Option<Arc<dyn QueueEvent>>>,
}

impl QueueGate {
    fn new() -> Self {
        QueueGate {
            serving: Mutex::new(false),
            live: AtomicBool::new(false),
            stop: QueueStop::new(),
            deferred: AtomicBool::new(false),
            event: Mutex::new(None),
        }
    }
}

/// Everything behind the register lock.
#[derive(Debug)]
struct Registers {
    /// Driver-written status bits (DEVICE_NEEDS_RESET is added on read).
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    /// A non-zero DriverFeatures write to a window above bits 32–63: the
    /// driver claims features nobody offered.
    driver_features_beyond: bool,
    queue_sel: u32,
    queues: Vec<QueueRegs>,
}

/// The virtio-mmio transport, version 2: a [`Device`] on the MMIO bus that
/// runs the register file and status machine for a [`VirtioDevice`].
///
/// Register state (status, feature windows, the queue addresses the driver
/// is programming) lives behind the transport's own lock. Interrupt state
/// lives in an [`InterruptStatus`] shared with the device, all atomics.
/// Queue state lives in the device, one lock per queue, and each queue has
/// a serve lock here. A QueueNotify write never takes the register lock: in
/// [`NotifyMode::Inline`] (the default) it serves the queue on the spot with
/// [`serve`](MmioTransport::serve), in [`NotifyMode::Deferred`] it only
/// signals the queue's [`QueueEvent`], and a worker calls `serve` later,
/// outside the bus. Notifies on different queues from different vCPUs never
/// meet on a lock here.
///
/// Guest mistakes never panic: a register accessed at the wrong width or
/// offset is refused with a [`DeviceError`] (the VMM decides what the guest
/// sees); a bad queue setup or a device that refuses to activate sets
/// DEVICE_NEEDS_RESET and raises a config interrupt once interrupts are on.
///
/// # Example
/// ```
/// # #[cfg(feature = "testing")] { // uses the `testing` feature
/// use std::sync::Arc;
/// use vmio::testing::{EchoDevice, RecordingIrq};
/// use vmio::virtio::spec::MMIO_MAGIC_VALUE;
/// use vmio::virtio::{MmioTransport, Trigger};
/// use vmio::{GuestRam, IoBus, IoRange, Mmio, Width};
///
/// let ram = Arc::new(GuestRam::new(0x8000_0000, 0x10_0000)?);
/// let line = Arc::new(RecordingIrq::new());
/// let dev = Arc::new(MmioTransport::new(EchoDevice::new(1), ram, line, Trigger::Edge));
/// let bus = IoBus::<Mmio>::new();
/// bus.register(IoRange::new(0x1000_0000, 0x200)?, dev)?;
/// assert_eq!(bus.read(0x1000_0000, Width::U32)?, u64::from(MMIO_MAGIC_VALUE));
/// # }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// A virtio-mmio (version 2) transport for the device `D`.
///
/// Register at a 0x200-byte (or larger) MMIO range: 0x000–0x0ff are the
/// transport registers (32-bit, aligned accesses only), 0x100 onwards the
/// device configuration (1-, 2- or 4-byte aligned accesses).
///
/// Lock order: the register lock, then a queue's serve lock, then whatever
/// the device takes. QueueNotify and [`serve`](Self::serve) never take the
/// register lock.
///
/// # Deferred notification
/// ```
/// # #[cfg(feature = "testing")] { // uses the `testing` feature
/// use std::sync::Arc;
/// use vmio::virtio::{CondvarEvent, MmioTransport, QueueEvent, QueueWorkers};
/// use vmio::GuestRam;
/// use vmio::testing::RecordingIrq;
/// use vmio::virtio::Trigger;
/// use vmio::testing::EchoDevice;
///
/// let ram = Arc::new(GuestRam::new(0x8000_0000, 0x10_0000)?);
/// let dev = Arc::new(MmioTransport::new(
///     EchoDevice::new(2), ram, Arc::new(RecordingIrq::new()), Trigger::Edge));
/// // One event per queue: a KVM VMM would wrap the eventfd it registers as
/// // an ioeventfd at base + `spec::mmio::QUEUE_NOTIFY` with datamatch = queue.
/// let events: Vec<Arc<dyn QueueEvent>> =
///     (0..dev.num_queues()).map(|_| Arc::new(CondvarEvent::new()) as _).collect();
/// let workers = QueueWorkers::spawn(dev.clone(), events)?;
/// // ... plug `dev` into the bus, run the guest ...
/// workers.shutdown();
/// # }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct MmioTransport<D> {
    device: D,
    memory: Arc<dyn GuestMemory>,
    irq: Arc<InterruptStatus>,
    regs: Mutex<Registers>,
    /// Set once the device accepted DRIVER_OK; QueueNotify reads only this.
    active: AtomicBool,
    /// One per queue.
    gates: alloc::boxed::Box<[QueueGate]>,
}

impl<D> core::fmt::Debug for MmioTransport<D> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("regs", &*self.regs.lock())
            .field("irq", &self.irq)
            .finish_non_exhaustive()
    }
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// A transport for `device` over `memory`, raising `line` with `trigger`.
    pub fn new(
        device: D,
        memory: Arc<dyn GuestMemory>,
        line: Arc<dyn IrqLine>,
        trigger: Trigger,
    ) -> Self {
        let irq = Arc::new(InterruptStatus::new(line, trigger));
        Self::with_interrupt(device, memory, irq)
    }

    /// A transport around an [`InterruptStatus`] the caller keeps a handle to.
    pub fn with_interrupt(
        device: D,
        memory: Arc<dyn GuestMemory>,
        irq: Arc<InterruptStatus>,
    ) -> Self {
        let n = usize::from(device.num_queues());
        let queues = (0..n)
            .map(|i| QueueRegs {
                config: QueueConfig {
                    // Some drivers never write QueueNum; the largest size is
                    // the natural default.
                    size: device.max_queue_size(i as u16),
                    ..QueueConfig::default()
                },
                ready: false,
                activated: false,
            })
            .collect();
        MmioTransport {
            gates: (0..n).map(|_| QueueGate::new()).collect(),
            device,
            memory,
            irq,
            regs: Mutex::new(Registers {
                status: 0,
                device_features_sel: 0,
                driver_features_sel: 0,
                driver_features: 0,
                driver_features_beyond: false,
                queue_sel: 0,
                queues,
            }),
            active: AtomicBool::new(false),
        }
    }

    /// The device behind the transport.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// How many queues the device has (queue indices `0..num_queues`).
    pub fn num_queues(&self) -> u16 {
        self.device.num_queues()
    }

    /// Chooses where QueueNotify writes go; [`NotifyMode::Inline`] by
    /// default. Switching to deferred signals every live queue's new event
    /// once, so a worker picks up whatever is already waiting; switching
    /// back serves inline from the next notify on (a signal already given
    /// is still the old event's to handle).
    pub fn set_notify_mode(&self, mode: NotifyMode) {
        // Under the register lock: queue starts and stops, which tell the
        // events, never interleave with the switch.
        let _r = self.regs.lock();
        let events = match mode {
            NotifyMode::Inline => Vec::new(),
            NotifyMode::Deferred(events) => events,
        };
        for (i, gate) in self.gates.iter().enumerate() {
            let event = events.get(i).cloned();
            let mut slot = gate.event.lock();
            // Release pairs with the Acquire in `notify`; the event itself
            // is read under its lock.
            gate.deferred.store(event.is_some(), Ordering::Release);
            if let Some(ev) = &event {
                // Acquire: pairs with the Release in `start_queue`.
                let live = gate.live.load(Ordering::Acquire);
                ev.queue_state(live);
                if live {
                    ev.signal();
                }
            }
            *slot = event;
        }
    }

    /// Serves queue `queue` until it is empty (see
    /// [`VirtioDevice::serve`]); what a worker calls after its
    /// [`QueueEvent`] fired. Does nothing if the queue is not live (not set
    /// ready, stopped, device not activated or reset) or does not exist.
    ///
    /// Blocks while another thread serves the same queue, then serves it
    /// again itself: a notify that arrives during a serve is never lost.
    /// Call it outside any bus read section (a worker thread); a backend
    /// blocked in I/O then holds up nothing but this queue.
    pub fn serve(&self, queue: u16) {
        let Some(gate) = self.gates.get(usize::from(queue)) else { return };
        // Acquire pairs with the Release in `start_queue`; a fast path only,
        // the flag under the lock decides.
        if !gate.live.load(Ordering::Acquire) {
            return;
        }
        let live = gate.serving.lock();
        if *live {
            self.device.serve(queue, &gate.stop);
        }
    }

    /// Whether queue `queue` is live: activated at DRIVER_OK and not
    /// stopped or reset since.
    pub fn queue_live(&self, queue: u16) -> bool {
        // Acquire: pairs with the Release in `start_queue`/`stop_queue`.
        self.gates.get(usize::from(queue)).is_some_and(|g| g.live.load(Ordering::Acquire))
    }

    /// The interrupt state shared with the device.
    pub fn interrupt(&self) -> &Arc<InterruptStatus> {
        &self.irq
    }

    /// The status register as the driver reads it.
    pub fn status(&self) -> u32 {
        let s = self.regs.lock().status;
        if self.irq.needs_reset_pending() { s | DEVICE_NEEDS_RESET } else { s }
    }

    /// Whether the device was activated (DRIVER_OK accepted).
    pub fn is_active(&self) -> bool {
        // Acquire pairs with the Release in `activate`.
        self.active.load(Ordering::Acquire)
    }

    /// The features the driver accepted.
    pub fn driver_features(&self) -> u64 {
        self.regs.lock().driver_features
    }

    /// Device reset (what a Status write of 0 does), also for the VMM to call
    /// on a VM reset.
    pub fn reset(&self) {
        let mut r = self.regs.lock();
        self.reset_locked(&mut r);
    }

    fn reset_locked(&self, r: &mut Registers) {
        // Release: a notify that sees `false` will not reach the device;
        // one already past the check finds the queue stopped below.
        let was_active = self.active.swap(false, Ordering::AcqRel);
        // Every serve in progress ends (after the request it is executing,
        // completions published) before the interrupt state is cleared, so
        // no worker raises an interrupt into the reset device.
        for i in 0..self.gates.len() {
            self.stop_queue(i, false);
        }
        self.irq.reset();
        if was_active {
            self.device.reset();
        }
        r.status = 0;
        r.device_features_sel = 0;
        r.driver_features_sel = 0;
        r.driver_features = 0;
        r.driver_features_beyond = false;
        r.queue_sel = 0;
        for (i, q) in r.queues.iter_mut().enumerate() {
            *q = QueueRegs {
                config: QueueConfig {
                    size: self.device.max_queue_size(i as u16),
                    ..QueueConfig::default()
                },
                ready: false,
                activated: false,
            };
        }
    }

    /// Makes queue `i` live (under the register lock); `resume`: it was
    /// stopped after activation, tell the device.
    fn start_queue(&self, i: usize, resume: bool) {
        let gate = &self.gates[i];
        let mut live = gate.serving.lock();
        if *live {
            return;
        }
        if resume {
            self.device.queue_started(i as u16);
        }
        *live = true;
        // Release pairs with the Acquire in `serve`.
        gate.live.store(true, Ordering::Release);
        drop(live);
        if let Some(ev) = &*gate.event.lock() {
            ev.queue_state(true);
            // Buffers may have arrived while it was stopped.
            ev.signal();
        }
    }

    /// Stops queue `i` (under the register lock): ends and waits for the
    /// serve in progress; `tell`: call the device's `queue_stopped`.
    fn stop_queue(&self, i: usize, tell: bool) {
        let gate = &self.gates[i];
        gate.stop.request();
        let mut live = gate.serving.lock();
        gate.stop.clear();
        let was_live = core::mem::replace(&mut *live, false);
        // Release: pairs with the Acquire in `serve`/`queue_live`.
        gate.live.store(false, Ordering::Release);
        if was_live && tell {
            self.device.queue_stopped(i as u16);
        }
        drop(live);
        if was_live && let Some(ev) = &*gate.event.lock() {
            ev.queue_state(false);
        }
    }

    fn config_access_ok(offset: u64, width: Width) -> Result<u64, DeviceError> {
        // 8-bit, 16-bit and 32-bit aligned accesses only; 64-bit fields are
        // read as two 32-bit halves on this transport.
        if width == Width::U64 {
            return Err(DeviceError::InvalidWidth(width));
        }
        if !offset.is_multiple_of(width.bytes()) {
            return Err(DeviceError::Misaligned { offset, width });
        }
        Ok(offset - regs::CONFIG)
    }

    /// The register file takes aligned 32-bit accesses only.
    fn register_access_ok(offset: u64, width: Width) -> Result<(), DeviceError> {
        if width != Width::U32 {
            return Err(DeviceError::InvalidWidth(width));
        }
        if !offset.is_multiple_of(4) {
            return Err(DeviceError::Misaligned { offset, width });
        }
        Ok(())
    }
}

impl<D: VirtioDevice> Device for MmioTransport<D> {
    fn read(&self, access: Access) -> Result<u64, DeviceError> {
        let off = access.offset;
        if off >= regs::CONFIG {
            let cfg = Self::config_access_ok(off, access.width)?;
            let mut buf = [0u8; 4];
            let n = access.width.bytes() as usize;
            self.device.read_config(cfg, &mut buf[..n]);
            return Ok(u64::from(u32::from_le_bytes(buf)));
        }
        Self::register_access_ok(off, access.width)?;
        self.read_reg(off).map(u64::from)
    }

    fn write(&self, access: Access, value: u64) -> Result<(), DeviceError> {
        let off = access.offset;
        if off >= regs::CONFIG {
            let cfg = Self::config_access_ok(off, access.width)?;
            let n = access.width.bytes() as usize;
            // `value` holds at most 4 meaningful bytes here.
            let bytes = (value as u32).to_le_bytes();
            self.device.write_config(cfg, &bytes[..n]);
            return Ok(());
        }
        Self::register_access_ok(off, access.width)?;
        // The bus truncated `value` to 32 bits already.
        self.write_reg(off, value as u32)
    }
}
