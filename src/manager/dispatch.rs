//! The dispatch side of the manager: miss policies, per-vCPU handles and
//! the errors a dispatch returns, named after the device involved.
//!
//! Every `handle_*` method is a one-line wrapper over [`Shared::read`] /
//! [`Shared::write`], generic over the space: no branch on the space, no
//! lock on success; a failure takes the name table's lock once (cold path).

use alloc::collections::BTreeMap;
use alloc::sync::Arc;
use core::fmt;
use core::sync::atomic::{AtomicU8, Ordering};

use super::buses::{Handles, ManagedSpace};
use crate::addr::{Mmio, Pio, SysReg, Width};
use crate::bus::AccessError;
use crate::config::Space;
use crate::device::DeviceId;
use crate::sync::Mutex;

/// The level a [`MissPolicy::Log`] logs at: the `log` crate's, re-exported
/// so a VMM need not depend on `log` to pick one.
pub use log::Level as LogLevel;

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
    Log(LogLevel),
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
            2 => MissPolicy::Log(LogLevel::Error),
            3 => MissPolicy::Log(LogLevel::Warn),
            4 => MissPolicy::Log(LogLevel::Info),
            5 => MissPolicy::Log(LogLevel::Debug),
            _ => MissPolicy::Log(LogLevel::Trace),
        }
    }
}

/// A dispatched access that did not complete: the bus's [`AccessError`]
/// plus the bus it happened on and, for a device the manager knows by name,
/// that name (`disk0`), so a VMM can log a guest fault without keeping its
/// own id table.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DispatchError {
    /// The bus of the access.
    pub space: Space,
    /// The named device the access reached, if any (`None` for a miss and
    /// for devices registered on a bus directly, without a name).
    pub device: Option<Arc<str>>,
    /// What the bus said.
    pub error: AccessError,
}

impl DispatchError {
    /// Whether nobody owns the address ([`AccessError::Unmapped`]).
    pub fn is_unmapped(&self) -> bool {
        matches!(self.error, AccessError::Unmapped { .. })
    }
}

impl fmt::Display for DispatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let space = self.space;
        match (&self.error, &self.device) {
            (AccessError::Unmapped { addr }, _) => write!(f, "no {space} device at {addr:#x}"),
            (AccessError::Straddles { addr, width, .. }, Some(name)) => write!(
                f,
                "{width}-byte {space} access at {addr:#x} runs past the end of device `{name}`"
            ),
            (AccessError::Device { error, .. }, Some(name)) => {
                write!(f, "{space} device `{name}`: {error}")
            }
            (error, _) => write!(f, "{space}: {error}"),
        }
    }
}
impl core::error::Error for DispatchError {}

/// What the manager shares with every [`VcpuIo`]: the miss policies and
/// the names of its devices by bus id, for errors.
#[derive(Debug, Default)]
pub(super) struct Shared {
    policies: [AtomicU8; 3],
    /// Lock order: a leaf, taken after the manager's entry table; held for
    /// a map operation only, never while device code runs.
    names: Mutex<BTreeMap<(Space, DeviceId), Arc<str>>>,
}

impl Shared {
    pub(super) fn policy(&self, space: Space) -> MissPolicy {
        // Relaxed: a policy is a standalone value; no other data is
        // published with it.
        MissPolicy::decode(self.policies[space as usize].load(Ordering::Relaxed))
    }

    pub(super) fn set_policy(&self, space: Space, policy: MissPolicy) {
        // Relaxed: see `policy`.
        self.policies[space as usize].store(policy.encode(), Ordering::Relaxed);
    }

    pub(super) fn name(&self, space: Space, id: DeviceId, name: Arc<str>) {
        self.names.lock().insert((space, id), name);
    }

    pub(super) fn forget(&self, space: Space, id: DeviceId) {
        self.names.lock().remove(&(space, id));
    }

    /// `result` of a read on the `S` bus, after the miss policy.
    #[inline]
    fn read<S: ManagedSpace>(
        &self,
        result: Result<u64, AccessError>,
        width: Width,
        vcpu: Option<u32>,
    ) -> Result<u64, DispatchError> {
        match result {
            Ok(v) => Ok(v),
            Err(e) => self.read_failed(S::SPACE, e, width, vcpu),
        }
    }

    /// `result` of a write on the `S` bus, after the miss policy.
    #[inline]
    fn write<S: ManagedSpace>(
        &self,
        result: Result<(), AccessError>,
        width: Width,
        value: u64,
        vcpu: Option<u32>,
    ) -> Result<(), DispatchError> {
        match result {
            Ok(()) => Ok(()),
            Err(e) => self.write_failed(S::SPACE, e, width, value, vcpu),
        }
    }

    #[cold]
    fn read_failed(
        &self,
        space: Space,
        e: AccessError,
        width: Width,
        vcpu: Option<u32>,
    ) -> Result<u64, DispatchError> {
        let AccessError::Unmapped { addr } = e else { return Err(self.named(space, e)) };
        match self.policy(space) {
            MissPolicy::Error => Err(self.named(space, e)),
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
    fn write_failed(
        &self,
        space: Space,
        e: AccessError,
        width: Width,
        value: u64,
        vcpu: Option<u32>,
    ) -> Result<(), DispatchError> {
        let AccessError::Unmapped { addr } = e else { return Err(self.named(space, e)) };
        match self.policy(space) {
            MissPolicy::Error => Err(self.named(space, e)),
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

    fn named(&self, space: Space, error: AccessError) -> DispatchError {
        let id = match error {
            AccessError::Unmapped { .. } => None,
            AccessError::Straddles { device, .. } | AccessError::Device { device, .. } => {
                Some(device)
            }
        };
        let device = id.and_then(|id| self.names.lock().get(&(space, id)).cloned());
        DispatchError { space, device, error }
    }
}

#[cfg(feature = "std")]
#[cfg_attr(docsrs, doc(cfg(feature = "std")))]
impl super::DeviceManager {
    fn read<S: ManagedSpace>(&self, addr: u64, width: Width) -> Result<u64, DispatchError> {
        self.shared.read::<S>(self.buses.of::<S>().read(addr, width), width, None)
    }

    fn write<S: ManagedSpace>(
        &self,
        addr: u64,
        width: Width,
        value: u64,
    ) -> Result<(), DispatchError> {
        let result = self.buses.of::<S>().write(addr, width, value);
        self.shared.write::<S>(result, width, value, None)
    }

    /// Dispatches a guest MMIO read (axdevice's `handle_mmio_read`), through
    /// a per-thread handle; vCPU loops should prefer [`VcpuIo`].
    ///
    /// # Errors
    /// [`DispatchError`] from the bus, after the MMIO miss policy.
    pub fn handle_mmio_read(&self, addr: u64, width: Width) -> Result<u64, DispatchError> {
        self.read::<Mmio>(addr, width)
    }

    /// Dispatches a guest MMIO write.
    ///
    /// # Errors
    /// [`DispatchError`] from the bus, after the MMIO miss policy.
    pub fn handle_mmio_write(
        &self,
        addr: u64,
        width: Width,
        value: u64,
    ) -> Result<(), DispatchError> {
        self.write::<Mmio>(addr, width, value)
    }

    /// Dispatches a guest port read (`in`).
    ///
    /// # Errors
    /// [`DispatchError`] from the bus, after the port I/O miss policy.
    pub fn handle_port_read(&self, port: u16, width: Width) -> Result<u64, DispatchError> {
        self.read::<Pio>(port.into(), width)
    }

    /// Dispatches a guest port write (`out`).
    ///
    /// # Errors
    /// [`DispatchError`] from the bus, after the port I/O miss policy.
    pub fn handle_port_write(
        &self,
        port: u16,
        width: Width,
        value: u64,
    ) -> Result<(), DispatchError> {
        self.write::<Pio>(port.into(), width, value)
    }

    /// Dispatches a guest system-register read (`MRS`, `csrr`, `rdmsr`).
    ///
    /// # Errors
    /// [`DispatchError`] from the bus, after the system-register miss policy.
    pub fn handle_sysreg_read(&self, reg: u32, width: Width) -> Result<u64, DispatchError> {
        self.read::<SysReg>(reg.into(), width)
    }

    /// Dispatches a guest system-register write (`MSR`, `csrw`, `wrmsr`).
    ///
    /// # Errors
    /// [`DispatchError`] from the bus, after the system-register miss policy.
    pub fn handle_sysreg_write(
        &self,
        reg: u32,
        width: Width,
        value: u64,
    ) -> Result<(), DispatchError> {
        self.write::<SysReg>(reg.into(), width, value)
    }
}

/// One vCPU thread's dispatch handles for a [`DeviceManager`](super::DeviceManager)'s three buses:
/// lock-free and allocation-free on success and on a miss (an access a device
/// refuses takes the name lock once, to name the device in the error), and
/// devices see the vCPU id in [`Access::vcpu`](crate::Access::vcpu).
pub struct VcpuIo {
    handles: Handles,
    shared: Arc<Shared>,
}

impl fmt::Debug for VcpuIo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VcpuIo").field("vcpu", &self.vcpu()).finish()
    }
}

impl VcpuIo {
    pub(super) fn new(handles: Handles, shared: Arc<Shared>) -> Self {
        VcpuIo { handles, shared }
    }

    /// The vCPU id.
    pub fn vcpu(&self) -> u32 {
        self.handles.vcpu()
    }

    #[inline]
    fn read<S: ManagedSpace>(&mut self, addr: u64, width: Width) -> Result<u64, DispatchError> {
        let vcpu = Some(self.vcpu());
        self.shared.read::<S>(self.handles.of::<S>().read(addr, width), width, vcpu)
    }

    #[inline]
    fn write<S: ManagedSpace>(
        &mut self,
        addr: u64,
        width: Width,
        value: u64,
    ) -> Result<(), DispatchError> {
        let vcpu = Some(self.vcpu());
        let result = self.handles.of::<S>().write(addr, width, value);
        self.shared.write::<S>(result, width, value, vcpu)
    }

    /// Dispatches a guest MMIO read.
    ///
    /// # Errors
    /// [`DispatchError`] from the bus, after the MMIO miss policy.
    #[inline]
    pub fn handle_mmio_read(&mut self, addr: u64, width: Width) -> Result<u64, DispatchError> {
        self.read::<Mmio>(addr, width)
    }

    /// Dispatches a guest MMIO write.
    ///
    /// # Errors
    /// [`DispatchError`] from the bus, after the MMIO miss policy.
    #[inline]
    pub fn handle_mmio_write(
        &mut self,
        addr: u64,
        width: Width,
        value: u64,
    ) -> Result<(), DispatchError> {
        self.write::<Mmio>(addr, width, value)
    }

    /// Dispatches a guest port read.
    ///
    /// # Errors
    /// [`DispatchError`] from the bus, after the port I/O miss policy.
    #[inline]
    pub fn handle_port_read(&mut self, port: u16, width: Width) -> Result<u64, DispatchError> {
        self.read::<Pio>(port.into(), width)
    }

    /// Dispatches a guest port write.
    ///
    /// # Errors
    /// [`DispatchError`] from the bus, after the port I/O miss policy.
    #[inline]
    pub fn handle_port_write(
        &mut self,
        port: u16,
        width: Width,
        value: u64,
    ) -> Result<(), DispatchError> {
        self.write::<Pio>(port.into(), width, value)
    }

    /// Dispatches a guest system-register read.
    ///
    /// # Errors
    /// [`DispatchError`] from the bus, after the system-register miss policy.
    #[inline]
    pub fn handle_sysreg_read(&mut self, reg: u32, width: Width) -> Result<u64, DispatchError> {
        self.read::<SysReg>(reg.into(), width)
    }

    /// Dispatches a guest system-register write.
    ///
    /// # Errors
    /// [`DispatchError`] from the bus, after the system-register miss policy.
    #[inline]
    pub fn handle_sysreg_write(
        &mut self,
        reg: u32,
        width: Width,
        value: u64,
    ) -> Result<(), DispatchError> {
        self.write::<SysReg>(reg.into(), width, value)
    }
}
