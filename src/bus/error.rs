//! Why a bus edit, a dispatched access or an unplug wait failed.
//!
//! Nothing a guest does makes vmio panic; every failure is one of these.

use core::fmt;

use crate::addr::RangeError;
use crate::device::{DeviceError, DeviceId};

/// Why a bus edit (register, unregister, move, transaction) was refused.
/// A refused edit changes nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
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
#[non_exhaustive]
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
#[non_exhaustive]
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
