//! Every malformed ring a hostile driver can build, against virtio-blk on
//! its transport: a rejected chain comes back with length 0 and the queue
//! goes on; a broken ring sets DEVICE_NEEDS_RESET with a config interrupt,
//! and after a reset the device serves requests again. Nothing panics, and
//! the disk is never written by a rejected request.

use std::sync::Arc;

use vmio::testing::RecordingIrq;
use vmio::testing::{
    BlkRequest, Buf, DirectIo, Expect, Hostile, HostileEnv, InitOptions, MmioDriver,
};
use vmio::virtio::blk::{BlkConfig, BlockBackend, RamDisk, VirtioBlk};
use vmio::virtio::spec::blk::{S_OK, T_IN, T_OUT};
use vmio::virtio::spec::features::{
    VIRTIO_F_INDIRECT_DESC, VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1,
};
use vmio::virtio::spec::interrupt::CONFIG_CHANGE as INT_CONFIG_CHANGE;
use vmio::virtio::spec::status::DEVICE_NEEDS_RESET;
use vmio::virtio::{MmioTransport, Trigger};
use vmio::{GuestMemory, GuestRam};

const RAM_END: u64 = 0x10_0000;
const QBASE: u64 = 0x1000;
const QSIZE: u16 = 16;
const ENV: HostileEnv = HostileEnv { scratch: 0x8000, ram_end: RAM_END };
/// Buffers of the well-formed requests.
const HDR: u64 = 0x2_0000;
const DATA: u64 = 0x2_1000;
const STATUS: u64 = 0x2_2000;

fn request<R: vmio::testing::RegisterIo>(
    drv: &mut MmioDriver<R>,
    ram: &GuestRam,
    kind: u32,
    sector: u64,
) -> (u8, u32) {
    let data = Buf { addr: DATA, len: 512, writable: kind == T_IN };
    let bufs = BlkRequest::raw(kind, sector).data(&[data]).place(ram, HDR, STATUS).unwrap();
    let head = drv.submit(ram, 0, &bufs).unwrap();
    drv.notify(0).unwrap();
    let (id, len) = drv.queue(0).pop_used(ram).unwrap().expect("request completed");
    assert_eq!(id, u32::from(head));
    let mut s = [0u8];
    ram.read(STATUS, &mut s).unwrap();
    (s[0], len)
}

fn against_blk(case: Hostile) {
    let ram = Arc::new(GuestRam::new(0, RAM_END).unwrap());
    let disk = Arc::new(RamDisk::new(1 << 20));
    let blk = VirtioBlk::new(disk.clone(), BlkConfig::default()).unwrap();
    let dev = MmioTransport::new(blk, ram.clone(), Arc::new(RecordingIrq::new()), Trigger::Edge);
    let mut drv = MmioDriver::new(DirectIo(&dev));
    let indirect = if case.needs_indirect() { VIRTIO_F_INDIRECT_DESC } else { 0 };
    let features = VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX | indirect;
    let opts = InitOptions { features, ack_and_driver_together: true };
    drv.init(&*ram, opts, &[(0, QSIZE, QBASE)]).unwrap();
    ram.write(DATA, &[0x5a; 512]).unwrap();
    assert_eq!(request(&mut drv, &ram, T_OUT, 1), (S_OK, 1));
    drv.ack_interrupt().unwrap();

    // The hostile buffers lie in the scratch area; whatever the device makes
    // of them, it must not write the disk.
    let expect = case.build(&*ram, drv.queue(0), ENV).unwrap();
    drv.notify(0).unwrap();
    match expect {
        Expect::Rejected { head, .. } => {
            assert_eq!(
                drv.queue(0).pop_used(&*ram).unwrap(),
                Some((u32::from(head), 0)),
                "{case:?}"
            );
            assert_eq!(drv.status().unwrap() & DEVICE_NEEDS_RESET, 0, "{case:?}");
        }
        Expect::Broken { .. } => {
            assert_ne!(drv.status().unwrap() & DEVICE_NEEDS_RESET, 0, "{case:?}");
            assert_ne!(drv.ack_interrupt().unwrap() & INT_CONFIG_CHANGE, 0, "{case:?}");
            drv.notify(0).unwrap(); // harmless
            drv.init(&*ram, opts, &[(0, QSIZE, QBASE)]).unwrap();
        }
    }
    // The device serves requests again, and the disk holds exactly what the
    // well-formed write put there.
    ram.write(DATA, &[0; 512]).unwrap();
    assert_eq!(request(&mut drv, &ram, T_IN, 1), (S_OK, 513), "{case:?}");
    let mut back = [0u8; 512];
    ram.read(DATA, &mut back).unwrap();
    assert_eq!(back, [0x5a; 512]);
    let mut whole = vec![0u8; 1 << 20];
    disk.read_at(0, &mut whole).unwrap();
    assert!(whole[..512].iter().all(|&b| b == 0), "{case:?}: sector 0 written");
    assert!(whole[1024..].iter().all(|&b| b == 0), "{case:?}: disk written");
}

#[test]
fn every_hostile_ring_against_virtio_blk() {
    for &case in Hostile::ALL {
        against_blk(case);
    }
}
