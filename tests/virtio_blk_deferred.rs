//! virtio-blk served off the vCPU thread: QueueNotify only signals a
//! per-queue event, [`QueueWorkers`] serve the queues, completions go out
//! through the interrupt line.
//!
//! - `deferred_virtio_drivers_end_to_end`: the `virtio-drivers` crate's
//!   `VirtIOBlk` drives the device through the bus while per-queue workers
//!   serve it; every request completes, data is verified, and every backend
//!   call ran on a worker thread, none on the vCPU.
//! - `ioeventfd_notifies_that_never_reach_the_transport`: notifies are
//!   absorbed in front of the transport (as a KVM ioeventfd absorbs them)
//!   and only signal the event; the workers serve on the event alone.

#[path = "common/virtio_drivers_glue.rs"]
mod glue;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use glue::{BusTransport, GuestHal, guest_ram};
use virtio_drivers::device::blk::{SECTOR_SIZE, VirtIOBlk};
use vmio::virtio::blk::{
    BackendError, BackendFeatures, BlkConfig, BlockBackend, RamDisk, VirtioBlk,
};
use vmio::virtio::{
    CondvarEvent, MmioTransport, QUEUE_NOTIFY_OFFSET, QueueEvent, QueueWorkers, Trigger,
};
use vmio::{Access, Device, DeviceError, IoBus, IoRange, IrqLine, Mmio};

const BASE: u64 = 0x1000_0000;

/// A RAM disk that records the name of every thread that calls it.
struct Traced {
    disk: RamDisk,
    threads: Mutex<Vec<String>>,
}

impl Traced {
    fn new(size: u64) -> Self {
        Traced { disk: RamDisk::new(size), threads: Mutex::new(Vec::new()) }
    }
    fn note(&self) {
        let name = std::thread::current().name().unwrap_or("<unnamed>").to_owned();
        self.threads.lock().unwrap().push(name);
    }
}

impl BlockBackend for Traced {
    fn size(&self) -> u64 {
        self.disk.size()
    }
    fn features(&self) -> BackendFeatures {
        self.disk.features()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        self.note();
        self.disk.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), BackendError> {
        self.note();
        self.disk.write_at(offset, buf)
    }
    fn flush(&self) -> Result<(), BackendError> {
        self.note();
        self.disk.flush()
    }
}

/// An edge line counting its pulses (what an irqfd write would be).
#[derive(Default)]
struct CountingLine(AtomicUsize);
impl IrqLine for CountingLine {
    fn pulse(&self) {
        // Relaxed: a counter read after the fact.
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

fn events(n: u16) -> Vec<Arc<dyn QueueEvent>> {
    (0..n).map(|_| Arc::new(CondvarEvent::new()) as Arc<dyn QueueEvent>).collect()
}

/// xorshift64*.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Random writes with read-back, then the whole disk against a shadow.
fn write_read_verify(driver: &mut VirtIOBlk<GuestHal, BusTransport>, rounds: usize) -> Vec<u8> {
    let sectors = driver.capacity() as usize;
    let mut shadow = vec![0u8; sectors * SECTOR_SIZE];
    let mut rng = Rng(0xdef0_1234_5678_9abc);
    for round in 0..rounds {
        let n = 1 + rng.below(16) as usize;
        let start = rng.below((sectors - n) as u64) as usize;
        let data: Vec<u8> = (0..n * SECTOR_SIZE).map(|_| rng.next() as u8).collect();
        driver.write_blocks(start, &data).unwrap_or_else(|e| panic!("round {round}: {e:?}"));
        shadow[start * SECTOR_SIZE..(start + n) * SECTOR_SIZE].copy_from_slice(&data);
        let mut back = vec![0u8; data.len()];
        driver.read_blocks(start, &mut back).unwrap();
        assert_eq!(back, data, "round {round}: sectors {start}+{n}");
    }
    let mut chunk = vec![0u8; 64 * SECTOR_SIZE];
    for start in (0..sectors).step_by(64) {
        let n = (sectors - start).min(64);
        driver.read_blocks(start, &mut chunk[..n * SECTOR_SIZE]).unwrap();
        let want = &shadow[start * SECTOR_SIZE..(start + n) * SECTOR_SIZE];
        assert!(chunk[..n * SECTOR_SIZE] == *want, "disk differs from shadow at sector {start}");
    }
    shadow
}

#[test]
fn deferred_virtio_drivers_end_to_end() {
    let rounds = if cfg!(miri) { 8 } else { 200 };
    let disk = Arc::new(Traced::new(2 << 20));
    // Two queues, two workers; the driver uses queue 0 (it does not do MQ),
    // queue 1's worker must stay harmlessly idle.
    let config = BlkConfig { num_queues: 2, ..BlkConfig::default() }.with_id("deferred");
    let blk = VirtioBlk::new(disk.clone(), config).unwrap();
    let line = Arc::new(CountingLine::default());
    let transport = Arc::new(MmioTransport::new(blk, guest_ram(), line.clone(), Trigger::Edge));
    let workers = QueueWorkers::spawn(transport.clone(), events(2)).unwrap();
    assert_eq!(workers.len(), 2);
    let bus = IoBus::<Mmio>::new();
    bus.register(IoRange::new(BASE, 0x200).unwrap(), transport.clone()).unwrap();

    let mut driver = VirtIOBlk::<GuestHal, _>::new(BusTransport::new(&bus, BASE, 0)).unwrap();
    let shadow = write_read_verify(&mut driver, rounds);
    driver.flush().unwrap();
    let mut id = [0u8; 20];
    let len = driver.device_id(&mut id).unwrap();
    assert_eq!(&id[..len], b"deferred");

    let mut on_disk = vec![0u8; shadow.len()];
    disk.disk.read_at(0, &mut on_disk).unwrap();
    assert!(on_disk == shadow, "backend differs from the driver's shadow");
    // Every backend call ran on queue 0's worker, none on the vCPU.
    let threads = std::mem::take(&mut *disk.threads.lock().unwrap());
    assert!(!threads.is_empty());
    assert!(
        threads.iter().all(|t| t == "vmio-queue-0"),
        "backend called off the worker: {:?}",
        threads.iter().find(|t| *t != "vmio-queue-0")
    );
    // Completions were signalled through the line (the driver polls, but
    // the device still interrupts when the driver has not suppressed it).
    assert!(line.0.load(Ordering::Relaxed) > 0, "no interrupt raised from the workers");
    drop(driver);
    workers.shutdown();
}

/// Stands in front of the transport the way KVM does with an ioeventfd
/// registered at QueueNotify: a notify write with datamatch `q` signals
/// event `q` and never reaches the transport.
struct IoEventFd<D: vmio::virtio::VirtioDevice> {
    transport: Arc<MmioTransport<D>>,
    events: Vec<Arc<dyn QueueEvent>>,
    absorbed: AtomicUsize,
}

impl<D: vmio::virtio::VirtioDevice> Device for IoEventFd<D> {
    fn read(&self, access: Access) -> Result<u64, DeviceError> {
        self.transport.read(access)
    }
    fn write(&self, access: Access, value: u64) -> Result<(), DeviceError> {
        if access.offset == QUEUE_NOTIFY_OFFSET
            && let Some(ev) = usize::try_from(value).ok().and_then(|q| self.events.get(q))
        {
            // Relaxed: a counter read after the fact.
            self.absorbed.fetch_add(1, Ordering::Relaxed);
            ev.signal();
            return Ok(());
        }
        self.transport.write(access, value)
    }
}

#[test]
fn ioeventfd_notifies_that_never_reach_the_transport() {
    let rounds = if cfg!(miri) { 4 } else { 50 };
    let disk = Arc::new(Traced::new(1 << 20));
    let blk = VirtioBlk::new(disk.clone(), BlkConfig::default()).unwrap();
    let line = Arc::new(CountingLine::default());
    let transport = Arc::new(MmioTransport::new(blk, guest_ram(), line, Trigger::Edge));
    let evs = events(1);
    let workers = QueueWorkers::spawn(transport.clone(), evs.clone()).unwrap();
    let front =
        Arc::new(IoEventFd { transport: transport.clone(), events: evs, absorbed: 0.into() });
    let bus = IoBus::<Mmio>::new();
    bus.register(IoRange::new(BASE, 0x200).unwrap(), front.clone()).unwrap();

    let mut driver = VirtIOBlk::<GuestHal, _>::new(BusTransport::new(&bus, BASE, 0)).unwrap();
    write_read_verify(&mut driver, rounds);
    assert!(front.absorbed.load(Ordering::Relaxed) > 0, "no notify went through the eventfd");
    drop(driver);
    drop(workers);
}
