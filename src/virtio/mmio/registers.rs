//! The register file of the virtio-mmio transport: what each register read
//! answers, and what each write does to the status machine, the feature
//! windows and the queue being programmed.

use alloc::vec::Vec;
use core::sync::atomic::Ordering;

use super::{MmioTransport, Registers};
use crate::device::DeviceError;
use crate::virtio::interrupt::Interrupt;
use crate::virtio::queue::SplitQueue;
use crate::virtio::spec::features::VIRTIO_F_VERSION_1;
use crate::virtio::spec::mmio as regs;
use crate::virtio::spec::ring::MAX_QUEUE_SIZE;
use crate::virtio::spec::status::{
    ACKNOWLEDGE, DEVICE_NEEDS_RESET, DRIVER, DRIVER_OK, FAILED, FEATURES_OK,
};
use crate::virtio::spec::{MMIO_MAGIC_VALUE, MMIO_VERSION};
use crate::virtio::{Activation, VirtioDevice};

impl<D: VirtioDevice> MmioTransport<D> {
    pub(super) fn read_reg(&self, offset: u64) -> Result<u32, DeviceError> {
        use regs::*;
        let r = self.regs.lock();
        let sel_queue = r.queues.get(r.queue_sel as usize);
        Ok(match offset {
            MAGIC_VALUE => MMIO_MAGIC_VALUE,
            VERSION => MMIO_VERSION,
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

    pub(super) fn write_reg(&self, offset: u64, value: u32) -> Result<(), DeviceError> {
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
}
