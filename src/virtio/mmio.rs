//! The virtio-mmio transport, version 2: a [`Device`] on the MMIO bus that
//! runs the register file and status machine for a [`VirtioDevice`].
//!
//! Register state (status, feature windows, the queue addresses the driver
//! is programming) lives behind the transport's own lock. Interrupt state
//! lives in an [`InterruptStatus`] shared with the device, all atomics.
//! Queue state lives in the device, one lock per queue, and each queue has
//! a serve lock here. A QueueNotify write never takes the register lock: in
//! [`NotifyMode::Inline`] (the default) it serves the queue on the spot with
//! [`serve`](MmioTransport::serve), in [`NotifyMode::Deferred`] it only
//! signals the queue's [`QueueEvent`], and a worker calls `serve` later,
//! outside the bus. Notifies on different queues from different vCPUs never
//! meet on a lock here.
//!
//! Guest mistakes never panic: a register accessed at the wrong width or
//! offset is refused with a [`DeviceError`] (the VMM decides what the guest
//! sees); a bad queue setup or a device that refuses to activate sets
//! DEVICE_NEEDS_RESET and raises a config interrupt once interrupts are on.
//!
//! # Example
//! ```
//! use std::sync::Arc;
//! use vmio::virtio::mmio::{MmioTransport, MAGIC_VALUE};
//! use vmio::virtio::{GuestRam, RecordingIrq, Trigger};
//! use vmio::testing::EchoDevice;
//! use vmio::{IoBus, IoRange, Mmio, Width};
//!
//! let ram = Arc::new(GuestRam::new(0x8000_0000, 0x10_0000)?);
//! let line = Arc::new(RecordingIrq::new());
//! let dev = Arc::new(MmioTransport::new(EchoDevice::new(1), ram, line, Trigger::Edge));
//! let bus = IoBus::<Mmio>::new();
//! bus.register(IoRange::new(0x1000_0000, 0x200)?, dev)?;
//! assert_eq!(bus.read(0x1000_0000, Width::U32)?, u64::from(MAGIC_VALUE));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, Ordering};

use super::features::VIRTIO_F_VERSION_1;
use super::irq::{Interrupt, InterruptStatus, IrqLine, Trigger};
use super::memory::GuestMemory;
use super::notify::{NotifyMode, QueueEvent};
use super::queue::{MAX_QUEUE_SIZE, QueueConfig, SplitQueue};
use super::status::{ACKNOWLEDGE, DEVICE_NEEDS_RESET, DRIVER, DRIVER_OK, FAILED, FEATURES_OK};
use super::{Activation, QueueStop, VirtioDevice};
use crate::addr::Width;
use crate::device::{Access, Device, DeviceError};
use crate::sync::Mutex;

/// "virt" in little-endian ASCII.
pub const MAGIC_VALUE: u32 = 0x7472_6976;
/// The non-legacy virtio-mmio version.
pub const VERSION: u32 = 2;

/// Register offsets of the virtio-mmio transport.
pub mod regs {
    /// Magic value "virt" (R).
    pub const MAGIC_VALUE: u64 = 0x000;
    /// Version, 2 (R).
    pub const VERSION: u64 = 0x004;
    /// Device type (R).
    pub const DEVICE_ID: u64 = 0x008;
    /// Vendor id (R).
    pub const VENDOR_ID: u64 = 0x00c;
    /// 32 feature bits selected by DeviceFeaturesSel (R).
    pub const DEVICE_FEATURES: u64 = 0x010;
    /// Selects feature bits 0–31 (0) or 32–63 (1) (W).
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    /// 32 accepted feature bits selected by DriverFeaturesSel (W).
    pub const DRIVER_FEATURES: u64 = 0x020;
    /// Selects the DriverFeatures window (W).
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    /// Selects the queue the queue registers refer to (W).
    pub const QUEUE_SEL: u64 = 0x030;
    /// Largest size of the selected queue, 0 if it does not exist (R).
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    /// Size of the selected queue (W).
    pub const QUEUE_NUM: u64 = 0x038;
    /// The selected queue is ready (RW).
    pub const QUEUE_READY: u64 = 0x044;
    /// Queue notification: the queue index (W).
    pub const QUEUE_NOTIFY: u64 = 0x050;
    /// Pending interrupt causes (R).
    pub const INTERRUPT_STATUS: u64 = 0x060;
    /// Acknowledges interrupt causes (W).
    pub const INTERRUPT_ACK: u64 = 0x064;
    /// Device status; writing 0 resets (RW).
    pub const STATUS: u64 = 0x070;
    /// Descriptor table address, low half (W).
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    /// Descriptor table address, high half (W).
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    /// Available ring address, low half (W).
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    /// Available ring address, high half (W).
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    /// Used ring address, low half (W).
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    /// Used ring address, high half (W).
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    /// Selects a shared memory region (W).
    pub const SHM_SEL: u64 = 0x0ac;
    /// Length of the selected region, low half; all-ones: none (R).
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    /// Length of the selected region, high half (R).
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    /// Base of the selected region, low half; all-ones: none (R).
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    /// Base of the selected region, high half (R).
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    /// Resets the selected queue (RW, with VIRTIO_F_RING_RESET only).
    pub const QUEUE_RESET: u64 = 0x0c0;
    /// Config generation (R).
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    /// Start of the device configuration space.
    pub const CONFIG: u64 = 0x100;
}

/// Offset of the QueueNotify register, where a VMM registers a KVM
/// ioeventfd per queue: a 4-byte write whose data (the datamatch) is the
/// queue index. Same as [`regs::QUEUE_NOTIFY`].
pub const QUEUE_NOTIFY_OFFSET: u64 = regs::QUEUE_NOTIFY;

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
/// use std::sync::Arc;
/// use vmio::virtio::{CondvarEvent, GuestRam, MmioTransport, QueueEvent, QueueWorkers};
/// use vmio::virtio::{RecordingIrq, Trigger};
/// use vmio::testing::EchoDevice;
///
/// let ram = Arc::new(GuestRam::new(0x8000_0000, 0x10_0000)?);
/// let dev = Arc::new(MmioTransport::new(
///     EchoDevice::new(2), ram, Arc::new(RecordingIrq::new()), Trigger::Edge));
/// // One event per queue: a KVM VMM would wrap the eventfd it registers as
/// // an ioeventfd at base + QUEUE_NOTIFY_OFFSET with datamatch = queue.
/// let events: Vec<Arc<dyn QueueEvent>> =
///     (0..dev.num_queues()).map(|_| Arc::new(CondvarEvent::new()) as _).collect();
/// let workers = QueueWorkers::spawn(dev.clone(), events)?;
/// // ... plug `dev` into the bus, run the guest ...
/// workers.shutdown();
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

    fn read_reg(&self, offset: u64) -> Result<u32, DeviceError> {
        use regs::*;
        let r = self.regs.lock();
        let sel_queue = r.queues.get(r.queue_sel as usize);
        Ok(match offset {
            MAGIC_VALUE => self::MAGIC_VALUE,
            VERSION => self::VERSION,
            DEVICE_ID => self.device.device_type(),
            VENDOR_ID => self.device.vendor_id(),
            DEVICE_FEATURES => {
                let f = self.device.features();
                match r.device_features_sel {
                    0 => f as u32,
                    1 => (f >> 32) as u32,
                    _ => 0,
                }
            }
            QUEUE_NUM_MAX => match sel_queue {
                Some(_) => u32::from(self.device.max_queue_size(r.queue_sel as u16)),
                None => 0,
            },
            QUEUE_READY => sel_queue.is_some_and(|q| q.ready).into(),
            INTERRUPT_STATUS => self.irq.status(),
            STATUS => {
                if self.irq.needs_reset_pending() {
                    r.status | DEVICE_NEEDS_RESET
                } else {
                    r.status
                }
            }
            // No shared memory regions: length and base all-ones.
            SHM_LEN_LOW | SHM_LEN_HIGH | SHM_BASE_LOW | SHM_BASE_HIGH => u32::MAX,
            // RING_RESET is never offered: no queue is ever being reset.
            QUEUE_RESET => 0,
            CONFIG_GENERATION => self.irq.config_generation(),
            DEVICE_FEATURES_SEL | DRIVER_FEATURES | DRIVER_FEATURES_SEL | QUEUE_SEL | QUEUE_NUM
            | QUEUE_NOTIFY | INTERRUPT_ACK | QUEUE_DESC_LOW | QUEUE_DESC_HIGH
            | QUEUE_DRIVER_LOW | QUEUE_DRIVER_HIGH | QUEUE_DEVICE_LOW | QUEUE_DEVICE_HIGH
            | SHM_SEL => return Err(DeviceError::WriteOnly),
            _ => return Err(DeviceError::InvalidOffset(offset)),
        })
    }

    fn write_reg(&self, offset: u64, value: u32) -> Result<(), DeviceError> {
        use regs::*;
        if offset == QUEUE_NOTIFY {
            self.notify(value);
            return Ok(());
        }
        if offset == INTERRUPT_ACK {
            self.irq.ack(value);
            return Ok(());
        }
        let mut r = self.regs.lock();
        let live = r.status & DRIVER_OK != 0;
        let sel = r.queue_sel as usize;
        match offset {
            DEVICE_FEATURES_SEL => r.device_features_sel = value,
            DRIVER_FEATURES_SEL => r.driver_features_sel = value,
            DRIVER_FEATURES => {
                // Accepted features are frozen once FEATURES_OK is set.
                if r.status & FEATURES_OK == 0 {
                    let v = u64::from(value);
                    match r.driver_features_sel {
                        0 => r.driver_features = (r.driver_features & !0xffff_ffff) | v,
                        1 => r.driver_features = (r.driver_features & 0xffff_ffff) | (v << 32),
                        // Windows above 1 hold no features: writing 0 there
                        // is harmless, anything else is an unoffered feature.
                        _ => r.driver_features_beyond |= value != 0,
                    }
                }
            }
            QUEUE_SEL => r.queue_sel = value,
            QUEUE_NUM => {
                if let Some(q) = r.queues.get_mut(sel).filter(|q| !q.ready && !live) {
                    // Wider values cannot be valid sizes; keep them invalid.
                    q.config.size = u16::try_from(value).unwrap_or(0);
                }
            }
            QUEUE_DESC_LOW | QUEUE_DESC_HIGH | QUEUE_DRIVER_LOW | QUEUE_DRIVER_HIGH
            | QUEUE_DEVICE_LOW | QUEUE_DEVICE_HIGH => {
                if let Some(q) = r.queues.get_mut(sel).filter(|q| !q.ready && !live) {
                    let field = match offset {
                        QUEUE_DESC_LOW | QUEUE_DESC_HIGH => &mut q.config.desc_table,
                        QUEUE_DRIVER_LOW | QUEUE_DRIVER_HIGH => &mut q.config.avail_ring,
                        _ => &mut q.config.used_ring,
                    };
                    let v = u64::from(value);
                    *field = if offset & 4 == 0 {
                        (*field & !0xffff_ffff) | v
                    } else {
                        (*field & 0xffff_ffff) | (v << 32)
                    };
                }
            }
            QUEUE_READY => self.write_queue_ready(&mut r, sel, value),
            STATUS => self.write_status(&mut r, value),
            // No regions to select; remember nothing.
            SHM_SEL => {}
            // Without RING_RESET the register is reserved: ignore writes.
            QUEUE_RESET => {}
            MAGIC_VALUE | VERSION | DEVICE_ID | VENDOR_ID | DEVICE_FEATURES | QUEUE_NUM_MAX
            | INTERRUPT_STATUS | SHM_LEN_LOW | SHM_LEN_HIGH | SHM_BASE_LOW | SHM_BASE_HIGH
            | CONFIG_GENERATION => return Err(DeviceError::ReadOnly),
            _ => return Err(DeviceError::InvalidOffset(offset)),
        }
        Ok(())
    }

    fn write_queue_ready(&self, r: &mut Registers, sel: usize, value: u32) {
        // Queues are set up before DRIVER_OK; without RING_RESET they cannot
        // change afterwards. A driver that stops using a queue still writes
        // 0 and waits to read 0 back (virtio 1.2, 4.2.2.2; the virtio-drivers
        // crate spins on it when it drops a device), so the register must
        // follow, even though the queue's addresses stay as they were.
        if r.status & DRIVER_OK != 0 {
            let Some(q) = r.queues.get_mut(sel) else { return };
            // A read returns what was last written (4.2.2.1).
            q.ready = value != 0;
            let activated = q.activated;
            if !self.is_active() || !activated {
                // Nothing the device serves: a queue left unused at
                // DRIVER_OK cannot be added later without RING_RESET.
                return;
            }
            if value == 0 {
                // From now on the device must not touch the queue: wait for
                // a serve in progress, then keep everyone out.
                self.stop_queue(sel, true);
            } else {
                // Same addresses, same ring positions: carry on.
                self.start_queue(sel, true);
            }
            return;
        }
        let max = self.device.max_queue_size(sel as u16);
        let Some(q) = r.queues.get_mut(sel) else { return };
        if value == 0 {
            q.ready = false;
            return;
        }
        // Checked now, not at DRIVER_OK, so the driver learns at once.
        let fits = q.config.size <= max.min(MAX_QUEUE_SIZE);
        if fits && q.config.validate(&*self.memory).is_ok() {
            q.ready = true;
        } else {
            log::warn!("virtio-mmio: queue {sel} set up invalid: {:?}", q.config);
            self.irq.needs_reset();
        }
    }

    fn write_status(&self, r: &mut Registers, value: u32) {
        if value == 0 {
            self.reset_locked(r);
            return;
        }
        // The driver cannot set DEVICE_NEEDS_RESET; only 8 bits exist.
        let value = value & 0xff & !DEVICE_NEEDS_RESET;
        let old = r.status;
        if old & !value != 0 {
            // Clearing a bit other than by reset is a driver bug: ignore.
            log::warn!("virtio-mmio: status write {value:#x} clears bits of {old:#x}");
            return;
        }
        let added = value & !old;
        let mut new = value;
        if added & FEATURES_OK != 0 && !self.features_acceptable(new, r) {
            // The driver re-reads status and sees FEATURES_OK refused.
            new &= !FEATURES_OK;
        }
        if added & DRIVER_OK != 0 {
            if new & FEATURES_OK == 0 || new & FAILED != 0 {
                new &= !DRIVER_OK;
                self.irq.needs_reset();
            } else {
                r.status = new;
                self.activate(r);
                return;
            }
        }
        r.status = new;
    }

    /// FEATURES_OK is accepted only in order, for offered features, with
    /// VERSION_1 (this is a modern-only transport).
    fn features_acceptable(&self, status: u32, r: &Registers) -> bool {
        let in_order = status & (ACKNOWLEDGE | DRIVER) == ACKNOWLEDGE | DRIVER;
        let driver = r.driver_features;
        in_order
            && !r.driver_features_beyond
            && driver & !self.device.features() == 0
            && driver & VIRTIO_F_VERSION_1 != 0
    }

    fn activate(&self, r: &mut Registers) {
        let features = r.driver_features;
        let mut queues = Vec::with_capacity(r.queues.len());
        for (i, q) in r.queues.iter().enumerate() {
            if !q.ready {
                queues.push(None);
                continue;
            }
            match SplitQueue::new(q.config, features, &*self.memory) {
                Ok(sq) => queues.push(Some(sq)),
                Err(e) => {
                    // Memory can shrink between QueueReady and DRIVER_OK.
                    log::warn!("virtio-mmio: queue {i} unusable at DRIVER_OK: {e}");
                    self.irq.set_enabled(true);
                    self.irq.needs_reset();
                    return;
                }
            }
        }
        // Interrupts on first, so the device may raise from `activate`.
        self.irq.set_enabled(true);
        let activation = Activation {
            queues,
            memory: self.memory.clone(),
            interrupt: self.irq.clone(),
            features,
        };
        match self.device.activate(activation) {
            Ok(()) => {
                for (i, q) in r.queues.iter_mut().enumerate() {
                    if q.ready {
                        q.activated = true;
                        self.start_queue(i, false);
                    }
                }
                // Release pairs with the Acquire in `notify`/`is_active`.
                self.active.store(true, Ordering::Release);
            }
            Err(e) => {
                log::warn!("virtio-mmio: device refused to activate: {e}");
                self.irq.needs_reset();
            }
        }
    }

    fn notify(&self, value: u32) {
        // Acquire pairs with the Release in `activate`: the device's queues
        // are in place before we call into it.
        if !self.active.load(Ordering::Acquire) {
            return;
        }
        // Without VIRTIO_F_NOTIFICATION_DATA the value is the queue index;
        // anything out of range (a "negative" index too) is ignored.
        let Ok(q) = u16::try_from(value) else { return };
        let Some(gate) = self.gates.get(usize::from(q)) else { return };
        // Acquire pairs with the Release in `set_notify_mode`.
        if gate.deferred.load(Ordering::Acquire)
            && let Some(ev) = &*gate.event.lock()
        {
            ev.signal();
            return;
        }
        self.serve(q);
    }

    fn config_access_ok(offset: u64, width: Width) -> Result<u64, DeviceError> {
        // 8-bit, 16-bit and 32-bit aligned accesses only; 64-bit fields are
        // read as two 32-bit halves on this transport.
        if width == Width::U64 || !offset.is_multiple_of(width.bytes()) {
            return Err(DeviceError::InvalidWidth(width));
        }
        Ok(offset - regs::CONFIG)
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
        if access.width != Width::U32 || !off.is_multiple_of(4) {
            return Err(DeviceError::InvalidWidth(access.width));
        }
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
        if access.width != Width::U32 || !off.is_multiple_of(4) {
            return Err(DeviceError::InvalidWidth(access.width));
        }
        // The bus truncated `value` to 32 bits already.
        self.write_reg(off, value as u32)
    }
}

impl<T: VirtioDevice + ?Sized> VirtioDevice for Arc<T> {
    fn device_type(&self) -> u32 {
        (**self).device_type()
    }
    fn vendor_id(&self) -> u32 {
        (**self).vendor_id()
    }
    fn features(&self) -> u64 {
        (**self).features()
    }
    fn num_queues(&self) -> u16 {
        (**self).num_queues()
    }
    fn max_queue_size(&self, queue: u16) -> u16 {
        (**self).max_queue_size(queue)
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        (**self).read_config(offset, data)
    }
    fn write_config(&self, offset: u64, data: &[u8]) {
        (**self).write_config(offset, data)
    }
    fn activate(&self, activation: Activation) -> Result<(), super::ActivateError> {
        (**self).activate(activation)
    }
    fn serve(&self, queue: u16, stop: &super::QueueStop) {
        (**self).serve(queue, stop)
    }
    fn queue_stopped(&self, queue: u16) {
        (**self).queue_stopped(queue)
    }
    fn queue_started(&self, queue: u16) {
        (**self).queue_started(queue)
    }
    fn reset(&self) {
        (**self).reset()
    }
}
