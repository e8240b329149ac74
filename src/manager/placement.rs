//! How the manager's name table meets the buses: claiming a name and an
//! interrupt number, placing devices in one transaction per bus, naming
//! the culprits of a refusal, and following edits made on a bus directly.

use alloc::string::{String, ToString};
use alloc::sync::Arc;
use alloc::vec::Vec;

use super::buses::RegisterError;
use super::{DeviceInfo, DeviceManager, Entry, ManagerError, Pending, Table};
use crate::bus::BusError;
use crate::config::{ConfigError, ConfigErrorKind, DeviceConfig, Space};
use crate::device::DeviceId;
use crate::irq::IrqLine;

impl DeviceManager {
    /// Checks `config`'s name and interrupt number against the table and
    /// `pending`, and looks its line up in the controller (which must exist
    /// when `required`).
    pub(super) fn claim(
        &self,
        table: &Table,
        pending: &[Pending],
        config: &DeviceConfig,
        required: bool,
    ) -> Result<Option<Arc<dyn IrqLine>>, ConfigError> {
        let name = &config.name;
        if name.is_empty() {
            let expected = "a non-empty name";
            return Err(config.error("name", ConfigErrorKind::InvalidValue { expected }));
        }
        if table.entries.contains_key(name) || pending.iter().any(|p| &p.config.name == name) {
            return Err(config.error("name", ConfigErrorKind::DuplicateName));
        }
        let Some(irq) = config.irq else { return Ok(None) };
        let holder = table
            .entries
            .values()
            .map(|e| &e.info.config)
            .chain(pending.iter().map(|p| &p.config))
            .find(|c| c.irq == Some(irq))
            .map(|c| c.name.clone())
            .or_else(|| self.draining.lock().get(&irq).cloned());
        if let Some(other) = holder {
            return Err(config.error("irq", ConfigErrorKind::IrqInUse { other }));
        }
        let Some(controller) = self.interrupts.as_ref() else {
            return match required {
                true => Err(config.error("irq", ConfigErrorKind::NoInterruptController)),
                false => Ok(None),
            };
        };
        let expected = "a line the interrupt controller has";
        let line = controller.line(irq);
        line.map(Some)
            .ok_or_else(|| config.error("irq", ConfigErrorKind::InvalidValue { expected }))
    }

    /// Places each bus's share of `pending` in one transaction; undoes
    /// earlier buses if a later one refuses.
    pub(super) fn place(
        &self,
        table: &mut Table,
        pending: Vec<Pending>,
    ) -> Result<(), ManagerError> {
        let mut placed: Vec<(Space, Vec<DeviceId>)> = Vec::new();
        let mut ids: Vec<Option<DeviceId>> = alloc::vec![None; pending.len()];
        for space in Space::ALL {
            let mine: Vec<usize> =
                (0..pending.len()).filter(|&i| pending[i].space == space).collect();
            if mine.is_empty() {
                continue;
            }
            let bus = self.buses.get(space);
            let list = mine.iter().map(|&i| {
                let p = &pending[i];
                (p.config.base, p.config.length, p.device.clone())
            });
            match bus.register(list.collect()) {
                Ok(registered) => {
                    for (&i, &id) in mine.iter().zip(&registered) {
                        ids[i] = Some(id);
                    }
                    placed.push((space, registered));
                }
                Err(e) => {
                    for (space, registered) in placed {
                        // Registered by this call under the table lock; a
                        // concurrent direct unregister makes this refuse,
                        // which leaves the bus as wanted anyway.
                        let _ = self.buses.get(space).unregister(&registered);
                    }
                    return Err(self.blame(table, &pending, &mine, space, e));
                }
            }
        }
        for (p, id) in pending.into_iter().zip(ids) {
            let id = id.expect("every pending device was placed on its bus");
            self.shared.name(p.space, id, Arc::from(p.config.name.as_str()));
            let info = DeviceInfo { config: p.config, space: p.space, id };
            let entry = Entry { info, any: p.any, line: p.line };
            table.entries.insert(entry.info.config.name.clone(), entry);
        }
        Ok(())
    }

    /// The error for a refused registration of `pending[mine[..]]` on the
    /// `space` bus, naming the device at fault and the one in its way.
    fn blame(
        &self,
        table: &Table,
        pending: &[Pending],
        mine: &[usize],
        space: Space,
        e: RegisterError,
    ) -> ManagerError {
        match e {
            RegisterError::Range { index, error } => {
                let config = &pending[mine[index]].config;
                let field = if config.length == 0 || config.base <= space.last() {
                    "length"
                } else {
                    "base"
                };
                config.error(field, ConfigErrorKind::Range(error)).into()
            }
            RegisterError::Bus(BusError::Overlap {
                start,
                last,
                existing,
                existing_start,
                existing_last,
            }) => {
                // The bus checks edits in order: the refused device is the
                // first with the refused range after the one in its way,
                // which is either already on the bus or earlier in `mine`.
                let on_bus = self.buses.get(space).ranges().contains_key(&existing);
                let earlier = match on_bus {
                    true => None,
                    false => mine
                        .iter()
                        .position(|&i| pending[i].span() == (existing_start, existing_last)),
                };
                let after = earlier.map_or(0, |k| k + 1);
                let refused = mine[after..]
                    .iter()
                    .find(|&&i| pending[i].span() == (start, last))
                    .map_or(mine[0], |&i| i);
                let other = match earlier {
                    Some(k) => pending[mine[k]].config.name.clone(),
                    None => name_of(table, space, existing),
                };
                pending[refused].config.error("base", ConfigErrorKind::Overlap { other }).into()
            }
            RegisterError::Bus(error) => {
                ManagerError::Bus { device: pending[mine[0]].config.name.clone(), error }
            }
        }
    }

    /// Brings the table in line with the buses: a named device taken off
    /// its bus directly is forgotten (its name and interrupt number become
    /// free), one moved directly gets its new placement. Costs one
    /// generation load per bus when nothing changed.
    pub(super) fn sync(&self, table: &mut Table) {
        for space in Space::ALL {
            let bus = self.buses.get(space);
            // Read before the ranges: an edit in between only makes the next
            // sync look again.
            let generation = bus.generation();
            if table.synced[space as usize] == generation {
                continue;
            }
            let ranges = bus.ranges();
            table.entries.retain(|name, e| {
                if e.info.space != space {
                    return true;
                }
                let Some(&(start, last)) = ranges.get(&e.info.id) else {
                    log::debug!("vmio: `{name}` was taken off the {space} bus directly");
                    self.shared.forget(space, e.info.id);
                    return false;
                };
                e.info.config.base = start;
                if let Some(length) = (last - start).checked_add(1) {
                    e.info.config.length = length;
                }
                true
            });
            table.synced[space as usize] = generation;
        }
    }
}

/// The name of device `id` on the `space` bus: the manager's name, or the
/// bus id (`#3`) for a device registered there directly.
pub(super) fn name_of(table: &Table, space: Space, id: DeviceId) -> String {
    let named = table.entries.values().find(|e| e.info.space == space && e.info.id == id);
    named.map_or_else(|| id.to_string(), |e| e.info.config.name.clone())
}
