//! Guest RAM: one anonymous mapping from vm-memory, registered with KVM as
//! memory slot 0 and handed to vmio's devices as their `GuestMemory`.

use std::sync::Arc;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmio::virtio::{GuestMemory, MemoryError};

/// The guest's RAM as vmio's devices see it: every access bounds-checked
/// against the mapping.
pub struct Ram(pub GuestMemoryMmap);

impl Ram {
    /// `size` bytes of RAM at guest address 0, registered with `vm`.
    pub fn new(vm: &VmFd, size: u64) -> Result<Arc<Ram>, String> {
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
            // alive: `main` joins them before dropping it) is the only
            // other user of the mapping.
            unsafe { vm.set_user_memory_region(region_info) }
                .map_err(|e| format!("KVM_SET_USER_MEMORY_REGION: {e}"))?;
        }
        Ok(Arc::new(Ram(mem)))
    }

    /// Size of the RAM in bytes.
    pub fn size(&self) -> u64 {
        self.0.iter().map(GuestMemoryRegion::len).sum()
    }
}

fn range_error(addr: u64, len: u64) -> MemoryError {
    if addr.checked_add(len).is_none() {
        MemoryError::Overflow { addr, len }
    } else {
        MemoryError::OutOfBounds { addr, len }
    }
}

impl GuestMemory for Ram {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let len = buf.len() as u64;
        self.check(addr, len)?;
        self.0.read_slice(buf, GuestAddress(addr)).map_err(|_| range_error(addr, len))
    }

    fn write(&self, addr: u64, data: &[u8]) -> Result<(), MemoryError> {
        let len = data.len() as u64;
        self.check(addr, len)?;
        self.0.write_slice(data, GuestAddress(addr)).map_err(|_| range_error(addr, len))
    }

    fn check(&self, addr: u64, len: u64) -> Result<(), MemoryError> {
        let end = addr.checked_add(len).ok_or(MemoryError::Overflow { addr, len })?;
        let ok = len == 0
            || usize::try_from(len).is_ok_and(|n| self.0.check_range(GuestAddress(addr), n));
        if ok && end <= self.size() { Ok(()) } else { Err(MemoryError::OutOfBounds { addr, len }) }
    }
}
