//! Error values of the bus: range construction, edits, accesses and waits.
//!
//! Nothing a guest does makes vmio panic; every failure is one of these.

use core::fmt;

use crate::bus::DeviceId;
use crate::device::DeviceError;

/// An access width that is not 1, 2, 4 or 8 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WidthError(pub u64);

impl fmt::Display for WidthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid access width {} (must be 1, 2, 4 or 8 bytes)", self.0)
    }
}
impl core::error::Error for WidthError {}

/// A range that cannot exist in its address space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeError {
    /// The range has zero length.
    Empty {
        /// Where it would have started.
        start: u64,
    },
    /// The range runs past the top address of its space.
    Wraps {
        /// First address.
        start: u64,
        /// Requested length.
        len: u64,
        /// The top address of the space.
        top: u64,
    },
    /// An inclusive range whose last address lies before its start.
    Inverted {
        /// First address.
        start: u64,
        /// Last address.
        last: u64,
    },
}

impl fmt::Display for RangeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            RangeError::Empty { start } => write!(f, "zero-length range at {start:#x}"),
            RangeError::Wraps { start, len, top } => write!(
                f,
                "range of {len:#x} bytes at {start:#x} runs past the top of the space ({top:#x})"
            ),
            RangeError::Inverted { start, last } => {
                write!(f, "range end {last:#x} lies before its start {start:#x}")
            }
        }
    }
}
impl core::error::Error for RangeError {}

/// Why a bus edit (register, unregister, move, transaction) was refused.
/// A refused edit changes nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusError {
    /// The requested range is invalid.
    Range(RangeError),
    /// The requested range overlaps a device already on the bus.
    Overlap {
        /// The range that was asked for.
        start: u64,
        /// Its last address.
        last: u64,
        /// The device already there.
        existing: DeviceId,
        /// That device's first address.
        existing_start: u64,
        /// That device's last address.
        existing_last: u64,
    },
    /// No device with this id is on the bus.
    UnknownDevice(DeviceId),
}

impl fmt::Display for BusError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BusError::Range(e) => e.fmt(f),
            BusError::Overlap { start, last, existing, existing_start, existing_last } => write!(
                f,
                "range {start:#x}..={last:#x} overlaps device {existing} at \
                 {existing_start:#x}..={existing_last:#x}"
            ),
            BusError::UnknownDevice(id) => write!(f, "no device {id} on this bus"),
        }
    }
}
impl core::error::Error for BusError {}

impl From<RangeError> for BusError {
    fn from(e: RangeError) -> Self {
        BusError::Range(e)
    }
}

/// Why a dispatched access did not complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessError {
    /// No device owns `addr`.
    Unmapped {
        /// The first address of the access.
        addr: u64,
    },
    /// The access starts inside a device's range but does not end there.
    Straddles {
        /// The first address of the access.
        addr: u64,
        /// Access size in bytes.
        width: u64,
        /// The device whose range it starts in.
        device: DeviceId,
    },
    /// The device refused the access.
    Device {
        /// The device that was called.
        device: DeviceId,
        /// What it said.
        error: DeviceError,
    },
}

impl fmt::Display for AccessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AccessError::Unmapped { addr } => write!(f, "no device at {addr:#x}"),
            AccessError::Straddles { addr, width, device } => {
                write!(f, "{width}-byte access at {addr:#x} runs past the end of device {device}")
            }
            AccessError::Device { device, error } => write!(f, "device {device}: {error}"),
        }
    }
}
impl core::error::Error for AccessError {}

/// Why an unplug wait could not block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitError {
    /// The calling thread is itself inside a dispatch: waiting would deadlock
    /// on its own dispatch. Finish the device call first, or call
    /// [`Unplug::poll`](crate::Unplug::poll) later.
    InsideDispatch,
}

impl fmt::Display for WaitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WaitError::InsideDispatch => {
                f.write_str("cannot wait for an unplug from inside a device dispatch")
            }
        }
    }
}
impl core::error::Error for WaitError {}
