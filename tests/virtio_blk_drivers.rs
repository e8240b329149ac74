//! virtio-blk driven end to end by a third-party guest driver: the
//! `virtio-drivers` crate's `VirtIOBlk` initializes the device, reads its
//! capacity, writes, reads back and verifies many sectors, flushes and reads
//! the device id. Every register access goes through an `IoBus` to the
//! virtio-mmio transport; every buffer lives in guest RAM.

#[path = "common/rng.rs"]
mod rng;

#[path = "common/virtio_drivers_glue.rs"]
mod glue;

use std::sync::Arc;

use glue::{
    BusTransport, GuestHal, flush_and_check_id, plug, ram_disk_end_to_end, write_read_verify,
};
use virtio_drivers::device::blk::{SECTOR_SIZE, VirtIOBlk};
use vmio::virtio::Trigger;
use vmio::virtio::blk::{BlkConfig, BlockBackend, FileDisk, RamDisk, VirtioBlk};
use vmio::{IoBus, Mmio};

const BASE: u64 = 0x1000_0000;

/// A bus with one virtio-blk over `backend` at `BASE`.
fn plug_blk<B: BlockBackend + 'static>(backend: B, config: BlkConfig) -> IoBus<Mmio> {
    plug(VirtioBlk::new(backend, config).expect("valid config"), BASE, Trigger::Level)
}

#[test]
fn virtio_drivers_blk_runs_against_ram_disk() {
    let rounds = if cfg!(miri) { 8 } else { 300 };
    let disk = Arc::new(RamDisk::new(4 << 20));
    let bus = plug_blk(disk.clone(), BlkConfig::default().with_id("vmio-e2e-ram"));
    ram_disk_end_to_end(&bus, BASE, &*disk, b"vmio-e2e-ram", rounds, 0x1234_5678);
}

#[test]
fn virtio_drivers_blk_read_only_disk_refuses_writes() {
    let image: Vec<u8> = (0..64 * 1024u32).map(|i| (i * 7) as u8).collect();
    let bus = plug_blk(RamDisk::from_image(&image).read_only(), BlkConfig::default());
    let mut driver = VirtIOBlk::<GuestHal, _>::new(BusTransport::new(&bus, BASE, 1)).unwrap();
    assert!(driver.readonly(), "RO negotiated");
    assert!(driver.write_blocks(3, &[0u8; SECTOR_SIZE]).is_err(), "write refused");
    let mut back = vec![0u8; image.len()];
    driver.read_blocks(0, &mut back).unwrap();
    assert_eq!(back, image, "nothing was written");
}

#[test]
fn virtio_drivers_blk_runs_against_file_disk() {
    let rounds = if cfg!(miri) { 4 } else { 100 };
    let path = std::env::temp_dir().join(format!("vmio-e2e-{}.img", std::process::id()));
    std::fs::File::create(&path).unwrap().set_len(2 << 20).unwrap();
    let shadow = {
        let disk = FileDisk::open(&path, false).unwrap();
        let bus = plug_blk(disk, BlkConfig::default().with_id("vmio-e2e-file"));
        let mut driver = VirtIOBlk::<GuestHal, _>::new(BusTransport::new(&bus, BASE, 0)).unwrap();
        assert_eq!(driver.capacity(), (2 << 20) / 512);
        let shadow = write_read_verify(&mut driver, rounds, 42);
        // The flush is the file's sync_data.
        flush_and_check_id(&mut driver, b"vmio-e2e-file");
        shadow
    };
    // Everything reached the file.
    let bytes = std::fs::read(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    assert!(bytes == shadow, "file differs from the driver's shadow");
}
