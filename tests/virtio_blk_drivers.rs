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

use glue::{BusTransport, GuestHal, flush_and_check_id, guest_ram, write_read_verify};
use virtio_drivers::device::blk::{SECTOR_SIZE, VirtIOBlk};
use virtio_drivers::transport::{DeviceType, Transport};
use vmio::testing::RecordingIrq;
use vmio::virtio::blk::{BlkConfig, BlockBackend, FileDisk, RamDisk, VirtioBlk};
use vmio::virtio::{MmioTransport, Trigger};
use vmio::{IoBus, IoRange, Mmio};

const BASE: u64 = 0x1000_0000;

/// A bus with one virtio-blk over `backend` at `BASE`.
fn plug<B: BlockBackend + 'static>(backend: B, config: BlkConfig) -> IoBus<Mmio> {
    let blk = VirtioBlk::new(backend, config).expect("valid config");
    let irq = Arc::new(RecordingIrq::new());
    let transport = MmioTransport::new(blk, guest_ram(), irq, Trigger::Level);
    let bus = IoBus::<Mmio>::new();
    bus.register(IoRange::new(BASE, 0x200).unwrap(), Arc::new(transport)).unwrap();
    bus
}

#[test]
fn virtio_drivers_blk_runs_against_ram_disk() {
    let rounds = if cfg!(miri) { 8 } else { 300 };
    let disk = Arc::new(RamDisk::new(4 << 20));
    let bus = plug(disk.clone(), BlkConfig::default().with_id("vmio-e2e-ram"));

    let transport = BusTransport::new(&bus, BASE, 0);
    assert_eq!(transport.device_type(), DeviceType::Block);
    let mut driver =
        VirtIOBlk::<GuestHal, _>::new(transport).expect("driver initializes the device");
    assert_eq!(driver.capacity(), (4 << 20) / 512);
    assert!(!driver.readonly());

    let shadow = write_read_verify(&mut driver, rounds, 0x1234_5678);
    flush_and_check_id(&mut driver, b"vmio-e2e-ram");

    // What the driver wrote is what the backend holds.
    let mut on_disk = vec![0u8; shadow.len()];
    disk.read_at(0, &mut on_disk).unwrap();
    assert!(on_disk == shadow, "backend differs from the driver's shadow");

    // Beyond capacity: the device answers IOERR and the driver goes on.
    let mut buf = [0u8; SECTOR_SIZE];
    let last = driver.capacity() as usize;
    assert!(driver.read_blocks(last, &mut buf).is_err());
    driver.read_blocks(last - 1, &mut buf).expect("the last sector is readable");
}

#[test]
fn virtio_drivers_blk_read_only_disk_refuses_writes() {
    let image: Vec<u8> = (0..64 * 1024u32).map(|i| (i * 7) as u8).collect();
    let bus = plug(RamDisk::from_image(&image).read_only(), BlkConfig::default());
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
        let bus = plug(disk, BlkConfig::default().with_id("vmio-e2e-file"));
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
