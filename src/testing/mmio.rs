//! A guest driver for virtio-mmio devices: brings a device up through its
//! registers in the order Linux's virtio-mmio driver does, then drives its
//! queues.

use alloc::vec::Vec;

use super::queue::{Buf, DriverError, GuestQueue};
use crate::addr::Width;
use crate::device::{Access, Device};
use crate::memory::GuestMemory;
use crate::virtio::spec::features::VIRTIO_F_RING_EVENT_IDX;
use crate::virtio::spec::mmio as regs;
use crate::virtio::spec::status::{ACKNOWLEDGE, DRIVER, DRIVER_OK, FAILED, FEATURES_OK};
use crate::virtio::spec::{MMIO_MAGIC_VALUE, MMIO_VERSION};

/// Register accesses as a guest makes them: offsets relative to the
/// device's MMIO base.
pub trait RegisterIo {
    /// One read of `width` at `offset`.
    ///
    /// # Errors
    /// [`DriverError::Register`] when the access is refused.
    fn read(&self, offset: u64, width: Width) -> Result<u64, DriverError>;
    /// One write of `width` at `offset`.
    ///
    /// # Errors
    /// [`DriverError::Register`] when the access is refused.
    fn write(&self, offset: u64, width: Width, value: u64) -> Result<(), DriverError>;
}

/// Accesses straight to a [`Device`], no bus in between.
#[derive(Debug, Clone, Copy)]
pub struct DirectIo<'a, D: ?Sized>(pub &'a D);

impl<D: Device + ?Sized> RegisterIo for DirectIo<'_, D> {
    fn read(&self, offset: u64, width: Width) -> Result<u64, DriverError> {
        let a = Access { offset, addr: offset, width, vcpu: None };
        self.0.read(a).map_err(|_| DriverError::Register { offset })
    }
    fn write(&self, offset: u64, width: Width, value: u64) -> Result<(), DriverError> {
        let a = Access { offset, addr: offset, width, vcpu: None };
        self.0.write(a, value & width.mask()).map_err(|_| DriverError::Register { offset })
    }
}

/// Accesses dispatched through an MMIO bus to the device at `base`.
#[cfg(feature = "std")]
#[derive(Debug, Clone, Copy)]
pub struct BusIo<'a> {
    /// The bus.
    pub bus: &'a crate::IoBus<crate::Mmio>,
    /// The device's base address on it.
    pub base: u64,
}

#[cfg(feature = "std")]
impl RegisterIo for BusIo<'_> {
    fn read(&self, offset: u64, width: Width) -> Result<u64, DriverError> {
        self.bus.read(self.base + offset, width).map_err(|_| DriverError::Register { offset })
    }
    fn write(&self, offset: u64, width: Width, value: u64) -> Result<(), DriverError> {
        self.bus
            .write(self.base + offset, width, value)
            .map_err(|_| DriverError::Register { offset })
    }
}

/// How [`MmioDriver::init`] brings the device up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitOptions {
    /// Features the driver would like; it accepts their intersection with
    /// what the device offers.
    pub features: u64,
    /// Write ACKNOWLEDGE and DRIVER in one status write (as the
    /// `virtio-drivers` crate does) instead of two (as Linux does).
    pub ack_and_driver_together: bool,
}

/// A virtio-mmio guest driver for tests.
#[derive(Debug)]
pub struct MmioDriver<R> {
    io: R,
    queues: Vec<Option<GuestQueue>>,
    features: u64,
}

impl<R: RegisterIo> MmioDriver<R> {
    /// A driver talking through `io`; nothing is accessed yet.
    pub fn new(io: R) -> Self {
        MmioDriver { io, queues: Vec::new(), features: 0 }
    }

    /// The register accessor.
    pub fn io(&self) -> &R {
        &self.io
    }

    /// Reads a 32-bit transport register.
    ///
    /// # Errors
    /// [`DriverError::Register`] when the device refuses.
    pub fn read_reg(&self, offset: u64) -> Result<u32, DriverError> {
        // A 32-bit access never yields more than 32 bits.
        self.io.read(offset, Width::U32).map(|v| v as u32)
    }

    /// Writes a 32-bit transport register.
    ///
    /// # Errors
    /// [`DriverError::Register`] when the device refuses.
    pub fn write_reg(&self, offset: u64, value: u32) -> Result<(), DriverError> {
        self.io.write(offset, Width::U32, u64::from(value))
    }

    /// The status register.
    ///
    /// # Errors
    /// [`DriverError::Register`] when the device refuses.
    pub fn status(&self) -> Result<u32, DriverError> {
        self.read_reg(regs::STATUS)
    }

    /// Resets the device (Status = 0) and forgets the queues.
    ///
    /// # Errors
    /// [`DriverError::Register`] when the device refuses.
    pub fn reset(&mut self) -> Result<(), DriverError> {
        self.queues.clear();
        self.write_reg(regs::STATUS, 0)
    }

    fn add_status(&self, bits: u32) -> Result<(), DriverError> {
        let s = self.status()?;
        self.write_reg(regs::STATUS, s | bits)
    }

    /// The negotiated features.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Device-offered feature bits (both windows).
    ///
    /// # Errors
    /// [`DriverError::Register`] when the device refuses.
    pub fn device_features(&self) -> Result<u64, DriverError> {
        self.write_reg(regs::DEVICE_FEATURES_SEL, 1)?;
        let hi = self.read_reg(regs::DEVICE_FEATURES)?;
        self.write_reg(regs::DEVICE_FEATURES_SEL, 0)?;
        let lo = self.read_reg(regs::DEVICE_FEATURES)?;
        Ok(u64::from(hi) << 32 | u64::from(lo))
    }

    /// Writes both DriverFeatures windows.
    ///
    /// # Errors
    /// [`DriverError::Register`] when the device refuses.
    pub fn write_driver_features(&self, features: u64) -> Result<(), DriverError> {
        self.write_reg(regs::DRIVER_FEATURES_SEL, 1)?;
        self.write_reg(regs::DRIVER_FEATURES, (features >> 32) as u32)?;
        self.write_reg(regs::DRIVER_FEATURES_SEL, 0)?;
        self.write_reg(regs::DRIVER_FEATURES, features as u32)
    }

    /// Brings the device up to FEATURES_OK: reset, ACKNOWLEDGE, DRIVER,
    /// identity checks, feature negotiation. Returns the negotiated features.
    ///
    /// # Errors
    /// [`DriverError::Device`] when the magic value or version is wrong or
    /// the device refuses FEATURES_OK (FAILED is then set, as Linux does).
    pub fn negotiate(&mut self, opts: InitOptions) -> Result<u64, DriverError> {
        if self.read_reg(regs::MAGIC_VALUE)? != MMIO_MAGIC_VALUE {
            return Err(DriverError::Device("bad magic value"));
        }
        if self.read_reg(regs::VERSION)? != MMIO_VERSION {
            return Err(DriverError::Device("not a version 2 device"));
        }
        if self.read_reg(regs::DEVICE_ID)? == 0 {
            return Err(DriverError::Device("placeholder device id 0"));
        }
        self.reset()?;
        if opts.ack_and_driver_together {
            self.write_reg(regs::STATUS, ACKNOWLEDGE | DRIVER)?;
        } else {
            self.add_status(ACKNOWLEDGE)?;
            self.add_status(DRIVER)?;
        }
        let features = self.device_features()? & opts.features;
        self.write_driver_features(features)?;
        self.add_status(FEATURES_OK)?;
        if self.status()? & FEATURES_OK == 0 {
            self.add_status(FAILED)?;
            return Err(DriverError::Device("FEATURES_OK refused"));
        }
        self.features = features;
        Ok(features)
    }

    /// Sets up queue `index` with `size` entries laid out from `base` in
    /// guest memory (see [`GuestQueue::footprint`]), as Linux's `setup_vq`.
    ///
    /// # Errors
    /// [`DriverError::Device`] when the queue does not exist, is already
    /// ready, is smaller than `size`, or does not read back ready.
    pub fn setup_queue<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        index: u16,
        size: u16,
        base: u64,
    ) -> Result<(), DriverError> {
        self.write_reg(regs::QUEUE_SEL, u32::from(index))?;
        if self.read_reg(regs::QUEUE_READY)? != 0 {
            return Err(DriverError::Device("queue already ready"));
        }
        let max = self.read_reg(regs::QUEUE_NUM_MAX)?;
        if max == 0 {
            return Err(DriverError::Device("queue does not exist"));
        }
        if u32::from(size) > max {
            return Err(DriverError::Device("queue smaller than requested"));
        }
        let mut q = GuestQueue::new(size, base);
        q.init(mem)?;
        self.program_queue(index, q)?;
        if self.read_reg(regs::QUEUE_READY)? != 1 {
            return Err(DriverError::Device("queue did not become ready"));
        }
        Ok(())
    }

    /// Programs `q`'s size and addresses for queue `index` and sets
    /// QueueReady, without any checks (hostile setups use this directly).
    ///
    /// # Errors
    /// [`DriverError::Register`] when the device refuses an access.
    pub fn program_queue(&mut self, index: u16, q: GuestQueue) -> Result<(), DriverError> {
        let c = q.config();
        self.write_reg(regs::QUEUE_SEL, u32::from(index))?;
        self.write_reg(regs::QUEUE_NUM, u32::from(c.size))?;
        for (lo, addr) in [
            (regs::QUEUE_DESC_LOW, c.desc_table),
            (regs::QUEUE_DRIVER_LOW, c.avail_ring),
            (regs::QUEUE_DEVICE_LOW, c.used_ring),
        ] {
            self.write_reg(lo, addr as u32)?;
            self.write_reg(lo + 4, (addr >> 32) as u32)?;
        }
        self.write_reg(regs::QUEUE_READY, 1)?;
        let i = usize::from(index);
        if self.queues.len() <= i {
            self.queues.resize(i + 1, None);
        }
        self.queues[i] = Some(q);
        Ok(())
    }

    /// Sets DRIVER_OK.
    ///
    /// # Errors
    /// [`DriverError::Device`] when the device reports DEVICE_NEEDS_RESET.
    pub fn driver_ok(&self) -> Result<(), DriverError> {
        self.add_status(DRIVER_OK)?;
        if self.status()? & crate::virtio::spec::status::DEVICE_NEEDS_RESET != 0 {
            return Err(DriverError::Device("device needs reset after DRIVER_OK"));
        }
        Ok(())
    }

    /// The whole bring-up: [`negotiate`](Self::negotiate), one
    /// [`setup_queue`](Self::setup_queue) per `(index, size, base)`, then
    /// [`driver_ok`](Self::driver_ok). Returns the negotiated features.
    ///
    /// # Errors
    /// The first step that fails.
    pub fn init<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        opts: InitOptions,
        queues: &[(u16, u16, u64)],
    ) -> Result<u64, DriverError> {
        let f = self.negotiate(opts)?;
        for &(index, size, base) in queues {
            self.setup_queue(mem, index, size, base)?;
        }
        self.driver_ok()?;
        Ok(f)
    }

    /// The driver side of queue `index`.
    ///
    /// # Panics
    /// When the queue was not set up: a test bug.
    pub fn queue(&mut self, index: u16) -> &mut GuestQueue {
        self.queues.get_mut(usize::from(index)).and_then(Option::as_mut).expect("queue was set up")
    }

    /// Writes QueueNotify.
    ///
    /// # Errors
    /// [`DriverError::Register`] when the device refuses.
    pub fn notify(&self, index: u16) -> Result<(), DriverError> {
        self.write_reg(regs::QUEUE_NOTIFY, u32::from(index))
    }

    /// Adds a chain to queue `index` and notifies if the device asked for it
    /// (EVENT_IDX / NO_NOTIFY aware). Returns the head.
    ///
    /// # Errors
    /// As for [`GuestQueue::add`] and [`notify`](Self::notify).
    pub fn submit<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        index: u16,
        bufs: &[Buf],
    ) -> Result<u16, DriverError> {
        let event_idx = self.features & VIRTIO_F_RING_EVENT_IDX != 0;
        let q = self.queue(index);
        let old = q.avail_idx();
        let head = q.add(mem, bufs)?;
        if q.needs_notify(mem, event_idx, old)? {
            self.notify(index)?;
        }
        Ok(head)
    }

    /// Reads InterruptStatus and acknowledges every bit set; returns them.
    ///
    /// # Errors
    /// [`DriverError::Register`] when the device refuses.
    pub fn ack_interrupt(&self) -> Result<u32, DriverError> {
        let bits = self.read_reg(regs::INTERRUPT_STATUS)?;
        if bits != 0 {
            self.write_reg(regs::INTERRUPT_ACK, bits)?;
        }
        Ok(bits)
    }

    /// Reads `width` bytes of device configuration at `offset`.
    ///
    /// # Errors
    /// [`DriverError::Register`] when the device refuses.
    pub fn read_config(&self, offset: u64, width: Width) -> Result<u64, DriverError> {
        self.io.read(regs::CONFIG + offset, width)
    }

    /// Writes `width` bytes of device configuration at `offset`.
    ///
    /// # Errors
    /// [`DriverError::Register`] when the device refuses.
    pub fn write_config(&self, offset: u64, width: Width, value: u64) -> Result<(), DriverError> {
        self.io.write(regs::CONFIG + offset, width, value)
    }

    /// Reads a 64-bit config field as two 32-bit halves, retrying while
    /// ConfigGeneration changes (the spec's consistent-read loop).
    ///
    /// # Errors
    /// [`DriverError::Register`] when the device refuses.
    pub fn read_config_u64(&self, offset: u64) -> Result<u64, DriverError> {
        loop {
            let g = self.read_reg(regs::CONFIG_GENERATION)?;
            let lo = self.read_config(offset, Width::U32)?;
            let hi = self.read_config(offset + 4, Width::U32)?;
            if self.read_reg(regs::CONFIG_GENERATION)? == g {
                return Ok(hi << 32 | lo);
            }
        }
    }
}
