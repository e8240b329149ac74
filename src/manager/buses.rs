//! The manager's three buses behind one interface: chosen by type on the
//! dispatch path ([`ManagedSpace`]), by [`Space`] value for configuration
//! changes ([`Buses::get`], the only place that matches on a space).

use alloc::collections::BTreeMap;
use alloc::sync::Arc;
use alloc::vec::Vec;

use crate::addr::{AddressSpace, IoRange, Mmio, Pio, RangeError, SysReg};
use crate::bus::{BusError, Edit, IoBus, Unplug, VcpuHandle};
use crate::config::Space;
use crate::device::{Device, DeviceId};

/// One bus per address space.
#[derive(Default)]
pub(super) struct Buses {
    mmio: IoBus<Mmio>,
    pio: IoBus<Pio>,
    sysreg: IoBus<SysReg>,
}

/// One vCPU's handles on the three buses.
pub(super) struct Handles {
    mmio: VcpuHandle<Mmio>,
    pio: VcpuHandle<Pio>,
    sysreg: VcpuHandle<SysReg>,
}

impl Buses {
    /// The `space` bus, for configuration changes.
    pub(super) fn get(&self, space: Space) -> &dyn SpaceBus {
        match space {
            Space::Mmio => &self.mmio,
            Space::Pio => &self.pio,
            Space::SysReg => &self.sysreg,
        }
    }

    /// The bus of space `S`.
    pub(super) fn of<S: ManagedSpace>(&self) -> &IoBus<S> {
        S::bus(self)
    }

    pub(super) fn handles(&self, vcpu: u32) -> Handles {
        Handles {
            mmio: self.mmio.handle(vcpu),
            pio: self.pio.handle(vcpu),
            sysreg: self.sysreg.handle(vcpu),
        }
    }
}

impl Handles {
    /// The handle on the bus of space `S`.
    #[inline]
    pub(super) fn of<S: ManagedSpace>(&mut self) -> &mut VcpuHandle<S> {
        S::handle(self)
    }

    pub(super) fn vcpu(&self) -> u32 {
        self.mmio.vcpu()
    }
}

/// An address space the manager has a bus for. Implemented by [`Mmio`],
/// [`Pio`] and [`SysReg`] only; the dispatch path is generic over it, so it
/// costs no branch on the space.
pub(super) trait ManagedSpace: AddressSpace + Sized {
    /// The space as a value.
    const SPACE: Space;
    /// Its bus.
    fn bus(buses: &Buses) -> &IoBus<Self>;
    /// A vCPU's handle on its bus.
    fn handle(handles: &mut Handles) -> &mut VcpuHandle<Self>;
}

impl ManagedSpace for Mmio {
    const SPACE: Space = Space::Mmio;
    fn bus(buses: &Buses) -> &IoBus<Self> {
        &buses.mmio
    }
    #[inline]
    fn handle(handles: &mut Handles) -> &mut VcpuHandle<Self> {
        &mut handles.mmio
    }
}

impl ManagedSpace for Pio {
    const SPACE: Space = Space::Pio;
    fn bus(buses: &Buses) -> &IoBus<Self> {
        &buses.pio
    }
    #[inline]
    fn handle(handles: &mut Handles) -> &mut VcpuHandle<Self> {
        &mut handles.pio
    }
}

impl ManagedSpace for SysReg {
    const SPACE: Space = Space::SysReg;
    fn bus(buses: &Buses) -> &IoBus<Self> {
        &buses.sysreg
    }
    #[inline]
    fn handle(handles: &mut Handles) -> &mut VcpuHandle<Self> {
        &mut handles.sysreg
    }
}

/// Why [`SpaceBus::register`] refused a list.
#[derive(Debug)]
pub(super) enum RegisterError {
    /// Device `index`'s `base`/`length` is not a range of the space.
    Range { index: usize, error: RangeError },
    /// The bus refused the transaction (an overlap).
    Bus(BusError),
}

/// The configuration-side operations on a bus whose space is a run-time
/// value. Ranges arrive as a configuration states them (`base`, `length`)
/// and become the bus's [`IoRange`] here, once; the bus alone checks them
/// against each other and against what it holds.
pub(super) trait SpaceBus {
    /// Registers `devices` (`(base, length, device)`) in one transaction.
    fn register(
        &self,
        devices: Vec<(u64, u64, Arc<dyn Device>)>,
    ) -> Result<Vec<DeviceId>, RegisterError>;
    /// Unregisters `ids` in one transaction.
    fn unregister(&self, ids: &[DeviceId]) -> Result<Unplug, BusError>;
    /// Moves device `id` to `base..base + length` in one swap.
    fn remap(&self, id: DeviceId, base: u64, length: u64) -> Result<Unplug, BusError>;
    /// The bus's publish count.
    fn generation(&self) -> u64;
    /// Every device's `(start, last)`, by id.
    fn ranges(&self) -> BTreeMap<DeviceId, (u64, u64)>;
}

impl<S: AddressSpace> SpaceBus for IoBus<S> {
    fn register(
        &self,
        devices: Vec<(u64, u64, Arc<dyn Device>)>,
    ) -> Result<Vec<DeviceId>, RegisterError> {
        let mut edits = Vec::with_capacity(devices.len());
        for (index, (base, length, device)) in devices.into_iter().enumerate() {
            let range = IoRange::<S>::new(base, length)
                .map_err(|error| RegisterError::Range { index, error })?;
            edits.push(Edit::Register { range, device });
        }
        self.transaction(edits).map(|c| c.registered).map_err(RegisterError::Bus)
    }

    fn unregister(&self, ids: &[DeviceId]) -> Result<Unplug, BusError> {
        Ok(self.transaction(ids.iter().map(|&id| Edit::Unregister(id)))?.unplug)
    }

    fn remap(&self, id: DeviceId, base: u64, length: u64) -> Result<Unplug, BusError> {
        let range = IoRange::<S>::new(base, length)?;
        Ok(self.transaction([Edit::Remap { id, range }])?.unplug)
    }

    fn generation(&self) -> u64 {
        IoBus::generation(self)
    }

    fn ranges(&self) -> BTreeMap<DeviceId, (u64, u64)> {
        self.devices().into_iter().map(|(id, r)| (id, (r.start(), r.last()))).collect()
    }
}
