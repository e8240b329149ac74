//! virtio-blk driven end to end by the `virtio-drivers` guest driver over
//! guest RAM held the way rust-vmm VMMs hold it: a `vm_memory`
//! `GuestMemoryMmap`, handed to the device as `Arc<dyn GuestMemory>` with no
//! copy or adapter in between. Every ring, descriptor, header, data buffer
//! and status byte lives in that mapping.
#![cfg(feature = "vm-memory")]

#[path = "common/rng.rs"]
mod rng;
use rng::Rng;

#[path = "common/virtio_drivers_glue.rs"]
mod glue;

use std::sync::{Arc, OnceLock};
use std::thread;

use glue::{RAM_BASE, RAM_SIZE, bring_up, guest_ram, plug, ram_disk_end_to_end};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmio::GuestMemory;
use vmio::virtio::Trigger;
use vmio::virtio::blk::{BlkConfig, BlockBackend, RamDisk, VirtioBlk};
use vmio::virtio::spec::blk::{T_IN, T_OUT};
use vmio::{IoBus, Mmio};

const BASE: u64 = 0x1000_0000;

/// The process's guest RAM is a `GuestMemoryMmap`; every test calls this
/// before touching guest RAM. Returns the host address of `RAM_BASE`.
fn setup() -> usize {
    static HOST: OnceLock<usize> = OnceLock::new();
    *HOST.get_or_init(|| {
        let mmap =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(RAM_BASE), RAM_SIZE as usize)])
                .expect("anonymous guest memory");
        let host = mmap.get_host_address(GuestAddress(RAM_BASE)).unwrap() as usize;
        let memory: Arc<dyn GuestMemory> = Arc::new(mmap);
        assert!(glue::use_guest_memory(memory), "guest RAM chosen before first use");
        host
    })
}

fn plug_blk<B: BlockBackend + 'static>(
    backend: B,
    config: BlkConfig,
    trigger: Trigger,
) -> IoBus<Mmio> {
    plug(VirtioBlk::new(backend, config).expect("valid config"), BASE, trigger)
}

#[test]
fn virtio_drivers_blk_over_guest_memory_mmap() {
    let host = setup();
    // The device's memory is the VMM's mapping itself.
    let ram = guest_ram();
    assert_eq!(ram.host_ptr(RAM_BASE, 8).unwrap().as_ptr() as usize, host);

    let rounds = if cfg!(miri) { 8 } else { 300 };
    let disk = Arc::new(RamDisk::new(4 << 20));
    let config = BlkConfig::default().with_id("vmio-vm-memory");
    let bus = plug_blk(disk.clone(), config, Trigger::Level);
    ram_disk_end_to_end(&bus, BASE, &*disk, b"vmio-vm-memory", rounds, 0x5eed);
}

#[test]
fn two_queues_on_two_threads_over_guest_memory_mmap() {
    setup();
    let disk = Arc::new(RamDisk::new(1 << 20));
    let config = BlkConfig { num_queues: 2, ..BlkConfig::default() };
    let bus = plug_blk(disk.clone(), config, Trigger::Edge);
    let (_, pending) = bring_up(&bus, BASE, 2, u64::MAX);
    let per_queue = (1 << 20) / 2;
    let workers: Vec<_> = pending
        .into_iter()
        .map(|p| {
            thread::spawn(move || {
                let mut q = p.attach();
                let base = u64::from(q.index()) * per_queue;
                let mut rng = Rng::new(0x1000 + u64::from(q.index()));
                for i in 0..64u64 {
                    let sector = (base + (i % 32) * 4096) / 512;
                    let data: Vec<u8> = (0..4096).map(|_| rng.next() as u8).collect();
                    assert_eq!(q.request(T_OUT, sector, &data, &mut []).0, 0, "write");
                    let mut back = vec![0u8; 4096];
                    assert_eq!(q.request(T_IN, sector, &[], &mut back).0, 0, "read");
                    assert!(back == data, "queue {} sector {sector}", q.index());
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("queue thread");
    }
}
