//! vmio routes guest device accesses — MMIO, port I/O and system registers —
//! from vCPU threads to the devices that own them, while devices are plugged
//! and unplugged underneath.
//!
//! Each address space has an [`IoBus`]: an immutable, sorted interval table
//! published through an atomic pointer and reclaimed after a grace period.
//! A lookup through a [`VcpuHandle`] marks itself active (one store to the
//! handle's own cache line, no fence: the fence is the reclaimer's, through
//! `membarrier` on Linux), loads, searches and calls the device: no lock, no
//! retry, no allocation and no shared-cache-line write. Hot-plug copies the table, edits it, validates
//! it and swaps it in; the old table is freed after a grace period.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicU64, Ordering};
//! use vmio::{Access, Device, DeviceError, IoBus, IoRange, Mmio, Width};
//!
//! /// A scratch register bank.
//! struct Scratch(AtomicU64);
//!
//! impl Device for Scratch {
//!     fn read(&self, _access: Access) -> Result<u64, DeviceError> {
//!         Ok(self.0.load(Ordering::Relaxed))
//!     }
//!     fn write(&self, _access: Access, value: u64) -> Result<(), DeviceError> {
//!         self.0.store(value, Ordering::Relaxed);
//!         Ok(())
//!     }
//! }
//!
//! let bus = IoBus::<Mmio>::new();
//! let id = bus.register(IoRange::new(0x1000_0000, 0x1000)?, Arc::new(Scratch(AtomicU64::new(0))))?;
//!
//! // One handle per vCPU thread: the lock-free hot path.
//! let mut vcpu = bus.handle(0);
//! vcpu.write(0x1000_0008, Width::U32, 0xabcd)?;
//! assert_eq!(vcpu.read(0x1000_0008, Width::U32)?, 0xabcd);
//!
//! // Unplug, then wait until no vCPU can still be inside the device.
//! let unplug = bus.unregister(id)?;
//! unplug.wait()?;
//! assert!(vcpu.read(0x1000_0008, Width::U32).is_err());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![no_std]
#![warn(missing_docs, unsafe_op_in_unsafe_fn)]
#![warn(
    clippy::std_instead_of_core,
    clippy::std_instead_of_alloc,
    clippy::alloc_instead_of_core,
    clippy::undocumented_unsafe_blocks
)]

extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

mod addr;
mod bus;
mod config;
mod device;
mod devices;
pub mod docs;
mod error;
mod irq;
mod manager;
mod memory;
pub mod sync;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod virtio;

/// Compiles the README's Rust examples as doctests, so it stays true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

pub use addr::{AddressSpace, IoRange, Mmio, Pio, SysReg, Width};
pub use bus::{Committed, DeviceId, Edit, IoBus, Unplug, VcpuHandle};
pub use config::{ConfigError, ConfigErrorKind, DeviceConfig, ParamValue, Space, VmDeviceConfig};
pub use device::{Access, Device, DeviceError, DeviceMut, Locked};
pub use devices::{
    BuildEnv, Built, ConsoleSink, Constructor, DeviceKinds, MAX_RAM_DISK, RX_CAPACITY, Reserved,
    Uart16550, UartOutput, VirtioBlkMmio,
};
pub use error::{AccessError, BusError, RangeError, WaitError, WidthError};
pub use irq::{InterruptController, IrqLine};
pub use manager::{
    DeviceInfo, DeviceManager, DeviceManagerBuilder, DispatchError, LogLevel, ManagerError,
    MissPolicy, VcpuIo,
};
pub use memory::{GuestMemory, GuestRam, GuestRamError, MemoryError};
