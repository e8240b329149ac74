//! `DeviceManager`: a VM's whole device set — three buses, named devices
//! built from configuration, interrupt wiring and hot-plug by name.
//!
//! # Locking
//!
//! Dispatch (`handle_*`) takes no lock: it is the bus's lock-free path plus,
//! on a miss only, one relaxed load of the bus's miss policy. Configuration
//! changes (build, add, remove, move) serialize on the manager's name table
//! lock, which is taken before any bus's writer lock and never held while
//! device code runs — except kind constructors, which must not call back
//! into the manager.

use alloc::collections::BTreeMap;
use alloc::string::{String, ToString};
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::any::Any;
use core::fmt;
use core::sync::atomic::{AtomicU8, Ordering};

use crate::addr::{AddressSpace, IoRange, Mmio, Pio, SysReg, Width};
use crate::bus::{DeviceId, Edit, IoBus, Unplug, VcpuHandle};
use crate::config::{ConfigError, ConfigErrorKind, DeviceConfig, Space, VmDeviceConfig};
use crate::device::Device;
use crate::devices::{BuildEnv, ConsoleSink, DeviceKinds};
use crate::error::{AccessError, BusError, WaitError};
use crate::irq::{InterruptController, IrqLine};
use crate::sync::Mutex;
use crate::virtio::GuestMemory;

/// What an access nobody owns turns into. Only [`AccessError::Unmapped`] is
/// a miss: an access that straddles a device's end, or that a device
/// refuses, is always returned as an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MissPolicy {
    /// Return [`AccessError::Unmapped`]; the VMM decides (inject a fault…).
    Error,
    /// Reads return all ones at the access width, writes are dropped: what
    /// an undecoded bus cycle gives on x86 and PCI.
    AllOnes,
    /// Log the access at this level through `log`, then behave as
    /// [`MissPolicy::AllOnes`].
    Log(log::Level),
}

impl MissPolicy {
    fn encode(self) -> u8 {
        match self {
            MissPolicy::Error => 0,
            MissPolicy::AllOnes => 1,
            // `Level` is 1 (Error) ..= 5 (Trace).
            MissPolicy::Log(level) => 1 + level as u8,
        }
    }

    fn decode(v: u8) -> Self {
        match v {
            0 => MissPolicy::Error,
            1 => MissPolicy::AllOnes,
            2 => MissPolicy::Log(log::Level::Error),
            3 => MissPolicy::Log(log::Level::Warn),
            4 => MissPolicy::Log(log::Level::Info),
            5 => MissPolicy::Log(log::Level::Debug),
            _ => MissPolicy::Log(log::Level::Trace),
        }
    }
}

/// The three buses' miss policies, shared with every [`VcpuIo`].
#[derive(Debug, Default)]
struct Policies([AtomicU8; 3]);

impl Policies {
    fn get(&self, space: Space) -> MissPolicy {
        // Relaxed: a policy is a standalone value; no other data is
        // published with it.
        MissPolicy::decode(self.0[space as usize].load(Ordering::Relaxed))
    }

    fn set(&self, space: Space, policy: MissPolicy) {
        // Relaxed: see `get`.
        self.0[space as usize].store(policy.encode(), Ordering::Relaxed);
    }

    #[cold]
    fn read_miss(
        &self,
        space: Space,
        e: AccessError,
        width: Width,
        vcpu: Option<u32>,
    ) -> Result<u64, AccessError> {
        let AccessError::Unmapped { addr } = e else { return Err(e) };
        match self.get(space) {
            MissPolicy::Error => Err(e),
            MissPolicy::AllOnes => Ok(width.mask()),
            MissPolicy::Log(level) => {
                log::log!(
                    level,
                    "vmio: unmapped {space} read of {} bytes at {addr:#x} (vcpu {vcpu:?})",
                    width.bytes()
                );
                Ok(width.mask())
            }
        }
    }

    #[cold]
    fn write_miss(
        &self,
        space: Space,
        e: AccessError,
        width: Width,
        value: u64,
        vcpu: Option<u32>,
    ) -> Result<(), AccessError> {
        let AccessError::Unmapped { addr } = e else { return Err(e) };
        match self.get(space) {
            MissPolicy::Error => Err(e),
            MissPolicy::AllOnes => Ok(()),
            MissPolicy::Log(level) => {
                log::log!(
                    level,
                    "vmio: unmapped {space} write of {} bytes ({value:#x}) at {addr:#x} (vcpu {vcpu:?})",
                    width.bytes()
                );
                Ok(())
            }
        }
    }
}

/// Why a manager operation failed. A failed operation changes nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManagerError {
    /// A device configuration was refused; the error names device and field.
    Config(ConfigError),
    /// No device has this name.
    NoSuchDevice(String),
    /// Waiting for an unplug was impossible: the caller is inside a dispatch.
    Wait(WaitError),
    /// A bus refused an edit that the manager's own checks let through
    /// (a device registered directly on the bus is in the way).
    Bus {
        /// The device being placed or moved.
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

/// A named device as the manager knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Its configuration, with `base` updated by moves.
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

/// A VM's device set: one [`IoBus`] per address space, devices known by
/// name, built from [`DeviceConfig`]s through a [`DeviceKinds`] registry.
///
/// vCPU threads dispatch through a [`VcpuIo`] each ([`Self::vcpu`]); the
/// handle-free `handle_*` methods (with `std`) suit occasional callers.
///
/// Lock order: dispatch takes no lock. Configuration changes (build, add,
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
///
/// // Hot-unplug by name, then wait until no vCPU can still be inside.
/// manager.remove("com1")?.wait()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct DeviceManager {
    mmio: IoBus<Mmio>,
    pio: IoBus<Pio>,
    sysreg: IoBus<SysReg>,
    policies: Arc<Policies>,
    kinds: DeviceKinds,
    console: Option<ConsoleSink>,
    interrupts: Option<Arc<dyn InterruptController>>,
    memory: Option<Arc<dyn GuestMemory>>,
    entries: Mutex<BTreeMap<String, Entry>>,
    /// Lines of devices being removed by `remove_and_wait`, still reserved
    /// until their grace period ends and the line is lowered, with the
    /// device's name. Lock order: `entries`, then this.
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

/// Configures a [`DeviceManager`] before its first devices are built.
#[derive(Default)]
pub struct DeviceManagerBuilder {
    policies: [Option<MissPolicy>; 3],
    kinds: Option<DeviceKinds>,
    console: Option<ConsoleSink>,
    interrupts: Option<Arc<dyn InterruptController>>,
    memory: Option<Arc<dyn GuestMemory>>,
}

impl fmt::Debug for DeviceManagerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceManagerBuilder").field("policies", &self.policies).finish()
    }
}

impl DeviceManagerBuilder {
    /// The miss policy of one bus (default [`MissPolicy::Error`]).
    #[must_use]
    pub fn miss_policy(mut self, space: Space, policy: MissPolicy) -> Self {
        self.policies[space as usize] = Some(policy);
        self
    }

    /// The kind registry (default: [`DeviceKinds::default`], the built-ins).
    #[must_use]
    pub fn kinds(mut self, kinds: DeviceKinds) -> Self {
        self.kinds = Some(kinds);
        self
    }

    /// Where console devices send their output (default: standard output
    /// with `std`, nowhere without).
    #[must_use]
    pub fn console(mut self, sink: ConsoleSink) -> Self {
        self.console = Some(sink);
        self
    }

    /// The controller that supplies each device's interrupt line from its
    /// `irq`. Without one, a device with an `irq` is refused.
    #[must_use]
    pub fn interrupts(mut self, controller: Arc<dyn InterruptController>) -> Self {
        self.interrupts = Some(controller);
        self
    }

    /// The guest's memory, handed to devices that do DMA (`virtio-blk`).
    #[must_use]
    pub fn memory(mut self, memory: Arc<dyn GuestMemory>) -> Self {
        self.memory = Some(memory);
        self
    }

    /// A manager with no devices yet.
    pub fn build_empty(self) -> DeviceManager {
        let policies = Arc::new(Policies::default());
        for space in Space::ALL {
            policies.set(space, self.policies[space as usize].unwrap_or(MissPolicy::Error));
        }
        DeviceManager {
            mmio: IoBus::new(),
            pio: IoBus::new(),
            sysreg: IoBus::new(),
            policies,
            kinds: self.kinds.unwrap_or_default(),
            console: self.console,
            interrupts: self.interrupts,
            memory: self.memory,
            entries: Mutex::new(BTreeMap::new()),
            draining: Mutex::new(BTreeMap::new()),
        }
    }

    /// A manager holding every device of `vm`, or none at all.
    ///
    /// # Errors
    /// The first refused device, as for [`DeviceManager::add_all`].
    pub fn build(self, vm: &VmDeviceConfig) -> Result<DeviceManager, ManagerError> {
        let manager = self.build_empty();
        manager.add_all(&vm.devices)?;
        Ok(manager)
    }
}

/// A device the manager has built but not yet placed.
struct Pending<'a> {
    config: &'a DeviceConfig,
    space: Space,
    start: u64,
    last: u64,
    device: Arc<dyn Device>,
    any: Arc<dyn Any + Send + Sync>,
    line: Option<Arc<dyn IrqLine>>,
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
    pub fn mmio(&self) -> &IoBus<Mmio> {
        &self.mmio
    }

    /// The port I/O bus.
    pub fn pio(&self) -> &IoBus<Pio> {
        &self.pio
    }

    /// The system-register bus.
    pub fn sysreg(&self) -> &IoBus<SysReg> {
        &self.sysreg
    }

    /// The miss policy of the `space` bus.
    pub fn miss_policy(&self, space: Space) -> MissPolicy {
        self.policies.get(space)
    }

    /// Changes the miss policy of the `space` bus; every vCPU sees it from
    /// its next miss on.
    pub fn set_miss_policy(&self, space: Space, policy: MissPolicy) {
        self.policies.set(space, policy);
    }

    /// A vCPU thread's dispatch handle for all three buses: the lock-free
    /// path. Create it on the thread that uses it (it is `!Send`).
    pub fn vcpu(&self, vcpu: u32) -> VcpuIo {
        VcpuIo {
            mmio: self.mmio.handle(vcpu),
            pio: self.pio.handle(vcpu),
            sysreg: self.sysreg.handle(vcpu),
            policies: self.policies.clone(),
        }
    }

    /// Every named device, by name.
    pub fn devices(&self) -> Vec<DeviceInfo> {
        self.entries.lock().values().map(|e| e.info.clone()).collect()
    }

    /// The named device's current placement and configuration.
    pub fn info(&self, name: &str) -> Option<DeviceInfo> {
        self.entries.lock().get(name).map(|e| e.info.clone())
    }

    /// The named device as its concrete type, e.g. a
    /// [`Uart16550`](crate::Uart16550) to feed it input.
    pub fn device<T: Any + Send + Sync>(&self, name: &str) -> Option<Arc<T>> {
        let any = self.entries.lock().get(name)?.any.clone();
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
    /// kind or parameter, invalid parameter, bad or overlapping range).
    ///
    /// # Errors
    /// [`ManagerError::Config`] for a refused configuration;
    /// [`ManagerError::Bus`] when a device registered directly on a bus
    /// (not through the manager) is in the way.
    pub fn add_all(&self, configs: &[DeviceConfig]) -> Result<(), ManagerError> {
        let mut entries = self.entries.lock();
        let mut pending: Vec<Pending<'_>> = Vec::with_capacity(configs.len());
        for config in configs {
            let name = &config.name;
            if name.is_empty() {
                return Err(config
                    .error("name", ConfigErrorKind::InvalidValue { expected: "a non-empty name" })
                    .into());
            }
            if entries.contains_key(name) || pending.iter().any(|p| &p.config.name == name) {
                return Err(config.error("name", ConfigErrorKind::DuplicateName).into());
            }
            let interrupt = match config.irq {
                None => None,
                Some(irq) => {
                    let holder = entries
                        .values()
                        .map(|e| &e.info.config)
                        .chain(pending.iter().map(|p| p.config))
                        .find(|c| c.irq == Some(irq))
                        .map(|c| c.name.clone())
                        .or_else(|| self.draining.lock().get(&irq).cloned());
                    if let Some(other) = holder {
                        return Err(config
                            .error("irq", ConfigErrorKind::IrqInUse { other })
                            .into());
                    }
                    let controller = self.interrupts.as_ref().ok_or_else(|| {
                        config.error("irq", ConfigErrorKind::NoInterruptController)
                    })?;
                    Some(controller.line(irq).ok_or_else(|| {
                        config.error(
                            "irq",
                            ConfigErrorKind::InvalidValue {
                                expected: "a line the interrupt controller has",
                            },
                        )
                    })?)
                }
            };
            let line = interrupt.clone();
            let env = BuildEnv {
                config,
                interrupt,
                console: self.console.as_ref(),
                memory: self.memory.as_ref(),
            };
            let (space, device, any) = self.kinds.build(&env)?.into_parts();
            let (start, last) = space.range(config.base, config.length).map_err(|e| {
                let field = if config.length == 0 || config.base <= space.last() {
                    "length"
                } else {
                    "base"
                };
                config.error(field, ConfigErrorKind::Range(e))
            })?;
            if let Some(other) = self.overlapping(&entries, &pending, space, start, last) {
                return Err(config.error("base", ConfigErrorKind::Overlap { other }).into());
            }
            pending.push(Pending { config, space, start, last, device, any, line });
        }

        // Place each bus's share in one transaction; undo earlier buses if a
        // later one refuses (only possible when unnamed devices were
        // registered on the bus directly since the checks above).
        let mut placed: Vec<(Space, Vec<DeviceId>)> = Vec::new();
        let mut ids: Vec<Option<DeviceId>> = alloc::vec![None; pending.len()];
        for space in Space::ALL {
            let mine: Vec<usize> =
                (0..pending.len()).filter(|&i| pending[i].space == space).collect();
            if mine.is_empty() {
                continue;
            }
            let result = match space {
                Space::Mmio => place(&self.mmio, &pending, &mine),
                Space::Pio => place(&self.pio, &pending, &mine),
                Space::SysReg => place(&self.sysreg, &pending, &mine),
            };
            match result {
                Ok(registered) => {
                    for (&i, &id) in mine.iter().zip(&registered) {
                        ids[i] = Some(id);
                    }
                    placed.push((space, registered));
                }
                Err((i, error)) => {
                    for (space, registered) in placed {
                        self.unregister_all(space, &registered);
                    }
                    let device = pending[mine[i]].config.name.clone();
                    return Err(ManagerError::Bus { device, error });
                }
            }
        }
        for (p, id) in pending.into_iter().zip(ids) {
            let id = id.expect("every pending device was placed on its bus");
            let info = DeviceInfo { config: p.config.clone(), space: p.space, id };
            entries.insert(p.config.name.clone(), Entry { info, any: p.any, line: p.line });
        }
        Ok(())
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
        let mut entries = self.entries.lock();
        let entry = entries.get(name).ok_or_else(|| ManagerError::NoSuchDevice(name.into()))?;
        let DeviceInfo { space, id, .. } = entry.info;
        let unplug = match space {
            Space::Mmio => self.mmio.unregister(id),
            Space::Pio => self.pio.unregister(id),
            Space::SysReg => self.sysreg.unregister(id),
        }
        .map_err(|error| ManagerError::Bus { device: name.into(), error })?;
        let entry = entries.remove(name).expect("entry looked up above");
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
        let mut entries = self.entries.lock();
        let entry = entries.get(name).ok_or_else(|| ManagerError::NoSuchDevice(name.into()))?;
        let DeviceInfo { space, id, ref config } = entry.info;
        let (start, last) = space
            .range(base, config.length)
            .map_err(|e| config.error("base", ConfigErrorKind::Range(e)))?;
        let others = entries.iter().filter(|(n, _)| n.as_str() != name);
        let clash = others
            .map(|(_, e)| &e.info)
            .filter(|i| i.space == space)
            .find(|i| {
                let (s, l) = (i.config.base, i.config.base + (i.config.length - 1));
                s <= last && start <= l
            })
            .map(|i| i.config.name.clone());
        if let Some(other) = clash {
            return Err(config.error("base", ConfigErrorKind::Overlap { other }).into());
        }
        let result = match space {
            Space::Mmio => remap(&self.mmio, id, start, last),
            Space::Pio => remap(&self.pio, id, start, last),
            Space::SysReg => remap(&self.sysreg, id, start, last),
        };
        let unplug = result.map_err(|error| ManagerError::Bus { device: name.into(), error })?;
        entries.get_mut(name).expect("entry looked up above").info.config.base = base;
        Ok(unplug)
    }

    fn overlapping(
        &self,
        entries: &BTreeMap<String, Entry>,
        pending: &[Pending<'_>],
        space: Space,
        start: u64,
        last: u64,
    ) -> Option<String> {
        let hit = |s: u64, l: u64| s <= last && start <= l;
        if let Some(p) = pending.iter().find(|p| p.space == space && hit(p.start, p.last)) {
            return Some(p.config.name.clone());
        }
        // The bus itself: named devices by name, directly registered ones by id.
        let on_bus: Vec<(DeviceId, u64, u64)> = match space {
            Space::Mmio => ranges(&self.mmio),
            Space::Pio => ranges(&self.pio),
            Space::SysReg => ranges(&self.sysreg),
        };
        let (id, _, _) = on_bus.into_iter().find(|&(_, s, l)| hit(s, l))?;
        let named = entries.values().find(|e| e.info.space == space && e.info.id == id);
        Some(named.map_or_else(|| id.to_string(), |e| e.info.config.name.clone()))
    }

    fn unregister_all(&self, space: Space, ids: &[DeviceId]) {
        fn undo<S: AddressSpace>(bus: &IoBus<S>, ids: &[DeviceId]) {
            let edits = ids.iter().map(|&id| Edit::Unregister(id));
            // These ids were registered by this call under the manager lock;
            // nothing else unregisters manager-placed devices.
            let _ = bus.transaction(edits);
        }
        match space {
            Space::Mmio => undo(&self.mmio, ids),
            Space::Pio => undo(&self.pio, ids),
            Space::SysReg => undo(&self.sysreg, ids),
        }
    }
}

fn ranges<S: AddressSpace>(bus: &IoBus<S>) -> Vec<(DeviceId, u64, u64)> {
    bus.devices().into_iter().map(|(id, r)| (id, r.start(), r.last())).collect()
}

/// Registers `pending[mine[..]]` on `bus` in one transaction; on refusal,
/// the index into `mine` of the device to blame.
fn place<S: AddressSpace>(
    bus: &IoBus<S>,
    pending: &[Pending<'_>],
    mine: &[usize],
) -> Result<Vec<DeviceId>, (usize, BusError)> {
    let mut edits = Vec::with_capacity(mine.len());
    for (k, &i) in mine.iter().enumerate() {
        let p = &pending[i];
        let range = IoRange::<S>::inclusive(p.start, p.last).map_err(|e| (k, e.into()))?;
        edits.push(Edit::Register { range, device: p.device.clone() });
    }
    match bus.transaction(edits) {
        Ok(c) => Ok(c.registered),
        Err(e) => {
            // Blame the pending device whose range the refused one matches.
            let k = match e {
                BusError::Overlap { start, .. } => {
                    mine.iter().position(|&i| pending[i].start == start).unwrap_or(0)
                }
                _ => 0,
            };
            Err((k, e))
        }
    }
}

fn remap<S: AddressSpace>(
    bus: &IoBus<S>,
    id: DeviceId,
    start: u64,
    last: u64,
) -> Result<Unplug, BusError> {
    let range = IoRange::<S>::inclusive(start, last)?;
    Ok(bus.transaction([Edit::Remap { id, range }])?.unplug)
}

#[cfg(feature = "std")]
impl DeviceManager {
    /// Dispatches a guest MMIO read (axdevice's `handle_mmio_read`), through
    /// a per-thread handle; vCPU loops should prefer [`VcpuIo`].
    ///
    /// # Errors
    /// [`AccessError`] from the bus, after the MMIO miss policy.
    pub fn handle_mmio_read(&self, addr: u64, width: Width) -> Result<u64, AccessError> {
        self.mmio
            .read(addr, width)
            .or_else(|e| self.policies.read_miss(Space::Mmio, e, width, None))
    }

    /// Dispatches a guest MMIO write.
    ///
    /// # Errors
    /// [`AccessError`] from the bus, after the MMIO miss policy.
    pub fn handle_mmio_write(
        &self,
        addr: u64,
        width: Width,
        value: u64,
    ) -> Result<(), AccessError> {
        self.mmio
            .write(addr, width, value)
            .or_else(|e| self.policies.write_miss(Space::Mmio, e, width, value, None))
    }

    /// Dispatches a guest port read (`in`).
    ///
    /// # Errors
    /// [`AccessError`] from the bus, after the port I/O miss policy.
    pub fn handle_port_read(&self, port: u16, width: Width) -> Result<u64, AccessError> {
        self.pio
            .read(port.into(), width)
            .or_else(|e| self.policies.read_miss(Space::Pio, e, width, None))
    }

    /// Dispatches a guest port write (`out`).
    ///
    /// # Errors
    /// [`AccessError`] from the bus, after the port I/O miss policy.
    pub fn handle_port_write(
        &self,
        port: u16,
        width: Width,
        value: u64,
    ) -> Result<(), AccessError> {
        self.pio
            .write(port.into(), width, value)
            .or_else(|e| self.policies.write_miss(Space::Pio, e, width, value, None))
    }

    /// Dispatches a guest system-register read (`MRS`, `csrr`, `rdmsr`).
    ///
    /// # Errors
    /// [`AccessError`] from the bus, after the system-register miss policy.
    pub fn handle_sysreg_read(&self, reg: u32, width: Width) -> Result<u64, AccessError> {
        self.sysreg
            .read(reg.into(), width)
            .or_else(|e| self.policies.read_miss(Space::SysReg, e, width, None))
    }

    /// Dispatches a guest system-register write (`MSR`, `csrw`, `wrmsr`).
    ///
    /// # Errors
    /// [`AccessError`] from the bus, after the system-register miss policy.
    pub fn handle_sysreg_write(
        &self,
        reg: u32,
        width: Width,
        value: u64,
    ) -> Result<(), AccessError> {
        self.sysreg
            .write(reg.into(), width, value)
            .or_else(|e| self.policies.write_miss(Space::SysReg, e, width, value, None))
    }
}

/// One vCPU thread's dispatch handles for a [`DeviceManager`]'s three buses:
/// lock-free, allocation-free, and devices see the vCPU id in
/// [`Access::vcpu`](crate::Access::vcpu).
pub struct VcpuIo {
    mmio: VcpuHandle<Mmio>,
    pio: VcpuHandle<Pio>,
    sysreg: VcpuHandle<SysReg>,
    policies: Arc<Policies>,
}

impl fmt::Debug for VcpuIo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VcpuIo").field("vcpu", &self.mmio.vcpu()).finish()
    }
}

impl VcpuIo {
    /// The vCPU id.
    pub fn vcpu(&self) -> u32 {
        self.mmio.vcpu()
    }

    /// Dispatches a guest MMIO read.
    ///
    /// # Errors
    /// [`AccessError`] from the bus, after the MMIO miss policy.
    #[inline]
    pub fn handle_mmio_read(&mut self, addr: u64, width: Width) -> Result<u64, AccessError> {
        let vcpu = Some(self.vcpu());
        self.mmio
            .read(addr, width)
            .or_else(|e| self.policies.read_miss(Space::Mmio, e, width, vcpu))
    }

    /// Dispatches a guest MMIO write.
    ///
    /// # Errors
    /// [`AccessError`] from the bus, after the MMIO miss policy.
    #[inline]
    pub fn handle_mmio_write(
        &mut self,
        addr: u64,
        width: Width,
        value: u64,
    ) -> Result<(), AccessError> {
        let vcpu = Some(self.vcpu());
        self.mmio
            .write(addr, width, value)
            .or_else(|e| self.policies.write_miss(Space::Mmio, e, width, value, vcpu))
    }

    /// Dispatches a guest port read.
    ///
    /// # Errors
    /// [`AccessError`] from the bus, after the port I/O miss policy.
    #[inline]
    pub fn handle_port_read(&mut self, port: u16, width: Width) -> Result<u64, AccessError> {
        let vcpu = Some(self.vcpu());
        self.pio
            .read(port.into(), width)
            .or_else(|e| self.policies.read_miss(Space::Pio, e, width, vcpu))
    }

    /// Dispatches a guest port write.
    ///
    /// # Errors
    /// [`AccessError`] from the bus, after the port I/O miss policy.
    #[inline]
    pub fn handle_port_write(
        &mut self,
        port: u16,
        width: Width,
        value: u64,
    ) -> Result<(), AccessError> {
        let vcpu = Some(self.vcpu());
        self.pio
            .write(port.into(), width, value)
            .or_else(|e| self.policies.write_miss(Space::Pio, e, width, value, vcpu))
    }

    /// Dispatches a guest system-register read.
    ///
    /// # Errors
    /// [`AccessError`] from the bus, after the system-register miss policy.
    #[inline]
    pub fn handle_sysreg_read(&mut self, reg: u32, width: Width) -> Result<u64, AccessError> {
        let vcpu = Some(self.vcpu());
        self.sysreg
            .read(reg.into(), width)
            .or_else(|e| self.policies.read_miss(Space::SysReg, e, width, vcpu))
    }

    /// Dispatches a guest system-register write.
    ///
    /// # Errors
    /// [`AccessError`] from the bus, after the system-register miss policy.
    #[inline]
    pub fn handle_sysreg_write(
        &mut self,
        reg: u32,
        width: Width,
        value: u64,
    ) -> Result<(), AccessError> {
        let vcpu = Some(self.vcpu());
        self.sysreg
            .write(reg.into(), width, value)
            .or_else(|e| self.policies.write_miss(Space::SysReg, e, width, value, vcpu))
    }
}
