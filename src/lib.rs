//! vmio routes guest device accesses — MMIO, port I/O and system registers —
//! from vCPU threads to the devices that own them, while devices are plugged
//! and unplugged underneath.
//!
//! # VMM quick start
//!
//! A VMM describes its devices in TOML ([`VmDeviceConfig`]), builds a
//! [`DeviceManager`] from them, gives each vCPU thread a [`VcpuIo`] for its
//! I/O exits, hot-plugs devices by name, and adds kinds of its own to the
//! built-in ones ([`DeviceKinds`]):
//!
//! ```
//! use std::sync::Arc;
//! use vmio::{Built, DeviceConfig, DeviceKinds, DeviceManager, Reserved, Space};
//! use vmio::{VmDeviceConfig, Width};
//!
//! // 1. The devices, from TOML (`from_toml_file` for a file).
//! let vm = VmDeviceConfig::from_toml(r#"
//!     [[devices]]
//!     name = "com1"
//!     kind = "uart16550"
//!     base = 0x3f8
//!     length = 8
//!     params = { output = "discard" }
//!
//!     [[devices]]
//!     name = "midr"
//!     kind = "id-reg"
//!     base = 0xc000
//!     length = 8
//!     params = { value = 0x410f_d083 }
//! "#)?;
//!
//! // 2. The manager, with a kind of the VMM's own next to the built-in ones
//! //    (`.interrupts(..)` wires `irq`s to the VMM's interrupt controller).
//! let kinds = DeviceKinds::default().with("id-reg", &["value"], |env| {
//!     let value = env.config.param_u64("value")?.ok_or_else(|| env.config.missing("value"))?;
//!     Ok(Built::new(Space::SysReg, Arc::new(Reserved::new(value))))
//! });
//! let manager = DeviceManager::builder().kinds(kinds).build(&vm)?;
//!
//! // 3. Per vCPU thread: one `VcpuIo`, handed every I/O exit (lock-free).
//! let mut io = manager.vcpu(0);
//! io.handle_port_write(0x3ff, Width::U8, 0x5a)?; // the UART's scratch register
//! assert_eq!(io.handle_port_read(0x3ff, Width::U8)?, 0x5a);
//! assert_eq!(io.handle_sysreg_read(0xc000, Width::U64)?, 0x410f_d083);
//! let fault = io.handle_port_write(0x3f8, Width::U16, 0).unwrap_err();
//! assert_eq!(fault.device.as_deref(), Some("com1")); // guest faults name the device
//!
//! // 4. Hot-plug by name while vCPUs dispatch.
//! manager.add(DeviceConfig::new("com2", "uart16550", 0x2f8, 8).with_param("output", "discard"))?;
//! manager.remove("com2")?.wait()?; // returns once no vCPU can still be inside it
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # The bus underneath
//!
//! Each address space has an [`IoBus`]: an immutable, sorted interval table
//! published through an atomic pointer and reclaimed with crossbeam-epoch
//! (a private collector per bus). A lookup through a [`VcpuHandle`] pins the
//! handle's own participant of that collector, loads, searches and calls the
//! device: no lock, no retry, no allocation, and no reference count shared
//! between vCPUs. Hot-plug copies the table, edits it, validates it and
//! swaps it in; the old table is freed once every vCPU that could see it has
//! unpinned, and an unplugged device's destructor runs on a thread that
//! drives reclamation (a writer, an unplug poll or wait) outside the bus's
//! lock, never in crossbeam's collection step inside a vCPU's pin.
//!
//! ## Example
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
#![cfg_attr(docsrs, feature(doc_cfg))]
#![warn(missing_docs, unsafe_op_in_unsafe_fn)]
#![warn(
    clippy::std_instead_of_core,
    clippy::std_instead_of_alloc,
    clippy::alloc_instead_of_core,
    clippy::undocumented_unsafe_blocks
)]

extern crate alloc;
// Tests use threads and `std` collections even in the no_std build.
#[cfg(any(feature = "std", test))]
extern crate std;

mod addr;
mod bus;
mod config;
mod device;
mod devices;
pub mod docs;
mod irq;
mod manager;
mod memory;
mod sync;
#[cfg(any(test, feature = "testing"))]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub mod testing;
pub mod virtio;

/// The pseudo-random generator the integration tests use, for unit tests.
#[cfg(test)]
#[path = "../tests/common/rng.rs"]
mod test_rng;

/// Compiles the README's Rust examples as doctests, so it stays true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

pub use addr::{AddressSpace, IoRange, Mmio, Pio, RangeError, SysReg, Width, WidthError};
pub use bus::{AccessError, BusError, Committed, Edit, IoBus, Unplug, VcpuHandle, WaitError};
pub use config::{ConfigError, ConfigErrorKind, DeviceConfig, ParamValue, Space, VmDeviceConfig};
pub use device::{Access, Device, DeviceError, DeviceId, DeviceMut, Locked};
pub use devices::{
    BuildEnv, Built, ConsoleSink, Constructor, DeviceKinds, MAX_RAM_DISK, RX_CAPACITY, Reserved,
    Uart16550, UartOutput, VirtioBlkMmio,
};
pub use irq::{InterruptController, IrqLine};
pub use manager::{
    DeviceInfo, DeviceManager, DeviceManagerBuilder, DispatchError, LogLevel, ManagerError,
    MissPolicy, VcpuIo,
};
pub use memory::{GuestMemory, GuestRam, GuestRamError, MemoryError};
