//! Configuring a [`DeviceManager`] before its first devices are built.

use alloc::collections::BTreeMap;
use alloc::sync::Arc;
use core::fmt;

use super::buses::Buses;
use super::dispatch::Shared;
use super::{DeviceManager, ManagerError, MissPolicy, Table};
use crate::GuestMemory;
use crate::config::{Space, VmDeviceConfig};
use crate::devices::{ConsoleSink, DeviceKinds};
use crate::irq::InterruptController;
use crate::sync::Mutex;

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
    /// `irq`. Without one, a configured device with an `irq` is refused.
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
        let shared = Arc::new(Shared::default());
        for space in Space::ALL {
            shared.set_policy(space, self.policies[space as usize].unwrap_or(MissPolicy::Error));
        }
        DeviceManager {
            buses: Buses::default(),
            shared,
            kinds: self.kinds.unwrap_or_default(),
            console: self.console,
            interrupts: self.interrupts,
            memory: self.memory,
            table: Mutex::new(Table::default()),
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
