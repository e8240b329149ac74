//! The `Device` trait every bus calls, and the adapter for `&mut self` devices.

use alloc::sync::Arc;
use core::fmt;

use crate::addr::Width;
use crate::sync::Mutex;

/// One guest access as a device sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    /// Offset of the access from the start of the device's range.
    pub offset: u64,
    /// Absolute address in the bus's address space.
    pub addr: u64,
    /// Access size. `offset + width` never runs past the device's range.
    pub width: Width,
    /// The vCPU that issued the access, when the caller said.
    pub vcpu: Option<u32>,
}

/// What a device can answer instead of a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeviceError {
    /// Nothing is decoded at this offset.
    InvalidOffset(u64),
    /// The register exists but not at this width.
    InvalidWidth(Width),
    /// The access is a width the register takes, at an offset not aligned
    /// to it (a 4-byte read at offset 2 of a 32-bit register).
    Misaligned {
        /// The offset of the access.
        offset: u64,
        /// Its width.
        width: Width,
    },
    /// The register is read-only: a write was refused.
    ReadOnly,
    /// The register is write-only.
    WriteOnly,
    /// The device failed for a reason of its own.
    Failed(&'static str),
}

impl fmt::Display for DeviceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceError::InvalidOffset(o) => write!(f, "nothing decoded at offset {o:#x}"),
            DeviceError::InvalidWidth(w) => write!(f, "{}-byte access not supported", w.bytes()),
            DeviceError::Misaligned { offset, width } => {
                write!(f, "{}-byte access at offset {offset:#x} is misaligned", width.bytes())
            }
            DeviceError::ReadOnly => f.write_str("register is read-only"),
            DeviceError::WriteOnly => f.write_str("register is write-only"),
            DeviceError::Failed(why) => f.write_str(why),
        }
    }
}
impl core::error::Error for DeviceError {}

/// An emulated device on a bus.
///
/// Calls arrive concurrently from every vCPU thread (`&self`), so a device
/// chooses its own locking; [`Locked`] serializes a [`DeviceMut`] for devices
/// that would rather not. A device may edit its own bus from inside a call
/// (a BAR move, an eject): bus writers never wait for readers.
pub trait Device: Send + Sync {
    /// A guest read. The value's bits above `access.width` are ignored.
    ///
    /// # Errors
    /// Whatever the device refuses; the bus passes it on to the caller.
    fn read(&self, access: Access) -> Result<u64, DeviceError>;

    /// A guest write of `value` (already truncated to `access.width`).
    ///
    /// # Errors
    /// Whatever the device refuses; the bus passes it on to the caller.
    fn write(&self, access: Access, value: u64) -> Result<(), DeviceError>;
}

/// A shared device is a device: lets an `Arc<dyn Device>` (or an `Arc` a
/// VMM keeps a second handle to) go wherever a `Device` does, e.g.
/// [`DeviceManager::add_device`](crate::DeviceManager::add_device).
impl<D: Device + ?Sized> Device for Arc<D> {
    #[inline]
    fn read(&self, access: Access) -> Result<u64, DeviceError> {
        (**self).read(access)
    }
    #[inline]
    fn write(&self, access: Access, value: u64) -> Result<(), DeviceError> {
        (**self).write(access, value)
    }
}

/// A device written against `&mut self`; wrap it in [`Locked`] to put it on a bus.
pub trait DeviceMut: Send {
    /// A guest read; see [`Device::read`].
    ///
    /// # Errors
    /// Whatever the device refuses.
    fn read(&mut self, access: Access) -> Result<u64, DeviceError>;
    /// A guest write; see [`Device::write`].
    ///
    /// # Errors
    /// Whatever the device refuses.
    fn write(&mut self, access: Access, value: u64) -> Result<(), DeviceError>;
}

/// A [`DeviceMut`] behind a mutex: one access at a time.
pub struct Locked<D>(Mutex<D>);

impl<D: DeviceMut> Locked<D> {
    /// Wraps `device`.
    pub fn new(device: D) -> Self {
        Locked(Mutex::new(device))
    }

    /// Runs `f` with the device locked (for the VMM's own inspection).
    pub fn with<R>(&self, f: impl FnOnce(&mut D) -> R) -> R {
        f(&mut self.0.lock())
    }
}

impl<D: DeviceMut> Device for Locked<D> {
    fn read(&self, access: Access) -> Result<u64, DeviceError> {
        self.0.lock().read(access)
    }
    fn write(&self, access: Access, value: u64) -> Result<(), DeviceError> {
        self.0.lock().write(access, value)
    }
}
/// Identifies a device registration. Ids are never reused within a bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeviceId(pub(crate) u64);

impl DeviceId {
    /// The raw id.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// The id whose raw value is `raw` (as returned by [`Self::get`]), for
    /// VMMs that keep ids in their own tables.
    pub const fn from_raw(raw: u64) -> Self {
        DeviceId(raw)
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}
