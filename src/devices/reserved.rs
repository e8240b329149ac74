//! A reserved hole: a range the platform must decode but nothing implements.

use crate::device::{Access, Device, DeviceError};

/// Reads return a fixed value (truncated to the access width), writes are
/// ignored. Typical uses: the all-ones answer of an absent PCI function, a
/// zero-reading chipset register a guest probes, a port a firmware pokes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reserved {
    value: u64,
}

impl Reserved {
    /// A hole reading as `value`.
    pub const fn new(value: u64) -> Self {
        Reserved { value }
    }

    /// The value every read returns (before width truncation).
    pub const fn value(&self) -> u64 {
        self.value
    }
}

impl Device for Reserved {
    fn read(&self, _access: Access) -> Result<u64, DeviceError> {
        // The bus truncates to the access width.
        Ok(self.value)
    }

    fn write(&self, _access: Access, _value: u64) -> Result<(), DeviceError> {
        Ok(())
    }
}
