//! `DeviceManager`: a VM's whole device set — three buses, named devices
//! built from configuration, interrupt wiring and hot-plug by name.
//!
//! `mod.rs` owns the name table and the public configuration-side
//! operations; `placement` how the table meets the buses; `dispatch` the
//! vCPU side; `buses` the one interface over the three buses that both
//! use; `builder` the [`DeviceManagerBuilder`].
//!
//! # Locking
//!
//! Dispatch (`handle_*`) takes no lock on success: it is the bus's
//! lock-free path plus, on a miss only, one relaxed load of the bus's miss
//! policy; a failed access takes the name lock once to name the device.
//! Configuration changes (build, add, remove, move) serialize on the
//! manager's table lock, which is taken before any bus's writer lock and
//! never held while device code runs — except kind constructors, which must
//! not call back into the manager.
//!
//! # One source of truth
//!
//! The buses are. A named device taken off its bus (or moved) directly
//! through [`DeviceManager::mmio`] and friends is noticed at the next
//! manager operation: it disappears from [`DeviceManager::info`], its name
//! and interrupt number become free, and its placement follows the bus.
//! [`DeviceManager::remove`] is still the way to unplug a named device: it
//! also hands back the unplug to wait for.

mod builder;
mod buses;
mod dispatch;
mod error;
mod placement;

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::any::Any;
use core::fmt;

pub use builder::DeviceManagerBuilder;
pub use dispatch::{DispatchError, LogLevel, MissPolicy, VcpuIo};
pub use error::ManagerError;

use buses::Buses;
use dispatch::Shared;
use placement::name_of;

use crate::GuestMemory;
use crate::addr::{AddressSpace, IoRange, Mmio, Pio, SysReg};
use crate::bus::{BusError, IoBus, Unplug};
use crate::config::{ConfigErrorKind, DeviceConfig, Space, VmDeviceConfig};
use crate::device::{Device, DeviceId};
use crate::devices::{BuildEnv, ConsoleSink, DeviceKinds};
use crate::irq::{InterruptController, IrqLine};
use crate::sync::Mutex;

/// A named device as the manager knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Its configuration, with `base` (and `length`) following its bus
    /// placement. For a device added with [`DeviceManager::add_device`],
    /// `kind` is the device's Rust type name.
    pub config: DeviceConfig,
    /// The bus it is on.
    pub space: Space,
    /// Its id on that bus.
    pub id: DeviceId,
}

/// A removed device's interrupt number and line, kept until it is lowered.
type ReservedLine = (u32, Arc<dyn IrqLine>);

struct Entry {
    info: DeviceInfo,
    any: Arc<dyn Any + Send + Sync>,
    /// The device's interrupt line, lowered by [`DeviceManager::remove_and_wait`].
    line: Option<Arc<dyn IrqLine>>,
}

/// The name table, and the bus generations it last agreed with.
#[derive(Default)]
struct Table {
    entries: BTreeMap<String, Entry>,
    synced: [u64; 3],
}

/// A VM's device set: one [`IoBus`] per address space, devices known by
/// name, built from [`DeviceConfig`]s through a [`DeviceKinds`] registry
/// or added already built ([`Self::add_device`]).
///
/// vCPU threads dispatch through a [`VcpuIo`] each ([`Self::vcpu`]); the
/// handle-free `handle_*` methods (with `std`) suit occasional callers.
/// Dispatch errors ([`DispatchError`]) carry the device's name.
///
/// Lock order: a successful or unmapped dispatch takes no lock; one a device
/// refuses (or that straddles its range) takes the leaf name lock once, to
/// put the device's name in the error. Configuration changes (build, add,
/// remove, move) serialize on the name-table lock, taken before any bus's
/// writer lock and never held while a device runs — except kind
/// constructors, which must not call back into the manager.
///
/// # Example
///
/// ```
/// use std::sync::{Arc, Mutex};
/// use vmio::{DeviceConfig, DeviceManager, MissPolicy, Space, VmDeviceConfig, Width};
///
/// let console = Arc::new(Mutex::new(Vec::new()));
/// let out = console.clone();
/// let vm = VmDeviceConfig::new(vec![
///     DeviceConfig::new("com1", "uart16550", 0x3f8, 8),
///     DeviceConfig::new("pci-hole", "reserved", 0xcf8, 8).with_param("space", "pio"),
/// ]);
/// let manager = DeviceManager::builder()
///     .console(Arc::new(move |_name: &str, bytes: &[u8]| out.lock().unwrap().extend_from_slice(bytes)))
///     .miss_policy(Space::Pio, MissPolicy::AllOnes)
///     .build(&vm)?;
///
/// manager.handle_port_write(0x3f8, Width::U8, u64::from(b'A'))?;
/// assert_eq!(*console.lock().unwrap(), b"A");
/// assert_eq!(manager.handle_port_read(0xcfc, Width::U32)?, 0xffff_ffff);
/// // Nothing at port 0x80: all ones, per the policy.
/// assert_eq!(manager.handle_port_read(0x80, Width::U8)?, 0xff);
/// // The UART's registers are bytes: the error names the device.
/// let e = manager.handle_port_write(0x3f8, Width::U16, 0x4142).unwrap_err();
/// assert_eq!(e.device.as_deref(), Some("com1"));
///
/// // Hot-unplug by name, then wait until no vCPU can still be inside.
/// manager.remove("com1")?.wait()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct DeviceManager {
    buses: Buses,
    shared: Arc<Shared>,
    kinds: DeviceKinds,
    console: Option<ConsoleSink>,
    interrupts: Option<Arc<dyn InterruptController>>,
    memory: Option<Arc<dyn GuestMemory>>,
    table: Mutex<Table>,
    /// Lines of devices being removed by `remove_and_wait`, still reserved
    /// until their grace period ends and the line is lowered, with the
    /// device's name. Lock order: `table`, then this.
    draining: Mutex<BTreeMap<u32, String>>,
}

impl fmt::Debug for DeviceManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceManager")
            .field("devices", &self.devices())
            .field("kinds", &self.kinds)
            .finish_non_exhaustive()
    }
}

impl Default for DeviceManager {
    fn default() -> Self {
        Self::new()
    }
}

/// A device the manager has built (or been given) but not yet placed.
struct Pending {
    config: DeviceConfig,
    space: Space,
    device: Arc<dyn Device>,
    any: Arc<dyn Any + Send + Sync>,
    line: Option<Arc<dyn IrqLine>>,
}

impl Pending {
    /// `(start, last)` as the configuration states it; only compared with
    /// what the bus reports, after the bus accepted or refused the range.
    fn span(&self) -> (u64, u64) {
        let c = &self.config;
        (c.base, c.base.wrapping_add(c.length.wrapping_sub(1)))
    }
}

impl DeviceManager {
    /// An empty manager with the built-in kinds and [`MissPolicy::Error`]
    /// on every bus.
    pub fn new() -> Self {
        DeviceManagerBuilder::default().build_empty()
    }

    /// Starts configuring a manager.
    pub fn builder() -> DeviceManagerBuilder {
        DeviceManagerBuilder::default()
    }

    /// A manager with the defaults of [`Self::new`] holding every device of
    /// `vm`, or an error and nothing built.
    ///
    /// # Errors
    /// As for [`Self::add_all`].
    pub fn from_config(vm: &VmDeviceConfig) -> Result<Self, ManagerError> {
        Self::builder().build(vm)
    }

    /// The MMIO bus, for registering unnamed devices or inspecting it.
    /// Unplug named devices with [`Self::remove`]: one taken off the bus
    /// directly is forgotten by the manager at its next operation.
    pub fn mmio(&self) -> &IoBus<Mmio> {
        self.buses.of::<Mmio>()
    }

    /// The port I/O bus (see [`Self::mmio`]).
    pub fn pio(&self) -> &IoBus<Pio> {
        self.buses.of::<Pio>()
    }

    /// The system-register bus (see [`Self::mmio`]).
    pub fn sysreg(&self) -> &IoBus<SysReg> {
        self.buses.of::<SysReg>()
    }

    /// The miss policy of the `space` bus.
    pub fn miss_policy(&self, space: Space) -> MissPolicy {
        self.shared.policy(space)
    }

    /// Changes the miss policy of the `space` bus; every vCPU sees it from
    /// its next miss on.
    pub fn set_miss_policy(&self, space: Space, policy: MissPolicy) {
        self.shared.set_policy(space, policy);
    }

    /// A vCPU thread's dispatch handle for all three buses: the lock-free
    /// path. Create it on the thread that uses it (it is `!Send`).
    pub fn vcpu(&self, vcpu: u32) -> VcpuIo {
        VcpuIo::new(self.buses.handles(vcpu), self.shared.clone())
    }

    /// Every named device, by name.
    pub fn devices(&self) -> Vec<DeviceInfo> {
        let mut table = self.table.lock();
        self.sync(&mut table);
        table.entries.values().map(|e| e.info.clone()).collect()
    }

    /// The named device's current placement and configuration.
    pub fn info(&self, name: &str) -> Option<DeviceInfo> {
        let mut table = self.table.lock();
        self.sync(&mut table);
        table.entries.get(name).map(|e| e.info.clone())
    }

    /// The named device as its concrete type, e.g. a
    /// [`Uart16550`](crate::Uart16550) to feed it input.
    pub fn device<T: Any + Send + Sync>(&self, name: &str) -> Option<Arc<T>> {
        let mut table = self.table.lock();
        self.sync(&mut table);
        let any = table.entries.get(name)?.any.clone();
        any.downcast().ok()
    }

    /// Hot-plugs one device.
    ///
    /// # Errors
    /// As for [`Self::add_all`].
    pub fn add(&self, config: DeviceConfig) -> Result<(), ManagerError> {
        self.add_all(core::slice::from_ref(&config))
    }

    /// Builds and places `configs` all together: either every device is on
    /// its bus when this returns, or none is and the error names the first
    /// offending device and field (duplicate name, IRQ used twice, unknown
    /// kind or parameter, invalid parameter, bad or overlapping range — the
    /// bus's own check, reported with the other device's name).
    ///
    /// # Errors
    /// [`ManagerError::Config`] for a refused configuration.
    pub fn add_all(&self, configs: &[DeviceConfig]) -> Result<(), ManagerError> {
        let mut table = self.table.lock();
        self.sync(&mut table);
        let mut pending: Vec<Pending> = Vec::with_capacity(configs.len());
        for config in configs {
            let interrupt = self.claim(&table, &pending, config, true)?;
            let line = interrupt.clone();
            let env = BuildEnv {
                config,
                interrupt,
                console: self.console.as_ref(),
                memory: self.memory.as_ref(),
            };
            let (space, device, any) = self.kinds.build(&env)?.into_parts();
            pending.push(Pending { config: config.clone(), space, device, any, line });
        }
        self.place(&mut table, pending)
    }

    /// Hot-plugs a device the VMM built itself, under `name`, at `range` of
    /// the range's space: the way to name a device no [`DeviceKinds`] entry
    /// builds. It is then dispatched, looked up ([`Self::device`]), moved
    /// and removed by name like a configured one; its
    /// [`DeviceInfo::config`] has the device's Rust type name as `kind`.
    ///
    /// `irq` reserves that interrupt number for the device (no other
    /// device may take it). The device drives its own line; with an
    /// interrupt controller, the manager also looks the line up so that
    /// [`Self::remove_and_wait`] lowers it.
    ///
    /// An `Arc<dyn Device>` is added as `Arc::new(it)`: `Arc<dyn Device>`
    /// is itself a [`Device`], and [`Self::device`] then finds it as
    /// `Arc<dyn Device>`.
    ///
    /// # Example
    ///
    /// ```
    /// use std::sync::Arc;
    /// use vmio::{DeviceManager, IoRange, Mmio, Reserved, Width};
    ///
    /// let manager = DeviceManager::new();
    /// let rom = Arc::new(Reserved::new(0x1234));
    /// manager.add_device("id-rom", IoRange::<Mmio>::new(0xfee0_0000, 0x100)?, rom, None)?;
    /// assert_eq!(manager.handle_mmio_read(0xfee0_0010, Width::U16)?, 0x1234);
    /// assert_eq!(manager.device::<Reserved>("id-rom").unwrap().value(), 0x1234);
    /// manager.remove("id-rom")?.wait()?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// [`ManagerError::Config`] naming the device: duplicate or empty name,
    /// interrupt number in use (or not one of the controller's), a range
    /// overlapping another device (named) or as long as the whole space,
    /// or a space other than [`Mmio`], [`Pio`] and [`SysReg`].
    pub fn add_device<S: AddressSpace, D: Device + Any>(
        &self,
        name: &str,
        range: IoRange<S>,
        device: Arc<D>,
        irq: Option<u32>,
    ) -> Result<(), ManagerError> {
        let kind = core::any::type_name::<D>();
        let mut config = DeviceConfig::new(name, kind, range.start(), range.len().unwrap_or(0));
        config.irq = irq;
        let space = Space::from_name(S::NAME).filter(|s| s.last() == S::LAST).ok_or_else(|| {
            config.error(
                "space",
                ConfigErrorKind::InvalidValue { expected: "the mmio, pio or sysreg space" },
            )
        })?;
        if range.len().is_none() {
            let expected = "a range shorter than the whole address space";
            return Err(config.error("length", ConfigErrorKind::InvalidValue { expected }).into());
        }
        let mut table = self.table.lock();
        self.sync(&mut table);
        let line = self.claim(&table, &[], &config, false)?;
        let pending = Pending { config, space, device: device.clone(), any: device, line };
        self.place(&mut table, alloc::vec![pending])
    }

    /// Hot-unplugs the named device. No dispatch that starts after this
    /// returns reaches it; call [`Unplug::wait`] on the result to know when
    /// no vCPU can still be inside it (then its resources may be freed).
    /// Its name and interrupt line are free for reuse at once.
    ///
    /// # Errors
    /// [`ManagerError::NoSuchDevice`].
    pub fn remove(&self, name: &str) -> Result<Unplug, ManagerError> {
        self.take(name, false).map(|(unplug, _)| unplug)
    }

    /// Hot-unplugs the named device, waits until no vCPU can still be
    /// inside it, then deasserts its interrupt line: a level-triggered
    /// device unplugged with its line high would otherwise leave the guest
    /// an interrupt nobody can acknowledge. The line stays reserved (a new
    /// device cannot take it) until then; the name is free at once.
    ///
    /// # Errors
    /// [`ManagerError::NoSuchDevice`]; [`ManagerError::Wait`] when called
    /// from inside a dispatch (the device is removed, but its line is left
    /// reserved and as it was).
    pub fn remove_and_wait(&self, name: &str) -> Result<(), ManagerError> {
        let (unplug, line) = self.take(name, true)?;
        unplug.wait().map_err(ManagerError::Wait)?;
        if let Some((irq, line)) = line {
            line.set_level(false);
            self.draining.lock().remove(&irq);
        }
        Ok(())
    }

    /// Unregisters the named device; with `reserve`, keeps its line in
    /// `draining` and hands it back.
    fn take(
        &self,
        name: &str,
        reserve: bool,
    ) -> Result<(Unplug, Option<ReservedLine>), ManagerError> {
        let mut table = self.table.lock();
        self.sync(&mut table);
        let entry =
            table.entries.get(name).ok_or_else(|| ManagerError::NoSuchDevice(name.into()))?;
        let DeviceInfo { space, id, .. } = entry.info;
        let unplug = self.buses.get(space).unregister(&[id]);
        let entry = table.entries.remove(name).expect("entry looked up above");
        self.shared.forget(space, id);
        let unplug = match unplug {
            Ok(unplug) => unplug,
            // Taken off the bus directly since the sync: gone all the same.
            Err(BusError::UnknownDevice(_)) => return Err(ManagerError::NoSuchDevice(name.into())),
            Err(error) => return Err(ManagerError::Bus { device: name.into(), error }),
        };
        let line = match (reserve, entry.info.config.irq, entry.line) {
            (true, Some(irq), Some(line)) => {
                self.draining.lock().insert(irq, entry.info.config.name);
                Some((irq, line))
            }
            _ => None,
        };
        Ok((unplug, line))
    }

    /// Moves the named device to `base` (same length, same bus) in one
    /// atomic swap: every access sees it at the old place or the new one.
    /// The returned [`Unplug`] completes once no vCPU can still be inside
    /// it through the old address.
    ///
    /// # Errors
    /// [`ManagerError::NoSuchDevice`]; [`ManagerError::Config`] naming field
    /// `base` for a range that does not fit or overlaps another device.
    pub fn move_device(&self, name: &str, base: u64) -> Result<Unplug, ManagerError> {
        let mut table = self.table.lock();
        self.sync(&mut table);
        let entry =
            table.entries.get(name).ok_or_else(|| ManagerError::NoSuchDevice(name.into()))?;
        let DeviceInfo { space, id, ref config } = entry.info;
        let kind = match self.buses.get(space).remap(id, base, config.length) {
            Ok(unplug) => {
                let entry = table.entries.get_mut(name).expect("entry looked up above");
                entry.info.config.base = base;
                return Ok(unplug);
            }
            Err(BusError::Range(e)) => ConfigErrorKind::Range(e),
            Err(BusError::Overlap { existing, .. }) => {
                ConfigErrorKind::Overlap { other: name_of(&table, space, existing) }
            }
            Err(BusError::UnknownDevice(_)) => {
                table.entries.remove(name);
                self.shared.forget(space, id);
                return Err(ManagerError::NoSuchDevice(name.into()));
            }
        };
        let mut moved = config.clone();
        moved.base = base;
        Err(moved.error("base", kind).into())
    }
}
