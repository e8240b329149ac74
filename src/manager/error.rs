//! Why a manager operation failed.

use alloc::string::String;
use core::fmt;

use crate::bus::{BusError, WaitError};
use crate::config::ConfigError;

/// Why a manager operation failed. A failed operation changes nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ManagerError {
    /// A device configuration was refused; the error names device and field
    /// (an overlap names the other device).
    Config(ConfigError),
    /// No device has this name (or it was taken off its bus directly).
    NoSuchDevice(String),
    /// Waiting for an unplug was impossible: the caller is inside a dispatch.
    Wait(WaitError),
    /// A bus refused an edit for a reason the configuration does not
    /// explain.
    Bus {
        /// The device being placed, moved or removed.
        device: String,
        /// What the bus said.
        error: BusError,
    },
}

impl fmt::Display for ManagerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ManagerError::Config(e) => e.fmt(f),
            ManagerError::NoSuchDevice(name) => write!(f, "no device named `{name}`"),
            ManagerError::Wait(e) => e.fmt(f),
            ManagerError::Bus { device, error } => write!(f, "device `{device}`: {error}"),
        }
    }
}
impl core::error::Error for ManagerError {}

impl From<ConfigError> for ManagerError {
    fn from(e: ConfigError) -> Self {
        ManagerError::Config(e)
    }
}
