//! Guest RAM: one anonymous mapping from vm-memory, registered with KVM as
//! memory slot 0 and handed as it is to vmio's devices (vmio implements its
//! `GuestMemory` for `GuestMemoryMmap`, feature `vm-memory`).

use std::sync::Arc;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmio::GuestMemory;

/// The guest's RAM, shared by the loader, the vCPU loop and the devices.
pub struct Ram(pub Arc<GuestMemoryMmap>);

impl Ram {
    /// `size` bytes of RAM at guest address 0, registered with `vm`.
    pub fn new(vm: &VmFd, size: u64) -> Result<Ram, String> {
        let len = usize::try_from(size).map_err(|_| "memory size does not fit".to_string())?;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), len)])
            .map_err(|e| format!("guest memory: {e}"))?;
        for (slot, region) in mem.iter().enumerate() {
            let region_info = kvm_userspace_memory_region {
                slot: u32::try_from(slot).expect("one region"),
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
                flags: 0,
            };
            // SAFETY: the mapping behind `userspace_addr` is `memory_size`
            // bytes long and lives in `mem`, which the returned `Ram` owns;
            // the VM (and its vCPUs, which only run while the `Ram` is
            // alive: the VMM joins them before dropping it) is the only
            // other user of the mapping.
            unsafe { vm.set_user_memory_region(region_info) }
                .map_err(|e| format!("KVM_SET_USER_MEMORY_REGION: {e}"))?;
        }
        Ok(Ram(Arc::new(mem)))
    }

    /// Size of the RAM in bytes.
    pub fn size(&self) -> u64 {
        self.0.iter().map(GuestMemoryRegion::len).sum()
    }

    /// The same memory as vmio's devices take it.
    pub fn for_devices(&self) -> Arc<dyn GuestMemory> {
        self.0.clone()
    }
}
