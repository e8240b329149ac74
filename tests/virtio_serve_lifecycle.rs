//! How a queue is served, and when it must not be: the serve loop's
//! re-check, the per-queue lifecycle (QueueReady after DRIVER_OK), a batch
//! that ends in a ring-breaking entry, and a reset while a worker is in the
//! middle of a batch.
//!
//! - `buffer_added_while_notifications_are_off_is_served`: the driver adds
//!   a request exactly when the device has drained the ring but not yet
//!   re-enabled notifications; the driver (rightly) does not notify. Only
//!   the re-check after re-enabling finds it: without it the request is
//!   never served (the inline check fails at once, the deferred one after
//!   its deadline).
//! - `notify_during_a_serve_is_not_lost`: in deferred mode, a notify that
//!   arrives while the worker serves the same queue is served.
//! - `queue_ready_zero_stops_the_queue`: after QueueReady = 0 the device
//!   touches nothing of the queue (disk, status byte, used ring) however
//!   often the driver notifies, QueueReady reads back what was written, the
//!   device hears `queue_stopped` / `queue_started`, and setting the queue
//!   ready again resumes it where it left off (inline and deferred).
//! - `valid_requests_before_a_ring_breaking_entry_complete`: their
//!   completions are published before DEVICE_NEEDS_RESET is raised.
//! - `reset_while_a_worker_is_mid_batch`: no panic, every request either
//!   completed once (backend ran it, used ring has it once) or never
//!   started; the device comes back after re-initialisation.
//! - `unplug_while_a_worker_is_mid_batch`: the unplug completes while the
//!   worker is inside the batch; shutting the workers down finishes the
//!   batch: every request completed exactly once.

#[path = "common/gate.rs"]
mod gate;
use gate::Gate;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use vmio::testing::{
    BackendOp, BlkRequest, Buf, CountCalls, DirectIo, FaultyDisk, GuestAlloc, GuestQueue,
    InitOptions, Intercept, MmioDriver, RecordingIrq, RegisterIo,
};
use vmio::virtio::blk::{BlkConfig, BlockBackend, RamDisk, RequestType, VirtioBlk};
use vmio::virtio::spec::blk::S_OK;
use vmio::virtio::spec::features::VIRTIO_F_VERSION_1;
use vmio::virtio::spec::interrupt::USED_BUFFER as INT_USED_BUFFER;
use vmio::virtio::spec::mmio as regs;
use vmio::virtio::spec::status::DEVICE_NEEDS_RESET;
use vmio::virtio::{CondvarEvent, MmioTransport, QueueEvent, QueueWorkers, Trigger};
use vmio::{Access, Device, Width};
use vmio::{GuestMemory, GuestRam, MemoryError};

const RAM: u64 = 0x4000_0000;
const RAM_SIZE: u64 = 0x20_0000;
const QSIZE: u16 = 64;
const QBASE: u64 = RAM;
const DEADLINE: Duration = Duration::from_secs(10);

fn acc(offset: u64) -> Access {
    Access { offset, addr: 0x1000_0000 + offset, width: Width::U32, vcpu: Some(0) }
}
fn rd(d: &dyn Device, off: u64) -> u32 {
    d.read(acc(off)).unwrap() as u32
}
fn wr(d: &dyn Device, off: u64, v: u32) {
    d.write(acc(off), u64::from(v)).unwrap()
}

/// No EVENT_IDX: notification suppression is the NO_NOTIFY flag, which the
/// hook below watches.
const OPTS: InitOptions =
    InitOptions { features: VIRTIO_F_VERSION_1, ack_and_driver_together: false };

/// Guest RAM that runs a one-shot hook right before the device stores 0
/// into the used ring's flags (what re-enabling notifications does without
/// EVENT_IDX): the moment between "drained" and "notifications back on".
struct Hooked {
    ram: Arc<GuestRam>,
    used_flags: u64,
    hook: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    fired: AtomicUsize,
}

impl Hooked {
    fn arm(&self, f: impl FnOnce() + Send + 'static) {
        *self.hook.lock().unwrap() = Some(Box::new(f));
    }
}

impl GuestMemory for Hooked {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        self.ram.read(addr, buf)
    }
    fn write(&self, addr: u64, data: &[u8]) -> Result<(), MemoryError> {
        self.ram.write(addr, data)
    }
    fn check(&self, addr: u64, len: u64) -> Result<(), MemoryError> {
        self.ram.check(addr, len)
    }
    fn load_u16(&self, addr: u64, order: Ordering) -> Result<u16, MemoryError> {
        self.ram.load_u16(addr, order)
    }
    fn store_u16(&self, addr: u64, value: u16, order: Ordering) -> Result<(), MemoryError> {
        if addr == self.used_flags && value == 0 {
            let hook = self.hook.lock().unwrap().take();
            if let Some(hook) = hook {
                // Relaxed: a counter read after the fact.
                self.fired.fetch_add(1, Ordering::Relaxed);
                hook();
            }
        }
        self.ram.store_u16(addr, value, order)
    }
}

/// Guest-side helpers for virtio-blk requests on one queue.
struct Requests {
    ram: Arc<GuestRam>,
    alloc: GuestAlloc,
}

impl Requests {
    fn new(ram: Arc<GuestRam>) -> Self {
        Requests { ram, alloc: GuestAlloc::new(RAM + 0x10_0000, 0x10_0000) }
    }

    /// A write of one sector filled with `byte`: its buffers and the
    /// address of its status byte (preset to 0xff).
    fn write(&mut self, sector: u64, byte: u8) -> ([Buf; 3], u64) {
        let hdr = self.alloc.alloc(16, 16);
        let data = self.alloc.alloc(512, 512);
        self.ram.write(data, &[byte; 512]).unwrap();
        let status = self.alloc.alloc(1, 1);
        let bufs = BlkRequest::new(RequestType::Out, sector)
            .data(&[Buf::readable(data, 512)])
            .place(&*self.ram, hdr, status)
            .unwrap();
        (bufs.try_into().expect("header, data, status"), status)
    }

    fn status(&self, at: u64) -> u8 {
        let mut b = [0u8];
        self.ram.read(at, &mut b).unwrap();
        b[0]
    }
}

fn sector_byte(disk: &RamDisk, sector: u64) -> u8 {
    let mut b = [0u8; 512];
    disk.read_at(sector * 512, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == b[0]), "sector {sector} torn");
    b[0]
}

fn wait_used(q: &GuestQueue, ram: &GuestRam, want: u16) -> bool {
    let deadline = Instant::now() + DEADLINE;
    while q.used_idx(ram).unwrap() != want {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::yield_now();
    }
    true
}

struct HookRig {
    ram: Arc<GuestRam>,
    mem: Arc<Hooked>,
    disk: Arc<RamDisk>,
    dev: Arc<MmioTransport<VirtioBlk<Arc<RamDisk>>>>,
    queue: Arc<Mutex<GuestQueue>>,
    reqs: Arc<Mutex<Requests>>,
}

fn hook_rig() -> HookRig {
    let ram = Arc::new(GuestRam::new(RAM, RAM_SIZE).unwrap());
    let used_flags = GuestQueue::new(QSIZE, QBASE).config().used_ring;
    let mem =
        Arc::new(Hooked { ram: ram.clone(), used_flags, hook: Mutex::new(None), fired: 0.into() });
    let disk = Arc::new(RamDisk::new(1 << 20));
    let blk = VirtioBlk::new(disk.clone(), BlkConfig::default()).unwrap();
    let dev = Arc::new(MmioTransport::new(
        blk,
        mem.clone(),
        Arc::new(RecordingIrq::new()),
        Trigger::Edge,
    ));
    let mut drv = MmioDriver::new(DirectIo(&*dev));
    drv.init(&*ram, OPTS, &[(0, QSIZE, QBASE)]).unwrap();
    let queue = Arc::new(Mutex::new(drv.queue(0).clone()));
    let reqs = Arc::new(Mutex::new(Requests::new(ram.clone())));
    HookRig { ram, mem, disk, dev, queue, reqs }
}

/// Arms the hook to add a write of sector 2 without notifying (the device
/// asked for no notifications at that moment); returns its status address.
fn arm_silent_add(r: &HookRig) -> Arc<Mutex<Option<u64>>> {
    let status = Arc::new(Mutex::new(None));
    let (q, reqs, ram, st) = (r.queue.clone(), r.reqs.clone(), r.ram.clone(), status.clone());
    r.mem.arm(move || {
        let (bufs, at) = reqs.lock().unwrap().write(2, 0xb2);
        let mut q = q.lock().unwrap();
        let old = q.avail_idx();
        q.add(&*ram, &bufs).unwrap();
        // A spec-following driver looks at NO_NOTIFY: still set.
        assert!(!q.needs_notify(&*ram, false, old).unwrap(), "device still asks for no notifies");
        *st.lock().unwrap() = Some(at);
    });
    status
}

/// Adds a write of sector 1 and notifies through the register.
fn first_request(r: &HookRig) -> u64 {
    let (bufs, at) = r.reqs.lock().unwrap().write(1, 0xb1);
    let mut q = r.queue.lock().unwrap();
    let old = q.avail_idx();
    q.add(&*r.ram, &bufs).unwrap();
    assert!(q.needs_notify(&*r.ram, false, old).unwrap());
    drop(q);
    wr(&*r.dev, regs::QUEUE_NOTIFY, 0);
    at
}

#[test]
fn buffer_added_while_notifications_are_off_is_served() {
    // Inline: the notify serves on this thread; when it returns, both
    // requests must be complete.
    let r = hook_rig();
    let second = arm_silent_add(&r);
    let first = first_request(&r);
    assert_eq!(r.mem.fired.load(Ordering::Relaxed), 1, "the hook ran inside the serve");
    let second = second.lock().unwrap().expect("hook added the second request");
    let q = r.queue.lock().unwrap();
    assert_eq!(
        q.used_idx(&*r.ram).unwrap(),
        2,
        "the request added while notifications were off was lost (no re-check)"
    );
    let reqs = r.reqs.lock().unwrap();
    assert_eq!((reqs.status(first), reqs.status(second)), (S_OK, S_OK));
    assert_eq!((sector_byte(&r.disk, 1), sector_byte(&r.disk, 2)), (0xb1, 0xb2));
}

#[test]
fn buffer_added_while_notifications_are_off_is_served_by_a_worker() {
    let r = hook_rig();
    let workers =
        QueueWorkers::spawn(r.dev.clone(), vec![Arc::new(CondvarEvent::new()) as _]).unwrap();
    let second = arm_silent_add(&r);
    first_request(&r);
    let served = {
        let q = r.queue.lock().unwrap().clone();
        wait_used(&q, &r.ram, 2)
    };
    assert!(served, "the request added while notifications were off was never served");
    assert!(second.lock().unwrap().is_some());
    assert_eq!(sector_byte(&r.disk, 2), 0xb2);
    workers.shutdown();
}

#[test]
fn notify_during_a_serve_is_not_lost() {
    let r = hook_rig();
    let workers =
        QueueWorkers::spawn(r.dev.clone(), vec![Arc::new(CondvarEvent::new()) as _]).unwrap();
    // This time the hook's driver notifies too (as a driver ignoring
    // NO_NOTIFY, or one on another vCPU, may): the register write lands
    // while the worker is inside the serve of the same queue.
    let dev: Weak<MmioTransport<_>> = Arc::downgrade(&r.dev);
    let (q, reqs, ram) = (r.queue.clone(), r.reqs.clone(), r.ram.clone());
    r.mem.arm(move || {
        let (bufs, _) = reqs.lock().unwrap().write(3, 0xb3);
        q.lock().unwrap().add(&*ram, &bufs).unwrap();
        let dev = dev.upgrade().expect("transport alive");
        wr(&*dev, regs::QUEUE_NOTIFY, 0);
    });
    first_request(&r);
    let q = r.queue.lock().unwrap().clone();
    assert!(wait_used(&q, &r.ram, 2), "a notify during the serve was lost");
    assert_eq!(sector_byte(&r.disk, 3), 0xb3);
    workers.shutdown();
}

fn queue_ready_zero_stops_the_queue_in(deferred: bool) {
    let ram = Arc::new(GuestRam::new(RAM, RAM_SIZE).unwrap());
    let disk = Arc::new(RamDisk::new(1 << 20));
    let blk = Intercept {
        device: VirtioBlk::new(disk.clone(), BlkConfig::default()).unwrap(),
        hook: CountCalls::default(),
    };
    let line = Arc::new(RecordingIrq::new());
    let dev = Arc::new(MmioTransport::new(blk, ram.clone(), line, Trigger::Edge));
    let workers = deferred.then(|| {
        QueueWorkers::spawn(dev.clone(), vec![Arc::new(CondvarEvent::new()) as _]).unwrap()
    });
    let mut drv = MmioDriver::new(DirectIo(&*dev));
    drv.init(&*ram, OPTS, &[(0, QSIZE, QBASE)]).unwrap();
    let mut reqs = Requests::new(ram.clone());

    let (bufs, st1) = reqs.write(1, 0xa1);
    drv.submit(&*ram, 0, &bufs).unwrap();
    assert!(wait_used(drv.queue(0), &ram, 1));
    assert_eq!(reqs.status(st1), S_OK);

    // The driver stops the queue and reads 0 back.
    wr(&*dev, regs::QUEUE_SEL, 0);
    wr(&*dev, regs::QUEUE_READY, 0);
    assert_eq!(rd(&*dev, regs::QUEUE_READY), 0);
    assert!(!dev.queue_live(0));
    assert_eq!(dev.device().hook.stopped(), 1);

    // Requests made available now must not be touched, however notified.
    let used_before = drv.queue(0).used_idx(&*ram).unwrap();
    let (bufs, st2) = reqs.write(2, 0xa2);
    drv.queue(0).add(&*ram, &bufs).unwrap();
    for _ in 0..3 {
        drv.notify(0).unwrap();
        dev.serve(0); // what a worker would do on a stray wake-up
    }
    assert_eq!(reqs.status(st2), 0xff, "status byte written while QueueReady = 0");
    assert_eq!(sector_byte(&disk, 2), 0, "disk written while QueueReady = 0");
    assert_eq!(drv.queue(0).used_idx(&*ram).unwrap(), used_before, "used ring written");

    // Ready again: the register follows, the device hears it, and the
    // request left in the ring is served (deferred: without a new notify).
    wr(&*dev, regs::QUEUE_READY, 1);
    assert_eq!(rd(&*dev, regs::QUEUE_READY), 1);
    assert_eq!(dev.device().hook.started(), 1);
    if !deferred {
        drv.notify(0).unwrap();
    }
    assert!(wait_used(drv.queue(0), &ram, used_before.wrapping_add(1)));
    assert_eq!(reqs.status(st2), S_OK);
    assert_eq!(sector_byte(&disk, 2), 0xa2);
    drop(workers);
}

#[test]
fn queue_ready_zero_stops_the_queue() {
    queue_ready_zero_stops_the_queue_in(false);
}

#[test]
fn queue_ready_zero_stops_the_queue_deferred() {
    queue_ready_zero_stops_the_queue_in(true);
}

#[test]
fn valid_requests_before_a_ring_breaking_entry_complete() {
    let ram = Arc::new(GuestRam::new(RAM, RAM_SIZE).unwrap());
    let disk = Arc::new(RamDisk::new(1 << 20));
    let blk = VirtioBlk::new(disk.clone(), BlkConfig::default()).unwrap();
    let line = Arc::new(RecordingIrq::new());
    let dev = MmioTransport::new(blk, ram.clone(), line.clone(), Trigger::Edge);
    let mut drv = MmioDriver::new(DirectIo(&dev));
    drv.init(&*ram, OPTS, &[(0, QSIZE, QBASE)]).unwrap();
    let mut reqs = Requests::new(ram.clone());
    let (a, sa) = reqs.write(1, 0xc1);
    let (b, sb) = reqs.write(2, 0xc2);
    let q = drv.queue(0);
    let ha = q.add_unpublished(&*ram, &a).unwrap();
    let hb = q.add_unpublished(&*ram, &b).unwrap();
    // Then a head past the descriptor table: the ring is broken.
    q.put_avail(&*ram, QSIZE + 5).unwrap();
    q.publish(&*ram).unwrap();
    drv.notify(0).unwrap();

    // Both valid requests ran...
    assert_eq!((sector_byte(&disk, 1), sector_byte(&disk, 2)), (0xc1, 0xc2));
    assert_eq!((reqs.status(sa), reqs.status(sb)), (S_OK, S_OK));
    // ...and their completions reached the driver, with an interrupt.
    let q = drv.queue(0);
    assert_eq!(q.pop_used(&*ram).unwrap(), Some((u32::from(ha), 1)));
    assert_eq!(q.pop_used(&*ram).unwrap(), Some((u32::from(hb), 1)));
    assert_eq!(q.pop_used(&*ram).unwrap(), None);
    assert_ne!(dev.interrupt().status() & INT_USED_BUFFER, 0, "no used-buffer interrupt");
    assert_ne!(drv.status().unwrap() & DEVICE_NEEDS_RESET, 0);
}

/// A 1 MiB disk whose writes wait at the returned gate (closed).
fn gated_disk() -> (Arc<FaultyDisk>, Arc<Gate>) {
    let gate = Arc::new(Gate::default());
    let state = gate.clone();
    let disk = FaultyDisk::ram(1 << 20).on(move |op| {
        if let BackendOp::Write { .. } = op {
            state.pass();
        }
        Ok(())
    });
    (Arc::new(disk), gate)
}

/// Writes made available in one go by the mid-batch tests.
const BATCH: u64 = 16;

/// A virtio-blk over a [`gated_disk`], its one queue served by a worker.
struct GatedDevice {
    ram: Arc<GuestRam>,
    disk: Arc<FaultyDisk>,
    gate: Arc<Gate>,
    dev: Arc<MmioTransport<VirtioBlk<Arc<FaultyDisk>>>>,
    workers: QueueWorkers,
}

fn gated_device() -> GatedDevice {
    let ram = Arc::new(GuestRam::new(RAM, RAM_SIZE).unwrap());
    let (disk, gate) = gated_disk();
    let blk = VirtioBlk::new(disk.clone(), BlkConfig::default()).unwrap();
    let dev = Arc::new(MmioTransport::new(
        blk,
        ram.clone(),
        Arc::new(RecordingIrq::new()),
        Trigger::Edge,
    ));
    let ev: Arc<dyn QueueEvent> = Arc::new(CondvarEvent::new());
    let workers = QueueWorkers::spawn(dev.clone(), vec![ev]).unwrap();
    GatedDevice { ram, disk, gate, dev, workers }
}

/// Makes [`BATCH`] one-sector writes available at once (sector `10 + i`
/// filled with `fill + i`), notifies, and waits until the worker is inside
/// the first. Returns each request's head and status address.
fn submit_batch<R: RegisterIo>(
    drv: &mut MmioDriver<R>,
    ram: &GuestRam,
    reqs: &mut Requests,
    gate: &Gate,
    fill: u8,
) -> Vec<(u16, u64)> {
    let mut submitted = Vec::new();
    for i in 0..BATCH {
        let (bufs, st) = reqs.write(10 + i, fill + i as u8);
        submitted.push((drv.queue(0).add_unpublished(ram, &bufs).unwrap(), st));
    }
    drv.queue(0).publish(ram).unwrap();
    drv.notify(0).unwrap();
    gate.wait_entered(DEADLINE, "the worker");
    submitted
}

/// The heads completed on `q`, each checked to complete once, with its
/// one status byte written.
fn reap_each_once(q: &mut GuestQueue, ram: &GuestRam) -> Vec<u32> {
    let mut seen = Vec::new();
    while let Some((id, len)) = q.pop_used(ram).unwrap() {
        assert_eq!(len, 1);
        assert!(!seen.contains(&id), "head {id} completed twice");
        seen.push(id);
    }
    seen
}

#[test]
fn reset_while_a_worker_is_mid_batch() {
    let GatedDevice { ram, disk, gate, dev, workers } = gated_device();
    let mut drv = MmioDriver::new(DirectIo(&*dev));
    drv.init(&*ram, OPTS, &[(0, QSIZE, QBASE)]).unwrap();
    let mut reqs = Requests::new(ram.clone());
    let submitted = submit_batch(&mut drv, &ram, &mut reqs, &gate, 0x40);

    // The vCPU resets the device while the worker is inside request 0;
    // the reset waits for that request, not for the whole batch.
    let resetter = {
        let dev = dev.clone();
        std::thread::spawn(move || wr(&*dev, regs::STATUS, 0))
    };
    // Gives the reset time to arrive mid-request; the checks below hold
    // whichever comes first.
    std::thread::sleep(Duration::from_millis(50));
    gate.open();
    resetter.join().expect("reset panicked");
    assert!(!dev.is_active());

    // Every request completed exactly once or never started.
    let used = drv.queue(0).used_idx(&*ram).unwrap();
    let seen = reap_each_once(drv.queue(0), &ram);
    assert_eq!(seen.len(), usize::from(used));
    let executed = gate.passed();
    assert_eq!(executed, seen.len(), "backend writes vs published completions");
    assert!(executed >= 1, "the request in progress completed");
    for (i, &(h, st)) in submitted.iter().enumerate() {
        let done = seen.contains(&u32::from(h));
        let byte = reqs.status(st);
        assert_eq!(byte, if done { S_OK } else { 0xff }, "request {i}: status {byte:#x}");
        let sector = sector_byte(disk.inner(), 10 + i as u64);
        assert_eq!(sector, if done { 0x40 + i as u8 } else { 0 }, "request {i}: disk");
    }
    eprintln!("reset mid-batch: {executed} of {BATCH} requests completed, the rest cancelled");

    // The device comes back after re-initialisation, still deferred.
    let mut drv = MmioDriver::new(DirectIo(&*dev));
    drv.init(&*ram, OPTS, &[(0, QSIZE, QBASE + 0x8000)]).unwrap();
    let (bufs, st) = reqs.write(100, 0x99);
    drv.submit(&*ram, 0, &bufs).unwrap();
    assert!(wait_used(drv.queue(0), &ram, 1), "no service after re-initialisation");
    assert_eq!(reqs.status(st), S_OK);
    assert_eq!(sector_byte(disk.inner(), 100), 0x99);
    workers.shutdown();
}

#[test]
fn unplug_while_a_worker_is_mid_batch() {
    const BASE: u64 = 0x1000_0000;
    let GatedDevice { ram, disk, gate, dev, workers } = gated_device();
    let bus = vmio::IoBus::<vmio::Mmio>::new();
    let id = bus.register(vmio::IoRange::new(BASE, 0x200).unwrap(), dev.clone()).unwrap();
    drop(dev);
    let mut drv = MmioDriver::new(vmio::testing::BusIo { bus: &bus, base: BASE });
    drv.init(&*ram, OPTS, &[(0, QSIZE, QBASE)]).unwrap();
    let mut reqs = Requests::new(ram.clone());
    let submitted = submit_batch(&mut drv, &ram, &mut reqs, &gate, 0x60);

    // The worker is inside request 0: the unplug does not wait for it.
    let unplug = bus.unregister(id).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || tx.send(unplug.wait()).unwrap());
    assert!(matches!(rx.recv_timeout(DEADLINE), Ok(Ok(()))), "unplug waited for the worker");
    waiter.join().unwrap();

    // Shutting the workers down finishes what the worker had started.
    gate.open();
    workers.shutdown();
    let seen = reap_each_once(drv.queue(0), &ram);
    assert_eq!(seen.len() as u64, BATCH, "a request of the batch was lost");
    assert_eq!(gate.passed() as u64, BATCH);
    for (i, &(_, st)) in submitted.iter().enumerate() {
        assert_eq!(reqs.status(st), S_OK, "request {i}");
        assert_eq!(sector_byte(disk.inner(), 10 + i as u64), 0x60 + i as u8);
    }
}
